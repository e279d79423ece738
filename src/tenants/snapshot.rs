//! The immutable map of effective tenants that the data plane reads.
//!
//! The catalog builds a new [`Snapshot`] after every committed write and swaps it in
//! atomically; a request loads the current one without locking and keeps using it to the
//! end, so a concurrent write never changes credentials under a request in flight.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::effective::EffectiveTenant;

/// `sidekey_tenants_configured`: tenants in the snapshot the proxy serves.
pub const METRIC_TENANTS: &str = "sidekey_tenants_configured";

/// Registers the help text of [`METRIC_TENANTS`].
pub fn describe_metrics() {
    metrics::describe_gauge!(METRIC_TENANTS, "Tenants in the snapshot the proxy serves");
}

#[derive(Debug, Default)]
pub struct Snapshot {
    tenants: HashMap<Arc<str>, Arc<EffectiveTenant>>,
    /// The store revision this snapshot reflects.
    revision: u64,
}

impl Snapshot {
    pub fn new(tenants: HashMap<Arc<str>, Arc<EffectiveTenant>>, revision: u64) -> Self {
        Self { tenants, revision }
    }

    pub fn tenant(&self, id: &str) -> Option<&Arc<EffectiveTenant>> {
        self.tenants.get(id)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Arc<EffectiveTenant>> {
        self.tenants.values()
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub(crate) fn map(&self) -> &HashMap<Arc<str>, Arc<EffectiveTenant>> {
        &self.tenants
    }
}

/// Read side of the published snapshot, cheap to clone, shared by every listener task.
#[derive(Clone)]
pub struct SnapshotReader {
    current: Arc<ArcSwap<Snapshot>>,
    changes: watch::Receiver<u64>,
}

impl SnapshotReader {
    /// The snapshot in force now. Lock-free; hold it for one request, not longer.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that is notified (with the new revision) after each publish, for caches
    /// that must drop entries of credentials that no longer exist.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// Write side, owned by the catalog.
pub(crate) struct SnapshotPublisher {
    current: Arc<ArcSwap<Snapshot>>,
    changes: watch::Sender<u64>,
}

impl SnapshotPublisher {
    pub(crate) fn new(initial: Snapshot) -> (Self, SnapshotReader) {
        let revision = initial.revision;
        let current = Arc::new(ArcSwap::from_pointee(initial));
        let (tx, rx) = watch::channel(revision);
        (
            Self {
                current: current.clone(),
                changes: tx,
            },
            SnapshotReader {
                current,
                changes: rx,
            },
        )
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Sets [`METRIC_TENANTS`] to the snapshot in force, for the catalog's first snapshot
    /// (later ones set it as they are published).
    pub(crate) fn export_count(&self) {
        metrics::gauge!(METRIC_TENANTS).set(self.current.load().len() as f64);
    }

    pub(crate) fn publish(&self, next: Snapshot) {
        let revision = next.revision;
        metrics::gauge!(METRIC_TENANTS).set(next.len() as f64);
        tracing::debug!(revision, tenants = next.len(), "snapshot published");
        self.current.store(Arc::new(next));
        self.changes.send_replace(revision);
    }
}

impl SnapshotReader {
    /// A reader over one snapshot that never changes: for tests and benchmarks that drive
    /// the data plane without a store.
    pub fn fixed(tenants: impl IntoIterator<Item = EffectiveTenant>) -> Self {
        let map = tenants
            .into_iter()
            .map(|t| (t.id.clone(), Arc::new(t)))
            .collect();
        let (publisher, reader) = SnapshotPublisher::new(Snapshot::new(map, 1));
        // Keep the sender alive so `changes()` receivers do not see a closed channel.
        std::mem::forget(publisher.changes);
        reader
    }
}
