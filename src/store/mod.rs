//! Durable storage of tenants and partner defaults, behind the small [`Store`] trait.
//!
//! The embedded backend ([`embedded::EmbeddedStore`], redb in `--data-dir`) serves one
//! sidecar; the etcd backend ([`etcd::EtcdStore`]) a fleet of them. Every write is a
//! compare-and-set on the record's revision, revisions are store-wide and increasing, and
//! [`Store::follow`] lets a backend that others write to hand the catalog each change.
//!
//! Records cross this trait with their secrets in plain [`crate::secret::Secret`]s; sealing
//! them at rest is the backend's job ([`sealing`]).

pub mod backend;
pub mod codec;
pub mod copy;
mod doc;
pub mod embedded;
pub mod etcd;
mod etcd_cache;
mod etcd_config;
mod etcd_conn;
mod etcd_follow;
mod etcd_mirror;
mod files;
pub mod health;
pub mod master_key;
pub mod record;
pub mod sealing;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::model::{PartnerRecord, TenantRecord};

/// Registers the help texts of the store's gauges (the fleet-mode ones included, which only
/// an etcd store sets).
pub fn describe_metrics() {
    health::describe_metrics();
    etcd_conn::describe_metrics();
}

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
    /// The backend cannot be reached (a shared store's cluster is down or partitioned away);
    /// the message says since when and what to expect.
    #[error("{0}")]
    Unavailable(String),
    /// The write is larger than the backend takes in one transaction; the message says the
    /// limit. Retrying the same write cannot succeed.
    #[error("{0}")]
    TooLarge(String),
    /// The backend failed otherwise (in use, misused).
    #[error("store failure: {0}")]
    Backend(String),
}

/// One change to a shared store, as [`Store::follow`] reports it, in revision order. It may
/// be a change this process made itself: applying it again is harmless.
#[derive(Debug)]
pub enum StoreEvent {
    /// One record written or deleted at `revision`.
    Changed { revision: u64, change: Change },
    /// Everything anew: the first load after a start without one, or after the backend lost
    /// the thread of changes (etcd compacted past the revision followed).
    Reloaded(StoredState),
}

#[derive(Debug)]
pub enum Change {
    PutTenant(TenantRecord),
    /// Deleted, or rewritten with a value that does not open (logged by the backend): either
    /// way the tenant is no longer served.
    RemoveTenant(String),
    /// A deleted partner record is reported as the never-written default.
    PutPartner(PartnerRecord),
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

    /// For backends that other processes write to: the changes after the last
    /// [`Store::load`] (or, if that load failed, a [`StoreEvent::Reloaded`] once the backend
    /// can load), for as long as the receiver is kept. Called once; `None` for a backend only
    /// this process writes.
    fn follow(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        None
    }
}
