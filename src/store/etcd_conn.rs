//! The connection to etcd that the etcd store and its follower share: the client (dialled
//! and authenticated on first use), whether etcd is reachable ([`Link`]: gauges, `/readyz`,
//! one log line per change), and reading and opening the records under the prefix.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, GetOptions};

use super::codec;
use super::etcd_config::EtcdConfig;
use super::etcd_mirror::Mirror;
use super::health::StoreHealth;
use super::master_key::MasterKeys;
use super::{StoreError, StoredState};
use crate::model::{PartnerRecord, TenantRecord};

/// Keys fetched per page by a full load.
const PAGE: i64 = 500;

/// The gauge: 1 while the sidekey follows etcd, 0 while it cannot reach it.
pub const CONNECTED_GAUGE: &str = "sidekey_store_connected";
/// The gauge: Unix time at which etcd was lost, 0 while connected.
pub const DISCONNECTED_SINCE_GAUGE: &str = "sidekey_store_disconnected_since_seconds";
/// The gauge: records under the prefix that do not open, and so are not served.
pub const UNREADABLE_GAUGE: &str = "sidekey_store_unreadable_records";

/// Registers the help texts of the fleet-mode gauges.
pub(crate) fn describe_metrics() {
    metrics::describe_gauge!(
        CONNECTED_GAUGE,
        "Fleet mode: 1 while sidekey follows etcd, 0 while it cannot reach it (serving its last \
         snapshot)"
    );
    metrics::describe_gauge!(
        DISCONNECTED_SINCE_GAUGE,
        metrics::Unit::Seconds,
        "Fleet mode: Unix time at which sidekey lost etcd, 0 while connected"
    );
    metrics::describe_gauge!(
        UNREADABLE_GAUGE,
        "Fleet mode: etcd records that do not open (altered, copied from another key, sealed by \
         a key not in the ring) and are therefore not served"
    );
}

/// Whether this sidekey can reach etcd, as the gauges, `/readyz` and the logs say it.
pub(crate) struct Link {
    since: Mutex<Option<SystemTime>>,
    health: StoreHealth,
}

impl Link {
    fn new(health: StoreHealth) -> Self {
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
    pub(crate) fn check(&self) -> Result<(), StoreError> {
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
    unreadable: Mutex<BTreeSet<String>>,
}

impl Shared {
    pub(crate) fn new(config: EtcdConfig, keys: MasterKeys) -> Self {
        Self {
            config,
            keys: Arc::new(keys),
            client: tokio::sync::Mutex::new(None),
            link: Link::new(StoreHealth::new()),
            unreadable: Mutex::new(BTreeSet::new()),
        }
    }

    pub(crate) fn config(&self) -> &EtcdConfig {
        &self.config
    }

    pub(crate) fn health(&self) -> StoreHealth {
        self.link.health.clone()
    }
    pub(crate) fn prefix(&self) -> &str {
        &self.config.prefix
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.config.timeout
    }

    pub(crate) fn tenant_key(&self, id: &str) -> String {
        format!("{}tenants/{id}", self.config.prefix)
    }

    pub(crate) fn partner_key(&self) -> String {
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
        let mut unreadable = BTreeSet::new();
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

    fn lock_unreadable(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
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
