//! The etcd snapshot cache: the last state this sidekey received from etcd, in
//! `<data-dir>/etcd-snapshot.sealed`, so that a sidekey started while etcd is down serves
//! its tenants instead of nothing.
//!
//! The file holds the sealed values exactly as etcd sent them (records stay sealed whole,
//! their secrets sealed inside) with their revisions, in chunks of [`CHUNK`] records, each
//! chunk sealed once more under the master keyring with the etcd prefix, the revision, its
//! index and the number of chunks bound in. So a file is written and read a chunk at a time
//! (memory stays flat with 10,000 tenants), and an altered, truncated, reordered, spliced or
//! foreign cache does not open (it is then ignored with a warning, as if absent).
//!
//! Format: a header line `sidekey-etcd-cache 1 <revision> <chunks>`, then one sealed chunk
//! per line (the JSON array `[[key, value, mod_revision], ...]`), nothing else. It is replaced
//! atomically
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves the old or the
//! new cache, never a torn one. Only the follower writes it, from what etcd sent: it is never
//! newer than what etcd acknowledged.

use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StoreError;
use super::etcd_mirror::Mirror;
use super::files;
use super::master_key::MasterKeys;
use super::sealing;

/// The cache file inside `--data-dir`.
pub const CACHE_FILE: &str = "etcd-snapshot.sealed";
const TEMP_FILE: &str = "etcd-snapshot.sealed.new";
const CACHE_DOMAIN: &str = "sidekey etcd snapshot cache v1";
const HEADER: &str = "sidekey-etcd-cache 1";
/// Records per sealed chunk.
const CHUNK: usize = 256;

#[derive(Clone, Debug)]
pub(crate) struct SnapshotCache {
    dir: PathBuf,
    prefix: String,
}

/// One record of a chunk: etcd key, sealed value (text), mod_revision.
type Entry = (String, String, u64);

impl SnapshotCache {
    pub(crate) fn new(dir: &Path, prefix: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    /// The place a chunk is sealed for: the file's identity and the chunk's position.
    fn place(&self, revision: u64, index: usize, chunks: usize) -> String {
        format!("etcd-cache/{}/{revision}/{index}/{chunks}", self.prefix)
    }

    /// The cached mirror, `None` when there is none or it does not open (warned).
    pub(crate) async fn read(&self, keys: Arc<MasterKeys>) -> Result<Option<Mirror>, StoreError> {
        let path = self.dir.join(CACHE_FILE);
        let this = self.clone();
        let read = tokio::task::spawn_blocking(move || this.read_blocking(&path, &keys))
            .await
            .map_err(|e| StoreError::Backend(format!("the cache task failed: {e}")))?;
        match read {
            Ok(mirror) => Ok(mirror),
            Err(reason) => {
                tracing::warn!(path = %self.dir.join(CACHE_FILE).display(), reason,
                    "the etcd snapshot cache does not open (another master key or prefix, or \
                     altered); ignoring it");
                Ok(None)
            }
        }
    }

    fn read_blocking(&self, path: &Path, keys: &MasterKeys) -> Result<Option<Mirror>, String> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open it: {e}")),
        };
        let mut lines = BufReader::new(file).lines();
        let mut next = || -> Result<Option<String>, String> {
            lines
                .next()
                .transpose()
                .map_err(|e| format!("cannot read it: {e}"))
        };
        let header = next()?.ok_or("it is empty")?;
        let (revision, chunks) = header
            .strip_prefix(HEADER)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(r, c)| Some((r.parse::<u64>().ok()?, c.parse::<usize>().ok()?)))
            .ok_or("not a snapshot cache (bad header)")?;
        let mut mirror = Mirror::default();
        for index in 0..chunks {
            let line = next()?.ok_or("truncated")?;
            let json = sealing::open_in(
                CACHE_DOMAIN,
                keys,
                &self.place(revision, index, chunks),
                &line,
            )
            .map_err(|e| e.to_string())?;
            let entries: Vec<Entry> =
                serde_json::from_slice(&json).map_err(|e| format!("chunk {index}: {e}"))?;
            for (key, value, mod_revision) in entries {
                let mod_revision = i64::try_from(mod_revision)
                    .map_err(|_| format!("chunk {index}: revision out of range"))?;
                mirror.insert(key.into_bytes(), value.into_bytes(), mod_revision);
            }
        }
        if next()?.is_some() {
            return Err("data after the last chunk".into());
        }
        mirror.revision = revision;
        Ok(Some(mirror))
    }

    /// Replaces the cache with `mirror`, atomically.
    pub(crate) async fn write(
        &self,
        keys: Arc<MasterKeys>,
        mirror: Mirror,
    ) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_blocking(&keys, &mirror))
            .await
            .map_err(|e| StoreError::Backend(format!("the cache task failed: {e}")))?
    }

    fn write_blocking(&self, keys: &MasterKeys, mirror: &Mirror) -> Result<(), StoreError> {
        let io =
            |e: io::Error| StoreError::Io(format!("cannot write the etcd snapshot cache: {e}"));
        // Sealed values are text; anything else would not open anyway.
        let entries: Vec<(&str, &str, u64)> = mirror
            .iter()
            .filter_map(|(k, v, r)| std::str::from_utf8(v).ok().map(|v| (k, v, r)))
            .collect();
        let chunks = entries.len().div_ceil(CHUNK);
        let revision = mirror.revision;
        replace(&self.dir, |out| {
            writeln!(out, "{HEADER} {revision} {chunks}")?;
            for (index, chunk) in entries.chunks(CHUNK).enumerate() {
                let json = serde_json::to_vec(chunk).map_err(io::Error::other)?;
                let sealed = sealing::seal_in(
                    CACHE_DOMAIN,
                    keys,
                    &self.place(revision, index, chunks),
                    &json,
                )
                .map_err(io::Error::other)?;
                writeln!(out, "{sealed}")?;
            }
            Ok(())
        })
        .map_err(io)
    }
}

/// Temporary file (0600) filled by `fill`, fsync, rename over the cache, fsync of the
/// directory.
fn replace(
    dir: &Path,
    fill: impl FnOnce(&mut BufWriter<std::fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    files::ensure_private_dir(dir)?;
    let temp = dir.join(TEMP_FILE);
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut out = BufWriter::new(files::create_private_file(&temp)?);
    fill(&mut out)?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(CACHE_FILE))?;
    files::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{KEY_A, KEY_B, key_ring};

    fn keys() -> Arc<MasterKeys> {
        Arc::new(key_ring(KEY_A))
    }

    fn mirror(n: usize) -> Mirror {
        let mut m = Mirror::default();
        for i in 0..n {
            let key = format!("/sidekey/tenants/t{i}").into_bytes();
            m.insert(key, format!("v1.sealed-{i}").into_bytes(), 10 + i as i64);
        }
        m.revision = 10 + n as u64;
        m
    }

    fn entries(m: &Mirror) -> Vec<(String, Vec<u8>, u64)> {
        m.iter()
            .map(|(k, v, r)| (k.to_owned(), v.to_vec(), r))
            .collect()
    }

    #[tokio::test]
    async fn round_trip_over_several_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), "/sidekey/");
        assert!(cache.read(keys()).await.unwrap().is_none());
        let written = mirror(CHUNK * 2 + 3);
        cache.write(keys(), written.clone()).await.unwrap();
        let read = cache.read(keys()).await.unwrap().unwrap();
        assert_eq!(read.revision, written.revision);
        assert_eq!(entries(&read), entries(&written));
        let text = std::fs::read_to_string(dir.path().join(CACHE_FILE)).unwrap();
        assert_eq!(text.lines().count(), 1 + 3);
        assert!(
            !text.contains("sealed-"),
            "records are sealed again in the cache"
        );
        assert!(!dir.path().join(TEMP_FILE).exists());
    }

    #[tokio::test]
    async fn an_altered_truncated_reordered_or_foreign_cache_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), "/sidekey/");
        let written = mirror(CHUNK * 2 + 3);
        let revision = written.revision;
        cache.write(keys(), written).await.unwrap();
        let path = dir.path().join(CACHE_FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let mut flipped = lines[2].to_owned().into_bytes();
        flipped[40] = if flipped[40] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let variants = [
            // Truncated: the last chunk dropped.
            lines[..3].join("\n"),
            // Reordered chunks.
            [lines[0], lines[2], lines[1], lines[3]].join("\n"),
            // The header claims another revision.
            [
                format!("{HEADER} {} 3", revision - 1).as_str(),
                lines[1],
                lines[2],
                lines[3],
            ]
            .join("\n"),
            // One character of a chunk changed.
            [lines[0], lines[1], &flipped, lines[3]].join("\n"),
            // Extra data.
            format!("{good}junk\n"),
            String::new(),
        ];
        for (i, bad) in variants.iter().enumerate() {
            std::fs::write(&path, bad).unwrap();
            assert!(
                cache.read(keys()).await.unwrap().is_none(),
                "variant {i} opened"
            );
        }
        std::fs::write(&path, &good).unwrap();
        let other_prefix = SnapshotCache::new(dir.path(), "/other/");
        assert!(other_prefix.read(keys()).await.unwrap().is_none());
        let other_key = Arc::new(key_ring(KEY_B));
        assert!(cache.read(other_key).await.unwrap().is_none());
        assert!(cache.read(keys()).await.unwrap().is_some());
    }
}
