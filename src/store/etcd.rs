//! The etcd backend (`--store etcd`): the tenants of a whole fleet of sidekeys in one etcd
//! cluster, every sidekey of a Deployment reading and writing the same records.
//!
//! Layout under `--etcd-prefix` (default `/sidekey/`): `<prefix>tenants/<id>` per tenant and
//! `<prefix>partner` for the partner defaults. Each value is the record sealed whole under
//! the master keyring ([`super::codec`]), with the full etcd key bound in as associated data:
//! etcd, its snapshots and its backups never hold a plaintext secret, and a value copied onto
//! another key (or under another prefix) does not open.
//!
//! Revisions are etcd's: a record's etag is its `mod_revision`. A create is a Txn on
//! `create_revision == 0`, an update or delete compares `mod_revision`; a batch is one Txn,
//! at most [`EtcdConfig::max_txn_ops`] writes (etcd's own `--max-txn-ops`, 128 by default).
//! A write is acknowledged once etcd has committed it, that is once a quorum has it.
//!
//! Reads: [`Store::load`] pages through the prefix at one revision; [`Store::follow`] then
//! watches the prefix from that revision (see [`super::etcd_follow`]) and keeps a local
//! snapshot cache in `--data-dir` ([`super::etcd_cache`]) so that a sidekey started while
//! etcd is down still serves.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};
use tokio::sync::mpsc;

use super::codec;
use super::etcd_cache::SnapshotCache;
use super::etcd_follow::{self, Mirror};
use super::health::StoreHealth;
use super::master_key::MasterKeys;
use super::{Expect, Mutation, Store, StoreError, StoreEvent, StoredState};
use crate::secret::Secret;
use crate::tenants::{PartnerRecord, TenantRecord};

/// `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/sidekey/";
/// `--etcd-max-txn-ops` default: etcd's own default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// `--etcd-timeout` default: the deadline of every etcd request and of connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval on the connection to etcd.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Keys fetched per page by a full load.
const PAGE: i64 = 500;

/// The gauge: 1 while the sidekey follows etcd, 0 while it cannot reach it.
pub const CONNECTED_GAUGE: &str = "sidekey_store_connected";
/// The gauge: Unix time at which etcd was lost, 0 while connected.
pub const DISCONNECTED_SINCE_GAUGE: &str = "sidekey_store_disconnected_since_seconds";
/// The gauge: records under the prefix that do not open, and so are not served.
pub const UNREADABLE_GAUGE: &str = "sidekey_store_unreadable_records";

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

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
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

/// Whether this sidekey can reach etcd, as the gauges, `/readyz` and the logs say it.
pub(crate) struct Link {
    since: Mutex<Option<SystemTime>>,
    health: StoreHealth,
}

impl Link {
    fn new(health: StoreHealth) -> Self {
        metrics::describe_gauge!(
            CONNECTED_GAUGE,
            "1 while sidekey follows etcd, 0 while it cannot reach it (serving its last snapshot)"
        );
        metrics::describe_gauge!(
            DISCONNECTED_SINCE_GAUGE,
            "Unix time at which sidekey lost etcd, 0 while connected"
        );
        Self {
            since: Mutex::new(None),
            health,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SystemTime>> {
        self.since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn up(&self) {
        *self.lock() = None;
        metrics::gauge!(CONNECTED_GAUGE).set(1.0);
        metrics::gauge!(DISCONNECTED_SINCE_GAUGE).set(0.0);
        self.health.set_healthy();
    }

    /// Records the loss (the first one counts for "since"); `reason` names no secret.
    pub(crate) fn down(&self, reason: &str) {
        let since = *self.lock().get_or_insert_with(SystemTime::now);
        let unix = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(CONNECTED_GAUGE).set(0.0);
        metrics::gauge!(DISCONNECTED_SINCE_GAUGE).set(unix);
        self.health.set_failing(&format!(
            "etcd unreachable since {} ({reason}); serving the last snapshot",
            humantime::format_rfc3339_seconds(since)
        ));
    }

    /// `Err` while etcd is known to be unreachable: writes fail at once instead of waiting.
    fn check(&self) -> Result<(), StoreError> {
        match *self.lock() {
            None => Ok(()),
            Some(since) => Err(StoreError::Unavailable(format!(
                "etcd is unreachable since {}: the write was not made; retry once the store \
                 is connected again (sidekey_store_connected)",
                humantime::format_rfc3339_seconds(since)
            ))),
        }
    }
}

/// What the backend shares with its follower task.
pub(crate) struct Shared {
    config: EtcdConfig,
    pub(crate) keys: Arc<MasterKeys>,
    client: tokio::sync::Mutex<Option<Client>>,
    pub(crate) link: Link,
    /// Keys whose value does not open, as [`UNREADABLE_GAUGE`] counts them.
    unreadable: Mutex<std::collections::BTreeSet<String>>,
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    /// Where the follower keeps its snapshot cache (`sidekey serve` only).
    cache: Option<SnapshotCache>,
    /// What the last successful `load` read, handed to the follower.
    loaded: Mutex<Option<Mirror>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.shared.config.endpoints)
            .field("prefix", &self.shared.config.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store on `config`; nothing is dialled yet. With `cache_dir`, a load that cannot
    /// reach etcd falls back to the snapshot cache there, and the follower keeps it current.
    pub fn new(
        config: EtcdConfig,
        keys: MasterKeys,
        cache_dir: Option<&Path>,
    ) -> Result<Self, StoreError> {
        config.validate().map_err(StoreError::Backend)?;
        let link = Link::new(StoreHealth::new());
        metrics::describe_gauge!(
            UNREADABLE_GAUGE,
            "etcd records that do not open (altered, copied from another key, sealed by a key \
             not in the ring) and are therefore not served"
        );
        let cache = cache_dir.map(|dir| SnapshotCache::new(dir, &config.prefix));
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                keys: Arc::new(keys),
                client: tokio::sync::Mutex::new(None),
                link,
                unreadable: Mutex::new(std::collections::BTreeSet::new()),
            }),
            cache,
            loaded: Mutex::new(None),
        })
    }

    pub fn health(&self) -> StoreHealth {
        self.shared.link.health.clone()
    }

    fn take_loaded(&self) -> Option<Mirror> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Shared {
    pub(crate) fn prefix(&self) -> &str {
        &self.config.prefix
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.config.timeout
    }

    fn tenant_key(&self, id: &str) -> String {
        format!("{}tenants/{id}", self.config.prefix)
    }

    fn partner_key(&self) -> String {
        format!("{}partner", self.config.prefix)
    }

    /// The connected client, dialling (and authenticating) first if needed.
    pub(crate) async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let options = self.config.connect_options()?;
        let connect = Client::connect(self.config.endpoints.clone(), Some(options));
        let client = tokio::time::timeout(self.config.timeout, connect)
            .await
            .map_err(|_| unavailable("connecting timed out"))?
            .map_err(etcd_error)?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Reads every record under the prefix at one revision, page by page.
    pub(crate) async fn load_mirror(&self) -> Result<Mirror, StoreError> {
        let mut client = self.client().await?;
        let prefix = self.config.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut mirror = Mirror::default();
        let mut from = prefix.clone();
        let mut revision = 0i64;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let get = client.get(from.clone(), Some(options));
            let mut page = tokio::time::timeout(self.config.timeout, get)
                .await
                .map_err(|_| unavailable("reading the tenants timed out"))?
                .map_err(etcd_error)?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            for kv in kvs {
                mirror.insert(kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision());
            }
            if !more {
                break;
            }
        }
        mirror.revision = u64::try_from(revision).unwrap_or(0);
        Ok(mirror)
    }

    /// Opens every record of `mirror`. A record that does not open (altered, copied from
    /// another key, sealed by a key not in the ring) is left out with an error log naming its
    /// key, so that one bad value does not stop the fleet.
    pub(crate) fn decode_all(&self, mirror: &Mirror) -> StoredState {
        let mut state = StoredState {
            revision: mirror.revision,
            ..StoredState::default()
        };
        let mut unreadable = std::collections::BTreeSet::new();
        for (key, value, revision) in mirror.iter() {
            match self.decode(key, value, revision) {
                Ok(Decoded::Tenant(t)) => state.tenants.push(t),
                Ok(Decoded::Partner(p)) => state.partner = p,
                Ok(Decoded::Foreign) => {}
                Err(e) => {
                    tracing::error!(key, error = %e,
                        "an etcd record does not open; it is not served");
                    unreadable.insert(key.to_owned());
                }
            }
        }
        let count = unreadable.len();
        *self.lock_unreadable() = unreadable;
        metrics::gauge!(UNREADABLE_GAUGE).set(count as f64);
        state
    }

    /// Records whether the value last seen under `key` opened.
    pub(crate) fn mark_readable(&self, key: &str, readable: bool) {
        let mut set = self.lock_unreadable();
        let changed = if readable {
            set.remove(key)
        } else {
            set.insert(key.to_owned())
        };
        if changed {
            metrics::gauge!(UNREADABLE_GAUGE).set(set.len() as f64);
        }
    }

    fn lock_unreadable(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.unreadable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens one value read under `key` with `mod_revision` `revision`.
    pub(crate) fn decode(
        &self,
        key: &str,
        value: &[u8],
        revision: u64,
    ) -> Result<Decoded, StoreError> {
        let Some(rest) = key.strip_prefix(self.config.prefix.as_str()) else {
            return Ok(Decoded::Foreign);
        };
        if rest == "partner" {
            let mut p = codec::decode_partner(&self.keys, key, value)?;
            p.revision = revision;
            return Ok(Decoded::Partner(p));
        }
        match rest.strip_prefix("tenants/") {
            Some(id) => {
                let mut t = codec::decode_tenant(&self.keys, key, id, value)?;
                t.revision = revision;
                Ok(Decoded::Tenant(t))
            }
            None => Ok(Decoded::Foreign),
        }
    }

    /// What a key under the prefix names, without its value.
    pub(crate) fn key_kind(&self, key: &str) -> KeyKind {
        match key.strip_prefix(self.config.prefix.as_str()) {
            Some("partner") => KeyKind::Partner,
            Some(rest) => match rest.strip_prefix("tenants/") {
                Some(id) => KeyKind::Tenant(id.to_owned()),
                None => KeyKind::Foreign,
            },
            None => KeyKind::Foreign,
        }
    }
}

pub(crate) enum Decoded {
    Tenant(TenantRecord),
    Partner(PartnerRecord),
    /// A key under the prefix that is not sidekey's: ignored.
    Foreign,
}

pub(crate) enum KeyKind {
    Tenant(String),
    Partner,
    Foreign,
}

#[async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<StoredState, StoreError> {
        match self.shared.load_mirror().await {
            Ok(mirror) => {
                self.shared.link.up();
                let state = self.shared.decode_all(&mirror);
                *self
                    .loaded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mirror);
                Ok(state)
            }
            Err(e @ StoreError::Unavailable(_)) => {
                self.shared.link.down(&e.to_string());
                let Some(cache) = &self.cache else {
                    return Err(e);
                };
                let cached = cache.read(self.shared.keys.clone()).await?;
                let Some(mirror) = cached else {
                    return Err(StoreError::Unavailable(format!(
                        "{e}; and no snapshot cache in the data directory yet (one is kept \
                         once this sidekey has loaded from etcd)"
                    )));
                };
                tracing::warn!(
                    revision = mirror.revision,
                    tenants = mirror.len(),
                    "etcd is unreachable: serving the snapshot cached in the data directory"
                );
                let state = self.shared.decode_all(&mirror);
                *self
                    .loaded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mirror);
                Ok(state)
            }
            Err(e) => Err(e),
        }
    }

    async fn commit_batch(&self, batch: Vec<(Mutation, Expect)>) -> Result<u64, StoreError> {
        let limit = self.shared.config.max_txn_ops;
        if batch.len() > limit {
            return Err(StoreError::TooLarge(format!(
                "{} writes in one transaction: etcd takes at most {limit} (its --max-txn-ops, \
                 and sidekey's --etcd-max-txn-ops); nothing was written",
                batch.len()
            )));
        }
        self.shared.link.check()?;
        let shared = &self.shared;
        let mut compares = Vec::with_capacity(batch.len());
        let mut ops = Vec::with_capacity(batch.len());
        for (mutation, expect) in batch {
            let key = match &mutation {
                Mutation::PutTenant(t) => shared.tenant_key(&t.id),
                Mutation::DeleteTenant(id) => shared.tenant_key(id),
                Mutation::PutPartner(_) => shared.partner_key(),
            };
            compares.push(match expect {
                Expect::Absent => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Expect::Revision(r) => Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    i64::try_from(r).map_err(|_| StoreError::Conflict)?,
                ),
            });
            ops.push(match mutation {
                Mutation::PutTenant(t) => TxnOp::put(
                    key.clone(),
                    codec::encode_tenant(&shared.keys, &key, &t)?,
                    None,
                ),
                Mutation::DeleteTenant(_) => TxnOp::delete(key, None),
                Mutation::PutPartner(p) => TxnOp::put(
                    key.clone(),
                    codec::encode_partner(&shared.keys, &key, &p)?,
                    None,
                ),
            });
        }
        let mut client = shared.client().await?;
        let txn = Txn::new().when(compares).and_then(ops);
        let response = tokio::time::timeout(shared.config.timeout, client.txn(txn))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "etcd did not answer within {} (--etcd-timeout): the write may or may not \
                     have been made; read the record again before retrying",
                    humantime::format_duration(shared.config.timeout)
                ))
            })?
            .map_err(etcd_error)?;
        if !response.succeeded() {
            return Err(StoreError::Conflict);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        u64::try_from(revision)
            .ok()
            .filter(|r| *r > 0)
            .ok_or_else(|| StoreError::Backend("etcd answered without a revision".into()))
    }

    fn follow(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        let (tx, rx) = mpsc::channel(64);
        let from = self.take_loaded();
        let cache = self.cache.clone();
        tokio::spawn(etcd_follow::run(self.shared.clone(), from, cache, tx));
        Some(rx)
    }
}

/// The smallest key after every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(format!("etcd is unreachable: {what}"))
}

/// Maps a client error. Connection failures and etcd's own "unavailable" are
/// [`StoreError::Unavailable`]; the rest (permission denied, invalid request) are refusals.
/// etcd's messages never echo a value, so they carry no secret.
pub(crate) fn etcd_error(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    use tonic::Code;
    match e {
        Error::TransportError(e) => unavailable(&e.to_string()),
        Error::IoError(e) => unavailable(&e.to_string()),
        Error::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            unavailable(s.message())
        }
        Error::GRpcStatus(s) => StoreError::Backend(format!(
            "etcd refused the request ({:?}): {}",
            s.code(),
            s.message()
        )),
        other => StoreError::Backend(format!("etcd client: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str]) -> EtcdConfig {
        EtcdConfig::new(endpoints.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn endpoints_and_settings_are_checked_strictly() {
        assert!(
            config(&["http://127.0.0.1:2379", "http://etcd-1:2379"])
                .validate()
                .is_ok()
        );
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "http://127.0.0.1:",
            "http://:2379",
            "http://127.0.0.1:2379/",
            "http://127.0.0.1:2379/v3",
            "http://127.0.0.1:99999",
            "ftp://127.0.0.1:2379",
            "",
        ] {
            assert!(config(&[bad]).validate().is_err(), "{bad:?} accepted");
        }
        assert!(config(&[]).validate().is_err());
        // https needs the CA; the CA needs https, for every endpoint.
        assert!(config(&["https://etcd:2379"]).validate().is_err());
        let mut tls = config(&["https://etcd:2379", "http://etcd-1:2379"]);
        tls.ca = Some("ca.pem".into());
        assert!(tls.validate().is_err());
        tls.endpoints.pop();
        assert!(tls.validate().is_ok());
        tls.cert = Some("c.pem".into());
        assert!(tls.validate().unwrap_err().contains("together"));
        tls.key = Some("k.pem".into());
        assert!(tls.validate().is_ok());

        for prefix in ["", "/", "sidekey/", "/sidekey"] {
            let mut c = config(&["http://etcd:2379"]);
            c.prefix = prefix.into();
            assert!(c.validate().is_err(), "prefix {prefix:?} accepted");
        }
        let mut c = config(&["http://etcd:2379"]);
        c.user = Some("fleet".into());
        assert!(c.validate().is_err(), "a user without a password");
        c.password = Some(Secret::new("pw"));
        assert!(c.validate().is_ok());
        c.max_txn_ops = 0;
        assert!(c.validate().is_err());
        c.max_txn_ops = 1;
        c.timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_password_file_loses_its_line_end_and_never_doubles_the_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let c = config(&["http://etcd:2379"])
            .with_password_file(Some(&path))
            .unwrap();
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s3cret"));
        let err = c.with_password_file(Some(&path)).unwrap_err();
        assert!(err.contains("not both") && !err.contains("s3cret"), "{err}");
        let missing = config(&["http://etcd:2379"])
            .with_password_file(Some(&dir.path().join("none")))
            .unwrap_err();
        assert!(missing.contains("--etcd-password-file"), "{missing}");
    }

    #[test]
    fn the_prefix_range_ends_after_every_key_under_it() {
        assert_eq!(prefix_end(b"/sidekey/"), b"/sidekey0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
