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

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::mpsc;

use super::codec;
use super::etcd_cache::SnapshotCache;
use super::etcd_conn::{Shared, etcd_error};
use super::etcd_follow;
use super::etcd_mirror::Mirror;
use super::health::StoreHealth;
use super::master_key::MasterKeys;
use super::{Expect, Mutation, Store, StoreError, StoreEvent, StoredState};

pub use super::etcd_config::{
    DEFAULT_MAX_TXN_OPS, DEFAULT_PREFIX, DEFAULT_TIMEOUT, EtcdConfig, KEEPALIVE_INTERVAL,
};
pub use super::etcd_conn::{CONNECTED_GAUGE, DISCONNECTED_SINCE_GAUGE, UNREADABLE_GAUGE};

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
            .field("endpoints", &self.shared.config().endpoints)
            .field("prefix", &self.shared.config().prefix)
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
        let cache = cache_dir.map(|dir| SnapshotCache::new(dir, &config.prefix));
        Ok(Self {
            shared: Arc::new(Shared::new(config, keys)),
            cache,
            loaded: Mutex::new(None),
        })
    }

    pub fn health(&self) -> StoreHealth {
        self.shared.health()
    }

    fn take_loaded(&self) -> Option<Mirror> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
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
        let limit = self.shared.config().max_txn_ops;
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
        let response = tokio::time::timeout(shared.config().timeout, client.txn(txn))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "etcd did not answer within {} (--etcd-timeout): the write may or may not \
                     have been made; read the record again before retrying",
                    humantime::format_duration(shared.config().timeout)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::secret::Secret;
    use crate::store::etcd_conn::prefix_end;

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
