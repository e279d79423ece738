//! What a sidekey last received from etcd, raw: the sealed values under the prefix with
//! their revisions, and the revision they reflect. The follower keeps it current, the
//! snapshot cache writes and reads it; nothing in it is opened.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The sealed values under the prefix as etcd last sent them, and the revision they reflect.
#[derive(Clone, Debug, Default)]
pub(crate) struct Mirror {
    /// Shared keys and values: a copy for the cache costs one reference count per record.
    records: BTreeMap<Arc<str>, (Arc<[u8]>, u64)>,
    pub(crate) revision: u64,
}

impl Mirror {
    /// Keeps a key-value; keys that are not UTF-8 are not sidekey's and are skipped.
    pub(crate) fn insert(&mut self, key: Vec<u8>, value: Vec<u8>, mod_revision: i64) {
        if let Ok(key) = String::from_utf8(key) {
            let revision = u64::try_from(mod_revision).unwrap_or(0);
            self.records.insert(key.into(), (value.into(), revision));
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8], u64)> {
        self.records.iter().map(|(k, (v, r))| (&**k, &**v, *r))
    }

    pub(crate) fn remove(&mut self, key: &str) {
        self.records.remove(key);
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }
}
