//! `sidekey serve` configuration: flags and `SIDEKEY_*` environment variables, parsed once
//! into [`ServeConfig`]. Tests build a `ServeConfig` directly and never touch the process
//! environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::control::GrpcListen;
use crate::secret::Secret;
use crate::store::etcd::{self, EtcdConfig};
use crate::upstream::ConnectTo;

/// The environment variable holding the etcd password (no flag: a password never sits on a
/// command line). `--etcd-password-file` is the alternative.
pub const ETCD_PASSWORD_ENV: &str = "SIDEKEY_ETCD_PASSWORD";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// redb in --data-dir: the tenants of this one sidekey.
    #[default]
    Embedded,
    /// etcd: the tenants shared by every sidekey on the same --etcd-prefix (fleet mode).
    Etcd,
}

/// The store `serve` opens.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    Embedded,
    /// The password, if any, is still in `password_file` or in the config (from the
    /// environment); `serve` reads the file at start.
    Etcd {
        config: Box<EtcdConfig>,
        password_file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of `sidekey serve`. Every flag also reads `SIDEKEY_<FLAG_IN_CAPS>`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Data plane: where apps send plain HTTP (HTTP/1.1 and h2c). HOST:PORT, HOST an IP
    /// address or a host name (see --admin-listen).
    #[arg(long, env = "SIDEKEY_PROXY_LISTEN", default_value = "127.0.0.1:8080", value_parser = crate::listen_addr::parse)]
    pub proxy_listen: SocketAddr,

    /// Control plane (gRPC): HOST:PORT (HOST an IP address or a host name, as for
    /// --admin-listen), or unix:/path for a socket (mode 0600 from the
    /// start; only a stale socket at the path is replaced, any other file is refused).
    #[arg(long, env = "SIDEKEY_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: GrpcListen,

    /// Admin endpoints: /metrics, /healthz, /readyz. HOST:PORT, HOST an IP address or a
    /// host name (e.g. localhost:9090), which binds the first IPv4 address it resolves to
    /// at start (else its first IPv6 address).
    #[arg(long, env = "SIDEKEY_ADMIN_LISTEN", default_value = "127.0.0.1:9090", value_parser = crate::listen_addr::parse)]
    pub admin_listen: SocketAddr,

    /// Directory of the embedded store (created with mode 0700 if absent); with --store
    /// etcd, of the encrypted snapshot cache.
    #[arg(long, env = "SIDEKEY_DATA_DIR", default_value = "./sidekey-data")]
    pub data_dir: PathBuf,

    /// Where tenants are stored: embedded (one sidekey) or etcd (shared by a fleet).
    #[arg(long, env = "SIDEKEY_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// File holding the master key(s) that seal secrets at rest. Without it and without
    /// SIDEKEY_MASTER_KEY, a key is generated into the data directory (with a warning).
    #[arg(long, env = "SIDEKEY_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// File holding the bearer token control calls must carry. Without it the control
    /// plane accepts any caller that can reach its listener.
    #[arg(long, env = "SIDEKEY_GRPC_TOKEN_FILE")]
    pub grpc_token_file: Option<PathBuf>,

    /// PEM file of CA certificates trusted for vendor connections, in addition to the
    /// public web roots. Repeatable (comma-separated in the environment variable).
    #[arg(long, env = "SIDEKEY_UPSTREAM_CA", value_delimiter = ',')]
    pub upstream_ca: Vec<PathBuf>,

    /// HOST:PORT:ADDR:PORT: dial ADDR:PORT whenever the upstream is HOST:PORT, keeping SNI,
    /// certificate name and Host as HOST. HOST may be *.suffix. Repeatable
    /// (comma-separated in the environment variable).
    #[arg(long, env = "SIDEKEY_CONNECT_TO", value_delimiter = ',')]
    pub connect_to: Vec<ConnectTo>,
    /// YAML file declaring tenants (and optionally partner defaults), e.g. a mounted
    /// Kubernetes Secret: applied before sidekey turns ready, then whenever it changes.
    #[arg(long, env = "SIDEKEY_TENANTS_FILE")]
    pub tenants_file: Option<PathBuf>,

    /// How often the tenants file (and the secret files it references) is re-read; above 0.
    #[arg(long, env = "SIDEKEY_TENANTS_FILE_INTERVAL", default_value = "5s", value_parser = crate::tenants_file::parse_interval)]
    pub tenants_file_interval: Duration,

    /// Largest share, in percent, of the tenants the tenants file declared that one new
    /// version of it may delete (deleting one tenant is always allowed). A version deleting
    /// more is refused and the state before it kept: raise this (100 = no limit) to delete
    /// that many on purpose, e.g. for `tenants: []`.
    #[arg(long, env = "SIDEKEY_TENANTS_FILE_MAX_DELETE", default_value_t = crate::tenants_file::DEFAULT_MAX_DELETE_PERCENT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub tenants_file_max_delete: u8,

    /// Also count proxied requests per tenant (sidekey_proxy_requests_by_tenant_total), for
    /// at most 100 tenants; the rest are counted as "other".
    #[arg(long, env = "SIDEKEY_METRICS_TENANT_LABEL")]
    pub metrics_tenant_label: bool,

    /// Bytes of request bodies held in memory at once, over all requests (Mailkit bodies
    /// being rewritten, m3ter bodies kept for replay): a number of bytes, or with a KiB, MiB
    /// or GiB suffix. A Mailkit body that does not fit is refused with 503
    /// body_budget_exhausted; an m3ter body that does not fit streams without replay.
    #[arg(long, env = "SIDEKEY_BODY_MEMORY_BUDGET", default_value = "64MiB", value_parser = parse_byte_size)]
    pub body_memory_budget: usize,

    /// HTTPS interception: PEM certificate of the local CA (from `sidekey ca init`) that signs
    /// the certificates sidekey presents inside CONNECT tunnels to vendor hosts. With
    /// --intercept-ca-key; without both, CONNECT is refused (405 connect_unsupported).
    #[arg(long, env = "SIDEKEY_INTERCEPT_CA_CERT", requires = "intercept_ca_key")]
    pub intercept_ca_cert: Option<PathBuf>,

    /// HTTPS interception: PEM (PKCS#8) private key of the --intercept-ca-cert CA.
    #[arg(long, env = "SIDEKEY_INTERCEPT_CA_KEY", requires = "intercept_ca_cert")]
    pub intercept_ca_key: Option<PathBuf>,

    /// Accept an interception CA without X.509 name constraints (one clients would trust
    /// for any domain). Off by default: such a CA is refused at start-up.
    #[arg(
        long,
        env = "SIDEKEY_INTERCEPT_CA_ALLOW_UNCONSTRAINED",
        requires = "intercept_ca_cert"
    )]
    pub intercept_ca_allow_unconstrained: bool,

    /// Log line format. Filter with RUST_LOG (default: info).
    #[arg(long, env = "SIDEKEY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Export traces over OTLP/gRPC to this collector: http://HOST:PORT or
    /// https://HOST:PORT (https verified against the public web roots). Without it (and
    /// without OTEL_EXPORTER_OTLP_ENDPOINT, read when this is unset) tracing is off.
    // Checked at start (`telemetry::parse_endpoint`), not by clap, whose error would quote
    // the value: a URL with userinfo may hold a password.
    #[arg(long, env = "SIDEKEY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SIDEKEY_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// How to reach etcd: flags of `serve --store etcd` and of `store copy`. Every flag also
/// reads its `SIDEKEY_ETCD_*` variable.
#[derive(Args, Clone, Debug)]
pub struct EtcdArgs {
    /// etcd endpoints, http://HOST:PORT or https://HOST:PORT (comma-separated in the
    /// environment variable). Required with --store etcd.
    #[arg(long, env = "SIDEKEY_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of this fleet's records in etcd; starts and ends with '/'.
    #[arg(long, env = "SIDEKEY_ETCD_PREFIX", default_value = etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// PEM CA bundle that signs etcd's server certificates (https endpoints).
    #[arg(long, env = "SIDEKEY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// PEM client certificate for etcd (--client-cert-auth); with --etcd-key.
    #[arg(long, env = "SIDEKEY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of --etcd-cert.
    #[arg(long, env = "SIDEKEY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user; its password comes from --etcd-password-file or SIDEKEY_ETCD_PASSWORD.
    #[arg(long, env = "SIDEKEY_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (one line).
    #[arg(long, env = "SIDEKEY_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// Most writes sidekey puts in one etcd transaction: etcd's own --max-txn-ops (128 by
    /// default); a larger batch is refused whole.
    #[arg(long, env = "SIDEKEY_ETCD_MAX_TXN_OPS", default_value_t = etcd::DEFAULT_MAX_TXN_OPS)]
    pub etcd_max_txn_ops: usize,

    /// Deadline of each etcd request and connection attempt; also how long an HTTP/2 ping
    /// (every 10 s) may go unanswered before a silent etcd counts as lost.
    #[arg(long, env = "SIDEKEY_ETCD_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
}

impl EtcdArgs {
    /// The settings, with the password from `password_env` (SIDEKEY_ETCD_PASSWORD) if set;
    /// `--etcd-password-file` is returned apart, to be read when the store is opened.
    pub fn into_config(self, password_env: Option<String>) -> (EtcdConfig, Option<PathBuf>) {
        let config = EtcdConfig {
            endpoints: self.etcd_endpoints,
            prefix: self.etcd_prefix,
            ca: self.etcd_ca,
            cert: self.etcd_cert,
            key: self.etcd_key,
            user: self.etcd_user,
            password: password_env.filter(|v| !v.is_empty()).map(Secret::new),
            max_txn_ops: self.etcd_max_txn_ops,
            timeout: self.etcd_timeout,
        };
        (config, self.etcd_password_file)
    }
}

/// Everything `serve` needs, resolved.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub proxy_listen: SocketAddr,
    pub grpc_listen: GrpcListen,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreChoice,
    pub master_key_file: Option<PathBuf>,
    /// The value of SIDEKEY_MASTER_KEY, read once at start.
    pub master_key: Option<Secret>,
    pub grpc_token_file: Option<PathBuf>,
    pub upstream_ca: Vec<PathBuf>,
    pub connect_to: Vec<ConnectTo>,
    pub tenants_file: Option<PathBuf>,
    pub tenants_file_interval: Duration,
    pub tenants_file_max_delete: u8,
    pub metrics_tenant_label: bool,
    pub body_memory_budget: usize,
    /// The interception CA's certificate and key files, when interception is on.
    pub intercept_ca: Option<InterceptCaFiles>,
    pub log_format: LogFormat,
    /// The OTLP/gRPC collector traces go to; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    pub shutdown_grace: Duration,
}

/// `--intercept-ca-cert`, `--intercept-ca-key` and `--intercept-ca-allow-unconstrained`.
#[derive(Clone, Debug)]
pub struct InterceptCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub allow_unconstrained: bool,
}

impl ServeArgs {
    /// Resolves the flags, taking the master key value from `master_key_env`
    /// (SIDEKEY_MASTER_KEY, which has no flag so that a key never sits on a command line) and
    /// the etcd password from `etcd_password_env` (SIDEKEY_ETCD_PASSWORD, likewise).
    pub fn into_config(
        self,
        master_key_env: Option<String>,
        etcd_password_env: Option<String>,
    ) -> ServeConfig {
        let store = match self.store {
            StoreKind::Embedded => StoreChoice::Embedded,
            StoreKind::Etcd => {
                let (config, password_file) = self.etcd.into_config(etcd_password_env);
                StoreChoice::Etcd {
                    config: Box::new(config),
                    password_file,
                }
            }
        };
        ServeConfig {
            proxy_listen: self.proxy_listen,
            grpc_listen: self.grpc_listen,
            admin_listen: self.admin_listen,
            data_dir: self.data_dir,
            store,
            master_key_file: self.master_key_file,
            master_key: master_key_env.filter(|v| !v.is_empty()).map(Secret::new),
            grpc_token_file: self.grpc_token_file,
            upstream_ca: self.upstream_ca,
            connect_to: self.connect_to,
            tenants_file: self.tenants_file,
            tenants_file_interval: self.tenants_file_interval,
            tenants_file_max_delete: self.tenants_file_max_delete,
            metrics_tenant_label: self.metrics_tenant_label,
            body_memory_budget: self.body_memory_budget,
            // clap makes the two files go together.
            intercept_ca: match (self.intercept_ca_cert, self.intercept_ca_key) {
                (Some(cert), Some(key)) => Some(InterceptCaFiles {
                    cert,
                    key,
                    allow_unconstrained: self.intercept_ca_allow_unconstrained,
                }),
                _ => None,
            },
            log_format: self.log_format,
            otlp_endpoint: self.otlp_endpoint,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

impl ServeConfig {
    /// Loopback listeners on ephemeral ports and a given data directory: the starting point
    /// for tests and benchmarks.
    pub fn ephemeral(data_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            proxy_listen: any,
            grpc_listen: GrpcListen::Tcp(any),
            admin_listen: any,
            data_dir,
            store: StoreChoice::Embedded,
            master_key_file: None,
            master_key: None,
            grpc_token_file: None,
            upstream_ca: Vec::new(),
            connect_to: Vec::new(),
            tenants_file: None,
            tenants_file_interval: crate::tenants_file::DEFAULT_POLL,
            tenants_file_max_delete: crate::tenants_file::DEFAULT_MAX_DELETE_PERCENT,
            metrics_tenant_label: false,
            body_memory_budget: crate::proxy::DEFAULT_BODY_MEMORY_BUDGET,
            intercept_ca: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// A byte count as `--body-memory-budget` takes it: digits, optionally followed by `KiB`,
/// `MiB` or `GiB` (powers of 1024), nothing else; at least 1.
pub fn parse_byte_size(value: &str) -> Result<usize, String> {
    let invalid = || format!("{value:?} is not a byte size (e.g. 268435456, 512KiB, 256MiB, 1GiB)");
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(digits_end);
    let scale: usize = match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(invalid()),
    };
    let n: usize = digits.parse().map_err(|_| invalid())?;
    match n.checked_mul(scale) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn byte_sizes_have_one_grammar() {
        assert_eq!(parse_byte_size("1024"), Ok(1024));
        assert_eq!(parse_byte_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_byte_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        for bad in [
            "",
            "0",
            "0MiB",
            "MiB",
            "-1",
            "+1",
            "1.5MiB",
            "1 MiB",
            "1mib",
            "1MB",
            "1M",
            "1KiBx",
            " 1",
            "99999999999999999999",
            "18446744073709551615GiB",
        ] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
