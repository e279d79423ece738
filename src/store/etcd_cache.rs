//! The etcd snapshot cache: the last state this sidekey received from etcd, in
//! `<data-dir>/etcd-snapshot.sealed`, so that a sidekey started while etcd is down serves
//! its tenants instead of nothing.
//!
//! The file holds the sealed values exactly as etcd sent them (records stay sealed whole,
//! their secrets sealed inside) with their revisions, and the whole is sealed once more under
//! the master keyring with the etcd prefix bound in: an altered, truncated or foreign cache
//! does not open (it is then ignored with a warning, as if absent). It is replaced atomically
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves the old or the
//! new cache, never a torn one. Only the follower writes it, from what etcd sent: it is never
//! newer than what etcd acknowledged.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::etcd_follow::Mirror;
use super::files;
use super::master_key::MasterKeys;
use super::sealing;

/// The cache file inside `--data-dir`.
pub const CACHE_FILE: &str = "etcd-snapshot.sealed";
const TEMP_FILE: &str = "etcd-snapshot.sealed.new";
const CACHE_DOMAIN: &str = "sidekey etcd snapshot cache v1";

#[derive(Clone, Debug)]
pub(crate) struct SnapshotCache {
    dir: PathBuf,
    prefix: String,
}

#[derive(Serialize, Deserialize)]
struct CacheDoc {
    revision: u64,
    /// (etcd key, sealed value, mod_revision)
    records: Vec<(String, String, u64)>,
}

impl SnapshotCache {
    pub(crate) fn new(dir: &Path, prefix: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    fn place(&self) -> String {
        format!("etcd-cache/{}", self.prefix)
    }

    /// The cached mirror, `None` when there is none or it does not open (warned).
    pub(crate) async fn read(&self, keys: &MasterKeys) -> Result<Option<Mirror>, StoreError> {
        let path = self.dir.join(CACHE_FILE);
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the etcd snapshot cache; ignoring it");
                return Ok(None);
            }
        };
        let opened = sealing::open_in(CACHE_DOMAIN, keys, &self.place(), text.trim_end())
            .map_err(|e| e.to_string())
            .and_then(|json| serde_json::from_slice::<CacheDoc>(&json).map_err(|e| e.to_string()));
        match opened {
            Ok(doc) => {
                let mut mirror = Mirror::default();
                for (key, value, revision) in doc.records {
                    mirror.insert(
                        key.into_bytes(),
                        value.into_bytes(),
                        i64::try_from(revision).unwrap_or(0),
                    );
                }
                mirror.revision = doc.revision;
                Ok(Some(mirror))
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason,
                    "the etcd snapshot cache does not open (other master key or prefix, or \
                     altered); ignoring it");
                Ok(None)
            }
        }
    }

    /// Replaces the cache with `mirror`, atomically.
    pub(crate) async fn write(&self, keys: &MasterKeys, mirror: Mirror) -> Result<(), StoreError> {
        let doc = CacheDoc {
            revision: mirror.revision,
            records: mirror
                .iter()
                .filter_map(|(k, v, r)| {
                    // Sealed values are text; anything else would not open anyway.
                    std::str::from_utf8(v)
                        .ok()
                        .map(|v| (k.to_owned(), v.to_owned(), r))
                })
                .collect(),
        };
        let json = serde_json::to_vec(&doc)
            .map_err(|e| StoreError::Backend(format!("cannot encode the snapshot cache: {e}")))?;
        let sealed = sealing::seal_in(CACHE_DOMAIN, keys, &self.place(), &json)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || replace(&dir, sealed.as_bytes()))
            .await
            .map_err(|e| StoreError::Backend(format!("the cache task failed: {e}")))?
            .map_err(|e| StoreError::Io(format!("cannot write the etcd snapshot cache: {e}")))
    }
}

/// Temporary file (0600), fsync, rename over the cache, fsync of the directory.
fn replace(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    files::ensure_private_dir(dir)?;
    let temp = dir.join(TEMP_FILE);
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = files::create_private_file(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(CACHE_FILE))?;
    files::sync_dir(dir)
}
