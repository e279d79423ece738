//! The embedded store: one redb database in `--data-dir`, every record sealed as a whole
//! under the master keyring ([`record`]) and every secret inside it sealed again
//! ([`sealing`]).
//!
//! Tables: `tenants` (id → sealed record), `partner` (the singleton), `meta` (the store-wide
//! revision, the schema version, and a sealed key-check value). A record is the serde_json of
//! the `*Doc` structs of [`doc`] (each secret replaced by its sealed string), sealed with
//! the record's table and key as associated data: any altered byte, or a record copied onto
//! another key, fails to open with an error naming the record.
//!
//! Opening (see [`EmbeddedStore::open`]):
//! - no file: a new store is created under a temporary name, synced, renamed into place, and
//!   the directory synced, so a crash never leaves a half-made `sidekey.redb`;
//! - an empty or unrecognised file is refused, never taken for a new store;
//! - an existing file is first opened read-only and checked whole (key check, every record
//!   authenticates), so a refused start leaves it byte-for-byte unchanged; only then is it
//!   opened for writing, upgraded from schema 1 (records not yet sealed whole) and re-sealed
//!   under the active key if an older one sealed anything (rotation), in one transaction.
//!
//! Failures at run time: after an I/O error (disk full, EIO) redb refuses every later
//! operation until the database is reopened. The store reopens it itself, before the next
//! operation and every [`RECOVERY_INTERVAL`] in the background, and reports its state in
//! [`StoreHealth`]. A commit that failed may still have reached the disk; the store keeps the
//! records' previous bytes and puts them back on reopening, so a write the client was told
//! failed never appears later, and the catalog (which publishes only acknowledged writes)
//! stays equal to what is on disk.

use std::fs;
use std::io::{self, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::Deserialize;

use crate::model::PartnerRecord;
use crate::store::backend::{self, BackendOpener, Boxed};
use crate::store::files;
use crate::store::health::StoreHealth;
use crate::store::master_key::{KeyId, MASTER_KEY_ENV, MasterKeys};
use crate::store::record::{self, RecordKind};
use crate::store::sealing;
use crate::store::{Expect, Mutation, Store, StoreError, StoredState};

mod offline;

use super::codec::{self, write_record};
use super::doc::{PARTNER_PLACE, PartnerDoc, TenantDoc, seal_error, tenant_place};

use offline::{VerifyError, verify};
pub use offline::{VerifyReport, backup_file, verify_file};

pub use crate::store::files::DATA_FILE;

/// Where a new store is built before it is renamed to [`DATA_FILE`].
const NEW_DATA_FILE: &str = "sidekey.redb.new";

/// The layout this code writes. 1: secrets sealed, other fields plain (upgraded at open);
/// 2: every record sealed whole. A database with a higher version was written by a newer
/// sidekey and is refused rather than misread.
pub const SCHEMA_VERSION: u64 = 2;

/// The first bytes of every redb file.
const REDB_MAGIC: &[u8] = b"redb";

/// redb's page cache: 4 MiB (redb's default is 1 GiB). The store is read whole once at
/// start-up and then only written, so a large cache would only keep the start-up read in
/// memory for the life of the process.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// How often a failing store retries reopening its database in the background (it also
/// retries before every operation).
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);

/// One process writes; others (`sidekey store backup|verify`) may open the file read-only
/// meanwhile and read a consistent snapshot.
const CONCURRENCY: ConcurrencyMode = ConcurrencyMode::SingleWriter;

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const PARTNER: TableDefinition<&str, &[u8]> = TableDefinition::new("partner");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const PARTNER_KEY: &str = "defaults";
const META_REVISION: &str = "revision";
const META_SCHEMA: &str = "schema_version";
const META_KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLACE: &str = "meta/key_check";
const KEY_CHECK_VALUE: &[u8] = b"sidekey master key check";

/// The embedded [`Store`]. Only this process writes it, so [`Store::watch`] is `None`.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    keys: MasterKeys,
    opener: BackendOpener,
    health: StoreHealth,
    state: Mutex<DbState>,
}

struct DbState {
    /// `None` after a failure, until the database is reopened.
    db: Option<Database>,
    /// A commit that failed but may have reached the disk, to undo on reopening.
    undo: Option<Undo>,
    /// A background recovery thread is running.
    recovering: bool,
    /// The store was dropped: nothing may reopen the database.
    closed: bool,
}

/// What a batch overwrote, to put back if its failed commit reached the disk after all.
struct Undo {
    attempted: u64,
    previous_revision: u64,
    records: Vec<(RecordKind, String, Option<Vec<u8>>)>,
}

impl Drop for EmbeddedStore {
    /// Closes the database now, releasing the file's lock, even while a recovery thread
    /// still holds the shared state.
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        state.closed = true;
        state.db = None;
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("active_key_id", &self.inner.keys.active().id())
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens the store in `data_dir`, creating the directory (0700) and a new store (0600)
    /// when it holds none. Fails with [`StoreError::Key`] when no key of `keys` opens the
    /// data, with [`StoreError::Corrupted`] when the file or a record is damaged or altered
    /// (naming what), leaving the file unchanged either way.
    ///
    /// Blocking (file I/O and fsync): call it at start-up or inside `spawn_blocking`.
    pub fn open(data_dir: &Path, keys: MasterKeys) -> Result<Self, StoreError> {
        Self::open_with_backend(data_dir, keys, Arc::new(backend::file_backend))
    }

    /// [`EmbeddedStore::open`] over the storage `opener` gives for the database file (tests
    /// pass one that injects I/O faults). The read-only check before opening reads the file
    /// directly.
    pub fn open_with_backend(
        data_dir: &Path,
        keys: MasterKeys,
        opener: BackendOpener,
    ) -> Result<Self, StoreError> {
        files::ensure_private_dir(data_dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DATA_FILE);
        match fs::metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_new(data_dir, &path, &keys, &opener)?;
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        }
        check_file_kind(&path)?;
        // Everything that can refuse the start is checked before the file is opened for
        // writing.
        match verify(&path, &keys) {
            Ok(_) => {}
            // A writer killed mid-way leaves the file for redb to repair, which takes a
            // write open; the checks are repeated there before anything else is written.
            Err(VerifyError::NeedsRepair) => tracing::warn!(
                path = %path.display(),
                "the store was not closed cleanly: redb repairs it while opening"
            ),
            Err(VerifyError::Refused(e)) => return Err(e),
        }
        let db = open_db(&opener, &path)?;
        let store = Self {
            inner: Arc::new(Inner {
                path,
                keys,
                opener,
                health: StoreHealth::new(),
                state: Mutex::new(DbState {
                    db: None,
                    undo: None,
                    recovering: false,
                    closed: false,
                }),
            }),
        };
        store.inner.upgrade_and_rotate(&db)?;
        store.inner.lock().db = Some(db);
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's health, for `/readyz` and the metric.
    pub fn health(&self) -> StoreHealth {
        self.inner.health.clone()
    }
}

/// Refuses a file that is not a redb database (empty, truncated to nothing, something else),
/// before redb sees it: redb would initialise an empty file as a new database.
fn check_file_kind(path: &Path) -> Result<(), StoreError> {
    let mut head = [0u8; REDB_MAGIC.len()];
    let mut file = fs::File::open(path)
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| StoreError::Backend(format!("cannot read {}: {e}", path.display())))?
        .len();
    if len == 0 {
        return Err(StoreError::Corrupted(format!(
            "{} is empty (0 bytes), so it holds no tenants; sidekey will not take it for a new \
             store. Restore it from a backup, or remove it to start a new, empty store",
            path.display()
        )));
    }
    let read = file.read_exact(&mut head);
    if read.is_err() || head != REDB_MAGIC {
        return Err(StoreError::Corrupted(format!(
            "{} ({len} bytes) is not a redb database. Restore it from a backup, or move it \
             away to start a new, empty store",
            path.display()
        )));
    }
    Ok(())
}

/// Builds a new, empty store under a temporary name and renames it into place.
fn create_new(
    dir: &Path,
    path: &Path,
    keys: &MasterKeys,
    opener: &BackendOpener,
) -> Result<(), StoreError> {
    let tmp = dir.join(NEW_DATA_FILE);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Backend(format!(
            "cannot create a new store {}: {what}: {e}",
            path.display()
        ))
    };
    // A leftover from a creation that crashed before its rename: it was never the store.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("removing a leftover", &e)),
    }
    files::create_private_file(&tmp).map_err(|e| failed("creating the file", &e))?;
    let created = guard(|| {
        let storage = opener(&tmp).map_err(|e| failed("opening the file", &e))?;
        let db = Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_concurrency_mode(CONCURRENCY)
            .create_with_backend(Boxed(storage))
            .map_err(|e| failed("initialising the database", &e))?;
        initialise(&db, keys)
    });
    let done = created.and_then(|()| {
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&tmp, path))
            .and_then(|()| files::sync_dir(dir))
            .map_err(|e| failed("syncing and renaming", &e))
    });
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    tracing::info!(path = %path.display(), key_id = %keys.active().id(), "created a new store");
    Ok(())
}

fn initialise(db: &Database, keys: &MasterKeys) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    txn.open_table(TENANTS).map_err(backend)?;
    txn.open_table(PARTNER).map_err(backend)?;
    {
        let mut meta = txn.open_table(META).map_err(backend)?;
        meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())
            .map_err(backend)?;
        meta.insert(META_REVISION, 0u64.to_be_bytes().as_slice())
            .map_err(backend)?;
    }
    write_key_check(&txn, keys)?;
    txn.commit().map_err(backend)
}

fn open_db(opener: &BackendOpener, path: &Path) -> Result<Database, StoreError> {
    // redb initialises an empty file as a new database: never let it see one.
    check_file_kind(path)?;
    guard(|| {
        let storage = opener(path).map_err(|e| {
            StoreError::Io(format!("cannot open the database {}: {e}", path.display()))
        })?;
        Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_concurrency_mode(CONCURRENCY)
            .create_with_backend(Boxed(storage))
            .map_err(|e| open_error(e, path))
    })
}

/// Runs redb work, turning a panic inside redb (which a damaged file can cause) into an error.
fn guard<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "redb panicked".into());
            Err(StoreError::Corrupted(format!(
                "redb failed reading it: {what}"
            )))
        }
    }
}

fn check_schema(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
) -> Result<u64, StoreError> {
    match read_u64(meta, META_SCHEMA)? {
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::Backend(format!(
            "{} was written by a newer sidekey (schema version {v}; this one reads up to \
             {SCHEMA_VERSION})",
            path.display()
        ))),
        Some(v) if v >= 1 => Ok(v),
        _ => Err(StoreError::Corrupted(format!(
            "{} has no valid schema version: it is not a sidekey store, or it is damaged",
            path.display()
        ))),
    }
}

/// Checks that the ring opens the key check; returns the id of the key that sealed it.
fn check_key(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    keys: &MasterKeys,
    path: &Path,
) -> Result<KeyId, StoreError> {
    let key_check = meta
        .get(META_KEY_CHECK)
        .map_err(backend)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned())
        .ok_or_else(|| StoreError::Corrupted(format!("{} has no key check", path.display())))?;
    let sealed_with = sealing::key_id(&key_check).ok_or_else(|| {
        StoreError::Corrupted(format!("the key check in {} is malformed", path.display()))
    })?;
    if keys.get(sealed_with).is_none() {
        return Err(StoreError::Key(format!(
            "the master key does not match this data directory (it was sealed with key id \
             {sealed_with}; the configured key{} {}): supply the right --master-key-file or \
             {MASTER_KEY_ENV}",
            if keys.ids().count() == 1 {
                " has id"
            } else {
                "s have ids"
            },
            join_ids(keys.ids()),
        )));
    }
    let opened = sealing::open(keys, KEY_CHECK_PLACE, &key_check).map_err(|_| {
        StoreError::Key(format!(
            "the key check in {} does not open with master key id {sealed_with}: the \
             database is corrupted, or a different key happens to share that id",
            path.display()
        ))
    })?;
    if opened.as_slice() != KEY_CHECK_VALUE {
        return Err(StoreError::Corrupted(format!(
            "the key check in {} holds an unexpected value",
            path.display()
        )));
    }
    Ok(sealed_with)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, DbState> {
        // DbState stays consistent whatever a panicking holder did: a panic inside redb is
        // caught before it unwinds through the guard.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// At open: upgrades a schema-1 store (seals every record whole) and re-seals under the
    /// active key whatever an older key sealed, in one durable transaction, after checking
    /// the key again (a repaired file was not checked read-only).
    fn upgrade_and_rotate(&self, db: &Database) -> Result<(), StoreError> {
        guard(|| {
            let keys = &self.keys;
            let active = keys.active().id();
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate).map_err(backend)?;
            let (schema, sealed_with) = {
                let meta = txn.open_table(META).map_err(backend)?;
                (
                    check_schema(&meta, &self.path)?,
                    check_key(&meta, keys, &self.path)?,
                )
            };
            let mut old_ids: Vec<KeyId> = Vec::new();
            let mut counts = Rewrite::default();
            rewrite_records(&txn, keys, schema, &mut old_ids, &mut counts)?;
            if sealed_with != active {
                old_ids.push(sealed_with);
                write_key_check(&txn, keys)?;
            }
            if schema < SCHEMA_VERSION {
                let mut meta = txn.open_table(META).map_err(backend)?;
                meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())
                    .map_err(backend)?;
            }
            if counts.records == 0 && sealed_with == active && schema == SCHEMA_VERSION {
                txn.abort().map_err(backend)?;
                return Ok(());
            }
            txn.commit().map_err(backend)?;
            if schema < SCHEMA_VERSION {
                tracing::info!(path = %self.path.display(), from = schema, to = SCHEMA_VERSION,
                    records = counts.records,
                    "store upgraded: every record is now sealed whole under the master key");
            }
            if !old_ids.is_empty() {
                old_ids.sort_by_key(|id| id.to_string());
                old_ids.dedup();
                tracing::info!(
                    path = %self.path.display(),
                    from_key_ids = %join_ids(old_ids.iter().copied()),
                    to_key_id = %active,
                    secrets = counts.secrets,
                    "master key rotation finished: everything is now sealed with the active \
                     key, so the older keys can be removed from the keyring"
                );
            }
            Ok(())
        })
    }

    /// Runs `f` on the open database, first reopening it if an earlier failure closed it.
    /// An I/O error or a panic from `f` closes it again and marks the store failing.
    fn run<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&Database, &mut Option<Undo>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.lock();
        if (state.db.is_none() || state.undo.is_some())
            && let Err(e) = self.recover(&mut state)
        {
            self.failing(&mut state, &e);
            return Err(e);
        }
        let Some(db) = state.db.as_ref() else {
            return Err(StoreError::Io("the database is closed".into()));
        };
        let mut undo = None;
        let result = guard(|| f(db, &mut undo));
        if undo.is_some() {
            state.undo = undo;
        }
        match result {
            Err(e @ (StoreError::Io(_) | StoreError::Corrupted(_))) => {
                self.failing(&mut state, &e);
                Err(e)
            }
            Err(e) if state.undo.is_some() => {
                self.failing(&mut state, &e);
                Err(e)
            }
            other => other,
        }
    }

    /// Closes the database after a failure, reports it, and starts retrying in the
    /// background.
    fn failing(self: &Arc<Self>, state: &mut DbState, e: &StoreError) {
        state.db = None;
        self.health.set_failing(&e.to_string());
        if !state.recovering {
            state.recovering = true;
            let inner = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("sidekey-store-recovery".into())
                .spawn(move || recovery_loop(&inner));
            if spawned.is_err() {
                state.recovering = false;
            }
        }
    }

    /// Reopens the database and undoes a failed commit that reached the disk.
    fn recover(&self, state: &mut DbState) -> Result<(), StoreError> {
        if state.closed {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        // redb holds the file's lock until the old handle is gone.
        state.db = None;
        let db = open_db(&self.opener, &self.path)?;
        if let Some(undo) = &state.undo {
            guard(|| apply_undo(&db, undo))?;
            state.undo = None;
        }
        state.db = Some(db);
        self.health.set_healthy();
        Ok(())
    }
}

fn recovery_loop(inner: &std::sync::Weak<Inner>) {
    loop {
        std::thread::sleep(RECOVERY_INTERVAL);
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner.lock();
        if state.closed || (state.db.is_some() && state.undo.is_none()) {
            state.recovering = false;
            return;
        }
        match inner.recover(&mut state) {
            Ok(()) => {
                state.recovering = false;
                return;
            }
            Err(e) => {
                state.db = None;
                inner.health.set_failing(&e.to_string());
            }
        }
    }
}

/// Puts back what a failed commit overwrote, if that commit reached the disk after all.
fn apply_undo(db: &Database, undo: &Undo) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    {
        let mut meta = txn.open_table(META).map_err(backend)?;
        let now = read_u64(&meta, META_REVISION)?.unwrap_or(0);
        if now != undo.attempted {
            // The commit did not land: nothing to undo.
            drop(meta);
            txn.abort().map_err(backend)?;
            return Ok(());
        }
        meta.insert(
            META_REVISION,
            undo.previous_revision.to_be_bytes().as_slice(),
        )
        .map_err(backend)?;
    }
    for (kind, key, previous) in &undo.records {
        let mut table = txn.open_table(table_of(*kind)).map_err(backend)?;
        match previous {
            Some(bytes) => table.insert(key.as_str(), bytes.as_slice()).map(drop),
            None => table.remove(key.as_str()).map(drop),
        }
        .map_err(backend)?;
    }
    txn.commit().map_err(backend)?;
    tracing::warn!(
        revision = undo.attempted,
        "a write reported as failed had reached the disk; it was undone"
    );
    Ok(())
}

fn table_of(kind: RecordKind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match kind {
        RecordKind::Tenant => TENANTS,
        RecordKind::Partner => PARTNER,
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn load(&self) -> Result<StoredState, StoreError> {
        let inner = Arc::clone(&self.inner);
        run_blocking(move || {
            let keys = &inner.keys;
            inner.run(|db, _| load_blocking(db, keys))
        })
        .await
    }

    async fn commit_batch(&self, batch: Vec<(Mutation, Expect)>) -> Result<u64, StoreError> {
        let inner = Arc::clone(&self.inner);
        run_blocking(move || {
            let keys = &inner.keys;
            inner.run(|db, undo| commit_blocking(db, keys, batch, undo))
        })
        .await
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("the store task failed: {e}")))?
}

fn load_blocking(db: &impl ReadableDatabase, keys: &MasterKeys) -> Result<StoredState, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    load_txn(&txn, keys, SCHEMA_VERSION)
}

fn load_txn(
    txn: &redb::ReadTransaction,
    keys: &MasterKeys,
    schema: u64,
) -> Result<StoredState, StoreError> {
    let meta = txn.open_table(META).map_err(backend)?;
    let revision = read_u64(&meta, META_REVISION)?.unwrap_or(0);

    let table = txn.open_table(TENANTS).map_err(backend)?;
    let mut tenants = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (id, value) = entry.map_err(backend)?;
        let doc: TenantDoc =
            read_record(keys, schema, RecordKind::Tenant, id.value(), value.value())?;
        tenants.push(doc.open(keys, id.value())?);
    }

    let table = txn.open_table(PARTNER).map_err(backend)?;
    let partner = match table.get(PARTNER_KEY).map_err(backend)? {
        Some(value) => read_record::<PartnerDoc>(
            keys,
            schema,
            RecordKind::Partner,
            PARTNER_KEY,
            value.value(),
        )?
        .open(keys)?,
        None => PartnerRecord::default(),
    };
    Ok(StoredState {
        tenants,
        partner,
        revision,
    })
}

/// One write transaction: check each `expect` against its record's revision, write, bump the
/// store revision once, commit with immediate durability (redb's default, set explicitly
/// because the trait promises it): redb fsyncs before `commit` returns. Any failed check
/// drops the transaction, so nothing of the batch is written. If the commit itself fails,
/// `undo` gets what the batch overwrote.
fn commit_blocking(
    db: &Database,
    keys: &MasterKeys,
    batch: Vec<(Mutation, Expect)>,
    undo: &mut Option<Undo>,
) -> Result<u64, StoreError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    let mut previous = Vec::new();
    let (previous_revision, revision) = {
        let mut meta = txn.open_table(META).map_err(backend)?;
        let previous_revision = read_u64(&meta, META_REVISION)?.unwrap_or(0);
        let revision = previous_revision
            .checked_add(1)
            .ok_or_else(|| StoreError::Backend("the store revision overflowed".into()))?;
        for (mutation, expect) in batch {
            let (kind, key) = match &mutation {
                Mutation::PutTenant(r) => (RecordKind::Tenant, r.id.clone()),
                Mutation::DeleteTenant(id) => (RecordKind::Tenant, id.clone()),
                Mutation::PutPartner(_) => (RecordKind::Partner, PARTNER_KEY.to_owned()),
            };
            let mut table = txn.open_table(table_of(kind)).map_err(backend)?;
            let current_bytes = table
                .get(key.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_vec());
            let current = current_bytes
                .as_deref()
                .map(|bytes| stored_revision(keys, kind, &key, bytes))
                .transpose()?;
            check_expect(expect, current)?;
            if !previous.iter().any(|(k, id, _)| *k == kind && *id == key) {
                previous.push((kind, key.clone(), current_bytes));
            }
            match mutation {
                Mutation::PutTenant(mut record) => {
                    record.revision = revision;
                    let doc = TenantDoc::seal(keys, &record)?;
                    let bytes = write_record(keys, RecordKind::Tenant, &record.id, &doc)?;
                    table
                        .insert(record.id.as_str(), bytes.as_slice())
                        .map_err(backend)?;
                }
                // Deleting a record that is absent (with `Expect::Absent`) deletes nothing but
                // still counts as a write, like every commit whose precondition holds.
                Mutation::DeleteTenant(id) => {
                    table.remove(id.as_str()).map_err(backend)?;
                }
                Mutation::PutPartner(mut record) => {
                    record.revision = revision;
                    let doc = PartnerDoc::seal(keys, &record)?;
                    let bytes = write_record(keys, RecordKind::Partner, PARTNER_KEY, &doc)?;
                    table
                        .insert(PARTNER_KEY, bytes.as_slice())
                        .map_err(backend)?;
                }
            }
        }
        meta.insert(META_REVISION, revision.to_be_bytes().as_slice())
            .map_err(backend)?;
        (previous_revision, revision)
    };
    if let Err(e) = txn.commit() {
        *undo = Some(Undo {
            attempted: revision,
            previous_revision,
            records: previous,
        });
        return Err(backend(e));
    }
    Ok(revision)
}

fn stored_revision(
    keys: &MasterKeys,
    kind: RecordKind,
    key: &str,
    bytes: &[u8],
) -> Result<u64, StoreError> {
    match kind {
        RecordKind::Tenant => {
            read_record::<TenantDoc>(keys, SCHEMA_VERSION, kind, key, bytes).map(|d| d.revision)
        }
        RecordKind::Partner => {
            read_record::<PartnerDoc>(keys, SCHEMA_VERSION, kind, key, bytes).map(|d| d.revision)
        }
    }
}

fn check_expect(expect: Expect, current: Option<u64>) -> Result<(), StoreError> {
    match (expect, current) {
        (Expect::Absent, None) => Ok(()),
        (Expect::Revision(want), Some(have)) if want == have => Ok(()),
        _ => Err(StoreError::Conflict),
    }
}

#[derive(Default)]
struct Rewrite {
    records: usize,
    secrets: usize,
}

/// Rewrites, in `txn`, every record that is not sealed whole under the active key (a
/// schema-1 record, or one an older key sealed) or holds a secret an older key sealed, adding
/// those keys' ids to `old_ids`.
fn rewrite_records(
    txn: &WriteTransaction,
    keys: &MasterKeys,
    schema: u64,
    old_ids: &mut Vec<KeyId>,
    counts: &mut Rewrite,
) -> Result<(), StoreError> {
    let active = keys.active().id();
    let stale = |bytes: &[u8], old_ids: &mut Vec<KeyId>| -> bool {
        if schema < SCHEMA_VERSION {
            return true;
        }
        match record::key_id(bytes) {
            Some(id) if id == active => false,
            Some(id) => {
                old_ids.push(id);
                true
            }
            None => true,
        }
    };
    let mut table = txn.open_table(TENANTS).map_err(backend)?;
    let mut changed: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (id, value) = entry.map_err(backend)?;
        let id = id.value().to_owned();
        let mut doc: TenantDoc = read_record(keys, schema, RecordKind::Tenant, &id, value.value())?;
        let n = doc.connections.reseal(keys, &tenant_place(&id), old_ids)?;
        if n > 0 || stale(value.value(), old_ids) {
            counts.secrets += n;
            changed.push((
                id.clone(),
                write_record(keys, RecordKind::Tenant, &id, &doc)?,
            ));
        }
    }
    for (id, bytes) in changed {
        counts.records += 1;
        table
            .insert(id.as_str(), bytes.as_slice())
            .map_err(backend)?;
    }

    let mut table = txn.open_table(PARTNER).map_err(backend)?;
    let partner = table
        .get(PARTNER_KEY)
        .map_err(backend)?
        .map(|v| -> Result<_, StoreError> {
            let doc: PartnerDoc =
                read_record(keys, schema, RecordKind::Partner, PARTNER_KEY, v.value())?;
            Ok((doc, stale(v.value(), old_ids)))
        })
        .transpose()?;
    if let Some((mut doc, stale)) = partner {
        let n = doc.connections.reseal(keys, PARTNER_PLACE, old_ids)?;
        if n > 0 || stale {
            counts.secrets += n;
            counts.records += 1;
            let bytes = write_record(keys, RecordKind::Partner, PARTNER_KEY, &doc)?;
            table
                .insert(PARTNER_KEY, bytes.as_slice())
                .map_err(backend)?;
        }
    }
    Ok(())
}

fn write_key_check(txn: &WriteTransaction, keys: &MasterKeys) -> Result<(), StoreError> {
    let sealed = sealing::seal(keys, KEY_CHECK_PLACE, KEY_CHECK_VALUE).map_err(seal_error)?;
    let mut meta = txn.open_table(META).map_err(backend)?;
    meta.insert(META_KEY_CHECK, sealed.as_bytes())
        .map_err(backend)?;
    Ok(())
}

fn read_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    let Some(value) = table.get(key).map_err(backend)? else {
        return Ok(None);
    };
    let bytes: [u8; 8] = value
        .value()
        .try_into()
        .map_err(|_| StoreError::Corrupted(format!("the stored {key} is not a 64-bit number")))?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

fn open_error(e: DatabaseError, path: &Path) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Backend(format!(
                "the data directory {} is already in use by another sidekey process (it holds \
                 the lock on {}): stop that process, or give this one another --data-dir",
                path.parent().unwrap_or(path).display(),
                path.display()
            ))
        }
        // Reading past the end: the file is shorter than its own header says.
        DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == io::ErrorKind::UnexpectedEof =>
        {
            StoreError::Corrupted(format!(
                "{} is truncated or its header is damaged ({e})",
                path.display()
            ))
        }
        DatabaseError::Storage(redb::StorageError::Io(e)) => {
            StoreError::Io(format!("cannot open the database {}: {e}", path.display()))
        }
        other => StoreError::Corrupted(format!("{} cannot be opened: {other}", path.display())),
    }
}

/// Maps a redb error: I/O failures (the store must be reopened) apart from the rest.
fn backend(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            StoreError::Corrupted(format!("redb read past the end of the file ({e})"))
        }
        redb::Error::Io(e) => StoreError::Io(format!("redb: {e}")),
        redb::Error::PreviousIo => StoreError::Io("redb: an earlier I/O error".into()),
        redb::Error::Corrupted(what) => StoreError::Corrupted(format!("redb: {what}")),
        other => StoreError::Backend(format!("redb: {other}")),
    }
}

fn join_ids(ids: impl Iterator<Item = KeyId>) -> String {
    ids.map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
}

/// Opens a record read as `kind` under `key` (a schema-1 record is plain JSON) and decodes
/// it. serde_json errors quote at most a position and a type, and the documents hold only
/// sealed secrets, so the message cannot carry a secret.
fn read_record<T: for<'a> Deserialize<'a>>(
    keys: &MasterKeys,
    schema: u64,
    kind: RecordKind,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    if schema >= 2 {
        return codec::read_record(keys, kind, key, bytes);
    }
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Record(format!(
            "the stored {} record {key:?} does not decode: {e}",
            kind.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use crate::model::{Connections, M3terConn, MailkitConn, MiradoreConn, TenantRecord};
    use crate::secret::Secret;
    use crate::testing::LogCapture;

    use super::*;
    use crate::store::doc::ConnectionsDoc;

    use crate::testing::{KEY_A, KEY_B, key_ring};

    fn tenant(id: &str, secret: &str) -> TenantRecord {
        TenantRecord {
            id: id.into(),
            display_name: id.into(),
            connections: Connections {
                miradore: Some(MiradoreConn {
                    site: format!("{id}-site"),
                    api_key: Some(Secret::new(format!("{secret}-key"))),
                }),
                m3ter: Some(M3terConn {
                    access_key_id: "AK".into(),
                    api_secret: Some(Secret::new(secret)),
                    org_id: "org".into(),
                    environment: "production".into(),
                }),
                mailkit: Some(MailkitConn {
                    client_id: "1".into(),
                    client_md5: Some(Secret::new(format!("{secret}-md5"))),
                }),
            },
            revision: 0,
            create_time: SystemTime::now(),
            update_time: SystemTime::now(),
        }
    }

    fn with_db<T>(store: &EmbeddedStore, f: impl FnOnce(&Database) -> T) -> T {
        let state = store.inner.lock();
        f(state.db.as_ref().unwrap())
    }

    fn put(store: &EmbeddedStore, t: TenantRecord) -> u64 {
        with_db(store, |db| {
            commit_blocking(
                db,
                &store.inner.keys,
                vec![(Mutation::PutTenant(t), Expect::Absent)],
                &mut None,
            )
        })
        .unwrap()
    }

    fn load(store: &EmbeddedStore) -> Result<StoredState, StoreError> {
        with_db(store, |db| load_blocking(db, &store.inner.keys))
    }

    /// Rewrites the stored tenants behind the store's back.
    fn edit_raw(store: &EmbeddedStore, f: impl FnOnce(&mut redb::Table<&str, &[u8]>)) {
        with_db(store, |db| {
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(TENANTS).unwrap();
                f(&mut table);
            }
            txn.commit().unwrap();
        });
    }

    fn raw(table: &redb::Table<&str, &[u8]>, id: &str) -> Vec<u8> {
        table.get(id).unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn swapped_records_fail_to_open_naming_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap();
        put(&store, tenant("alpha", "alpha-secret-value"));
        put(&store, tenant("beta", "beta-secret-value"));
        edit_raw(&store, |table| {
            let (a, b) = (raw(table, "alpha"), raw(table, "beta"));
            table.insert("alpha", b.as_slice()).unwrap();
            table.insert("beta", a.as_slice()).unwrap();
        });
        let err = load(&store).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Record(_)), "{err:?}");
        assert!(msg.contains("tenant record \"alpha\""), "{msg}");
        assert!(msg.contains("failed to authenticate"), "{msg}");
        assert!(!msg.contains("secret-value"), "{msg}");
    }

    #[test]
    fn a_record_copied_under_another_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap();
        put(&store, tenant("alpha", "alpha-secret-value"));
        edit_raw(&store, |table| {
            let a = raw(table, "alpha");
            table.insert("gamma", a.as_slice()).unwrap();
        });
        let msg = load(&store).unwrap_err().to_string();
        assert!(msg.contains("tenant record \"gamma\""), "{msg}");
    }

    /// Schema 1 stored each record as plain JSON with only its secrets sealed; written here by
    /// hand as sidekey 0.x wrote it.
    fn write_v1_store(dir: &Path, keys: &MasterKeys, tenants: &[TenantRecord]) {
        let db = Database::create(dir.join(DATA_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(TENANTS).unwrap();
            for t in tenants {
                let doc = TenantDoc::seal(keys, t).unwrap();
                let json = serde_json::to_vec(&doc).unwrap();
                table.insert(t.id.as_str(), json.as_slice()).unwrap();
            }
            let mut partner = txn.open_table(PARTNER).unwrap();
            let doc = PartnerDoc::seal(
                keys,
                &PartnerRecord {
                    connections: tenant("p", "p-secret").connections,
                    revision: 1,
                    update_time: None,
                },
            )
            .unwrap();
            partner
                .insert(PARTNER_KEY, serde_json::to_vec(&doc).unwrap().as_slice())
                .unwrap();
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_SCHEMA, 1u64.to_be_bytes().as_slice())
                .unwrap();
            meta.insert(META_REVISION, 7u64.to_be_bytes().as_slice())
                .unwrap();
        }
        write_key_check(&txn, keys).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_schema_1_store_is_upgraded_once_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let ring = key_ring(KEY_A);
        let mut t = tenant("alpha", "alpha-secret-value");
        t.revision = 7;
        write_v1_store(dir.path(), &ring, &[t]);

        // A wrong key is refused before the upgrade: the file stays schema 1, unchanged.
        let before = std::fs::read(dir.path().join(DATA_FILE)).unwrap();
        assert!(EmbeddedStore::open(dir.path(), key_ring(KEY_B)).is_err());
        assert_eq!(std::fs::read(dir.path().join(DATA_FILE)).unwrap(), before);

        let capture = LogCapture::default();
        let store = capture.during(|| EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap());
        assert!(
            capture.text().contains("store upgraded"),
            "{}",
            capture.text()
        );
        let state = load(&store).unwrap();
        assert_eq!(state.revision, 7);
        assert_eq!(state.tenants.len(), 1);
        let alpha = &state.tenants[0];
        assert_eq!(alpha.revision, 7);
        let m = alpha.connections.miradore.as_ref().unwrap();
        assert_eq!(m.site, "alpha-site");
        assert_eq!(
            m.api_key.as_ref().unwrap().expose(),
            "alpha-secret-value-key"
        );
        assert!(state.partner.connections.m3ter.is_some());
        with_db(&store, |db| {
            let txn = db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert_eq!(read_u64(&meta, META_SCHEMA).unwrap(), Some(SCHEMA_VERSION));
            let table = txn.open_table(TENANTS).unwrap();
            let bytes = table.get("alpha").unwrap().unwrap().value().to_vec();
            assert!(!String::from_utf8_lossy(&bytes).contains("alpha-site"));
        });
        drop(store);
        // The second open has nothing left to upgrade.
        let capture = LogCapture::default();
        capture.during(|| EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap());
        assert!(
            !capture.text().contains("store upgraded"),
            "{}",
            capture.text()
        );
    }

    #[test]
    fn rotation_leaves_nothing_under_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap();
            put(&store, tenant("alpha", "a-secret"));
            put(&store, tenant("beta", "b-secret"));
            with_db(&store, |db| {
                commit_blocking(
                    db,
                    &store.inner.keys,
                    vec![(
                        Mutation::PutPartner(PartnerRecord {
                            connections: tenant("p", "p-secret").connections,
                            revision: 0,
                            update_time: None,
                        }),
                        Expect::Absent,
                    )],
                    &mut None,
                )
            })
            .unwrap();
        }
        let ring = key_ring(&format!("{KEY_B}\n{KEY_A}"));
        let store = EmbeddedStore::open(dir.path(), ring).unwrap();
        let keys = &store.inner.keys;
        let active = keys.active().id();

        with_db(&store, |db| {
            let txn = db.begin_read().unwrap();
            let mut seen = 0;
            let mut check = |bytes: &[u8], doc: &mut ConnectionsDoc| {
                assert_eq!(record::key_id(bytes), Some(active));
                for (_, sealed) in doc.sealed_mut() {
                    assert_eq!(sealing::key_id(sealed), Some(active));
                    seen += 1;
                }
            };
            for entry in txn.open_table(TENANTS).unwrap().iter().unwrap() {
                let (k, v) = entry.unwrap();
                let mut doc: TenantDoc =
                    read_record(keys, 2, RecordKind::Tenant, k.value(), v.value()).unwrap();
                check(v.value(), &mut doc.connections);
            }
            let table = txn.open_table(PARTNER).unwrap();
            let v = table.get(PARTNER_KEY).unwrap().unwrap();
            let mut doc: PartnerDoc =
                read_record(keys, 2, RecordKind::Partner, PARTNER_KEY, v.value()).unwrap();
            check(v.value(), &mut doc.connections);
            assert_eq!(seen, 9);
            let meta = txn.open_table(META).unwrap();
            let check_value = meta.get(META_KEY_CHECK).unwrap().unwrap();
            let check_value = std::str::from_utf8(check_value.value()).unwrap();
            assert_eq!(sealing::key_id(check_value), Some(active));
        });
    }

    #[test]
    fn a_newer_schema_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), key_ring(KEY_A)).unwrap();
            with_db(&store, |db| {
                let txn = db.begin_write().unwrap();
                {
                    let mut meta = txn.open_table(META).unwrap();
                    let newer = (SCHEMA_VERSION + 1).to_be_bytes();
                    meta.insert(META_SCHEMA, newer.as_slice()).unwrap();
                }
                txn.commit().unwrap();
            });
        }
        let msg = EmbeddedStore::open(dir.path(), key_ring(KEY_A))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("written by a newer sidekey"), "{msg}");
    }

    /// Every path that logs (generation, creation, rotation, refusals) at trace level, and
    /// every error message, searched for each secret and each key.
    #[test]
    fn no_secret_or_key_in_logs_or_errors() {
        let capture = LogCapture::default();
        let dir = tempfile::tempdir().unwrap();
        let mut errors = Vec::new();
        capture.during(|| {
            let generated = MasterKeys::load(
                &super::super::master_key::MasterKeySource::Generate,
                dir.path(),
            )
            .unwrap();
            let store = EmbeddedStore::open(dir.path(), generated).unwrap();
            put(&store, tenant("alpha", "alpha-secret-value"));
            errors.push(
                with_db(&store, |db| {
                    commit_blocking(
                        db,
                        &store.inner.keys,
                        vec![(
                            Mutation::PutTenant(tenant("alpha", "alpha-secret-value")),
                            Expect::Absent,
                        )],
                        &mut None,
                    )
                })
                .unwrap_err()
                .to_string(),
            );
            drop(store);
            errors.push(
                EmbeddedStore::open(dir.path(), key_ring(KEY_A))
                    .unwrap_err()
                    .to_string(),
            );
            let generated_text = std::fs::read_to_string(dir.path().join("master.key")).unwrap();
            let generated_key = generated_text
                .lines()
                .find(|l| !l.starts_with('#'))
                .unwrap()
                .to_owned();
            let ring = key_ring(&format!("{KEY_A}\n{generated_key}"));
            let store = EmbeddedStore::open(dir.path(), ring).unwrap();
            load(&store).unwrap();
            drop(store);
            errors.push(
                EmbeddedStore::open(dir.path(), key_ring(&generated_key))
                    .unwrap_err()
                    .to_string(),
            );
            errors.push(generated_key);
        });
        let generated_key = errors.pop().unwrap();
        let logs = capture.text();
        assert!(logs.contains("rotation finished"), "{logs}");
        assert!(logs.contains("beside the secrets"), "{logs}");
        let haystack = format!("{logs}\n{}", errors.join("\n"));
        for needle in ["secret-value", KEY_A, &generated_key] {
            assert!(!haystack.contains(needle), "{needle} in:\n{haystack}");
        }
    }
}
