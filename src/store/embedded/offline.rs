//! The embedded store's offline tools, `sidekey store verify` and `sidekey store backup`, and
//! the read-only check [`EmbeddedStore::open`](super::EmbeddedStore::open) makes before it
//! opens a file for writing. Everything here opens the file read-only, in redb's
//! single-writer mode, so it runs beside a live `sidekey serve` and never changes the file.

use std::fs;
use std::path::{Path, PathBuf};

use redb::{
    Builder, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableHandle,
};

use super::{
    CACHE_BYTES, CONCURRENCY, META, META_REVISION, META_SCHEMA, PARTNER, TENANTS, backend,
    check_file_kind, check_key, check_schema, guard, load_txn, open_error, read_u64,
};
use crate::store::StoreError;
use crate::store::files;
use crate::store::master_key::MasterKeys;

/// What `sidekey store verify` reports of a store that checked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub schema_version: u64,
    pub revision: u64,
    pub tenants: usize,
    pub partner_defaults: bool,
}

/// Checks, without writing anything, that the store at `path` opens under `keys`: schema,
/// key check, and that every record authenticates. For `sidekey store verify` and for the
/// start-up check.
pub fn verify_file(path: &Path, keys: &MasterKeys) -> Result<VerifyReport, StoreError> {
    check_file_kind(path)?;
    verify(path, keys).map_err(|e| match e {
        VerifyError::NeedsRepair => StoreError::Backend(format!(
            "{} was not closed cleanly (a crash or kill -9) and needs the repair redb makes \
             when sidekey serve opens it: start sidekey on it once, or verify a backup",
            path.display()
        )),
        VerifyError::Refused(e) => e,
    })
}

/// Copies the store at `path` to a new file `out` (mode 0600), records still sealed: a
/// consistent snapshot of the last commit, read while `sidekey serve` may be running. The
/// copy is written under a temporary name, synced, then renamed to `out`. Needs no key.
pub fn backup_file(path: &Path, out: &Path) -> Result<VerifyReport, StoreError> {
    check_file_kind(path)?;
    if out.exists() {
        return Err(StoreError::Backend(format!(
            "{} already exists: give a new file for the backup",
            out.display()
        )));
    }
    let source = open_read_only(path).map_err(|e| match e {
        VerifyError::NeedsRepair => StoreError::Backend(format!(
            "{} was not closed cleanly (a crash or kill -9): start sidekey serve on it once \
             before a backup",
            path.display()
        )),
        VerifyError::Refused(e) => e,
    })?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| StoreError::Backend(format!("{} is not a file name", out.display())))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    files::create_private_file(&tmp)
        .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", tmp.display())))?;
    let copied = guard(|| {
        let db = Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&tmp)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", tmp.display())))?;
        let read = source.begin_read().map_err(backend)?;
        let mut write = db.begin_write().map_err(backend)?;
        write
            .set_durability(Durability::Immediate)
            .map_err(backend)?;
        let mut report = VerifyReport {
            schema_version: 0,
            revision: 0,
            tenants: 0,
            partner_defaults: false,
        };
        for def in [META, TENANTS, PARTNER] {
            let from = match read.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(backend(e)),
            };
            let mut to = write.open_table(def).map_err(backend)?;
            for entry in from.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                to.insert(k.value(), v.value()).map_err(backend)?;
            }
            if def.name() == TENANTS.name() {
                report.tenants = usize::try_from(from.len().map_err(backend)?).unwrap_or(0);
            }
            if def.name() == PARTNER.name() {
                report.partner_defaults = !from.is_empty().map_err(backend)?;
            }
            if def.name() == META.name() {
                report.schema_version = read_u64(&from, META_SCHEMA)?.unwrap_or(0);
                report.revision = read_u64(&from, META_REVISION)?.unwrap_or(0);
            }
        }
        write.commit().map_err(backend)?;
        Ok(report)
    });
    let report = match copied {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let done = fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|()| fs::rename(&tmp, out))
        .and_then(|()| files::sync_dir(&dir));
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Backend(format!(
            "cannot write {}: {e}",
            out.display()
        )));
    }
    Ok(report)
}

pub(super) enum VerifyError {
    /// The file needs the repair only a write open makes.
    NeedsRepair,
    Refused(StoreError),
}

impl From<StoreError> for VerifyError {
    fn from(e: StoreError) -> Self {
        VerifyError::Refused(e)
    }
}

fn open_read_only(path: &Path) -> Result<redb::ReadOnlyDatabase, VerifyError> {
    let opened = guard(|| {
        Ok(Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_concurrency_mode(CONCURRENCY)
            .open_read_only(path))
    })?;
    match opened {
        Ok(db) => Ok(db),
        Err(DatabaseError::RepairAborted) => Err(VerifyError::NeedsRepair),
        Err(e) => Err(VerifyError::Refused(open_error(e, path))),
    }
}

pub(super) fn verify(path: &Path, keys: &MasterKeys) -> Result<VerifyReport, VerifyError> {
    let db = open_read_only(path)?;
    let report = guard(|| {
        let txn = db.begin_read().map_err(backend)?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Err(StoreError::Corrupted(format!(
                    "{} is a redb database without sidekey's tables: it is not a sidekey store",
                    path.display()
                )));
            }
            Err(e) => return Err(backend(e)),
        };
        let schema_version = check_schema(&meta, path)?;
        check_key(&meta, keys, path)?;
        drop(meta);
        let state = load_txn(&txn, keys, schema_version).map_err(|e| match e {
            StoreError::Record(msg) => StoreError::Record(format!(
                "{msg}. sidekey does not start on a store holding a record it cannot \
                 authenticate, rather than serve or drop it: restore {} from a backup \
                 (sidekey store verify --file BACKUP checks one first)",
                path.display()
            )),
            other => other,
        })?;
        Ok(VerifyReport {
            schema_version,
            revision: state.revision,
            tenants: state.tenants.len(),
            partner_defaults: state.partner.revision != 0,
        })
    })?;
    Ok(report)
}
