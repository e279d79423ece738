//! Durable storage of tenants and partner defaults, behind the small [`Store`] trait.
//!
//! The embedded backend ([`embedded::EmbeddedStore`], redb in `--data-dir`) serves one
//! sidecar. The trait is shaped for a shared backend too (etcd and the like): every write is
//! a compare-and-set on the record's revision, revisions are store-wide and increasing, and
//! [`Store::watch`] lets a backend that others write to tell the catalog to reload.
//!
//! Records cross this trait with their secrets in plain [`crate::secret::Secret`]s; sealing
//! them at rest is the backend's job ([`sealing`]).

pub mod backend;
pub mod embedded;
mod files;
pub mod health;
pub mod master_key;
pub mod record;
pub mod sealing;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::model::{PartnerRecord, TenantRecord};

/// Everything a store holds.
#[derive(Clone, Debug, Default)]
pub struct StoredState {
    pub tenants: Vec<TenantRecord>,
    pub partner: PartnerRecord,
    /// The highest revision handed out so far.
    pub revision: u64,
}

/// One write. The record's `revision` field is ignored: the store assigns the revision.
#[derive(Clone, Debug)]
pub enum Mutation {
    PutTenant(TenantRecord),
    DeleteTenant(String),
    PutPartner(PartnerRecord),
}

/// The revision the written record must have now for the write to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The record must not exist (create; for the partner defaults: never written).
    Absent,
    /// The record must exist with exactly this revision.
    Revision(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record's current revision is not the expected one: someone else wrote it.
    #[error("the record was changed concurrently")]
    Conflict,
    /// The master key cannot open what is stored (wrong key, or data corrupted).
    #[error("{0}")]
    Key(String),
    /// A record failed to authenticate or decode (altered, corrupted, or copied from another
    /// record); the message names the record.
    #[error("{0}")]
    Record(String),
    /// The store file is damaged (not a store, unreadable structure, a panic inside redb).
    #[error("store file is corrupted: {0}")]
    Corrupted(String),
    /// The disk failed (full, I/O error); the store recovers by itself once it works again.
    #[error("store I/O failure: {0}")]
    Io(String),
    /// The backend failed otherwise (unreachable, in use, misused).
    #[error("store failure: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads everything, for start-up and after a change notification.
    async fn load(&self) -> Result<StoredState, StoreError>;

    /// Applies every write of `batch` in one transaction, if each record's current
    /// revision matches its `Expect`; otherwise applies none. Every record written gets the
    /// one new store revision, which is returned. Returns only once the transaction is
    /// durable: a crash after `Ok` does not lose it.
    async fn commit_batch(&self, batch: Vec<(Mutation, Expect)>) -> Result<u64, StoreError>;

    /// [`Store::commit_batch`] of one write.
    async fn commit(&self, mutation: Mutation, expect: Expect) -> Result<u64, StoreError> {
        self.commit_batch(vec![(mutation, expect)]).await
    }

    /// For backends that other processes write to: a receiver notified after each foreign
    /// change, upon which the catalog reloads. `None` for a backend only this process writes.
    fn watch(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}
