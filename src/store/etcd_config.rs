//! How to reach etcd (`--etcd-*` flags of `serve` and `store copy`): [`EtcdConfig`], checked
//! strictly before anything is dialled, and the client options built from it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::StoreError;
use crate::secret::Secret;

/// `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/sidekey/";
/// `--etcd-max-txn-ops` default: etcd's own default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// `--etcd-timeout` default: the deadline of every etcd request and of connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval on the connection to etcd.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How to reach etcd, as `sidekey serve` and `sidekey store copy` take it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT`, all of one scheme.
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// PEM CA bundle that signs etcd's server certificates (required with https).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub max_txn_ops: usize,
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Plain-HTTP endpoints with every default: for tests.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Takes the password from `file` (`--etcd-password-file`; one line, its line end
    /// dropped), refusing a password given both ways.
    pub fn with_password_file(mut self, file: Option<&Path>) -> Result<Self, String> {
        let Some(path) = file else { return Ok(self) };
        if self.password.is_some() {
            return Err(
                "give the etcd password with --etcd-password-file or SIDEKEY_ETCD_PASSWORD, not \
                 both"
                    .into(),
            );
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --etcd-password-file {}: {e}", path.display()))?;
        self.password = Some(Secret::new(text.trim_end_matches(['\r', '\n'])));
        Ok(self)
    }

    /// Checks the settings against each other; the message names the flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("--store etcd needs --etcd-endpoints".into());
        }
        let tls = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        for e in &self.endpoints {
            let rest = match (e.strip_prefix("http://"), e.strip_prefix("https://")) {
                (Some(rest), None) if !tls => rest,
                (None, Some(rest)) if tls => rest,
                (Some(_), None) => {
                    return Err(format!(
                        "--etcd-endpoints {e:?}: --etcd-ca/--etcd-cert/--etcd-key need https:// \
                         endpoints"
                    ));
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "--etcd-endpoints {e:?}: an https:// endpoint needs --etcd-ca (the CA \
                         that signs etcd's certificates)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "--etcd-endpoints {e:?}: expected http://HOST:PORT or https://HOST:PORT"
                    ));
                }
            };
            let valid = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                && !rest.contains('/');
            if !valid {
                return Err(format!(
                    "--etcd-endpoints {e:?}: expected http://HOST:PORT or https://HOST:PORT"
                ));
            }
        }
        if self.ca.is_none() && (self.cert.is_some() || self.key.is_some()) {
            return Err("--etcd-cert and --etcd-key need --etcd-ca".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("give --etcd-cert and --etcd-key together".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(
                "--etcd-user needs a password (--etcd-password-file or SIDEKEY_ETCD_PASSWORD), \
                 and a password needs --etcd-user"
                    .into(),
            );
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(format!(
                "--etcd-prefix {:?}: must start and end with '/' (e.g. /sidekey/), so that no \
                 other prefix overlaps it",
                self.prefix
            ));
        }
        if self.max_txn_ops == 0 {
            return Err("--etcd-max-txn-ops must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("--etcd-timeout must be above 0".into());
        }
        Ok(())
    }

    pub(crate) fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            // A silent peer (partition, not a reset) is noticed within an interval and the
            // timeout. The interval stays above etcd's --grpc-keepalive-min-time (5 s by
            // default), below which etcd answers pings with GOAWAY.
            .with_keep_alive(KEEPALIVE_INTERVAL, self.timeout)
            .with_keep_alive_while_idle(true)
            .with_auto_token_refresh(true);
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.with_user(user.clone(), password.expose().to_owned());
        }
        if let Some(ca) = &self.ca {
            let read = |path: &Path, what: &str| {
                std::fs::read(path).map_err(|e| {
                    StoreError::Backend(format!("cannot read {what} {}: {e}", path.display()))
                })
            };
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca, "--etcd-ca")?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--etcd-cert")?,
                    read(key, "--etcd-key")?,
                ));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}
