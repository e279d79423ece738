//! The embedded store: one redb database in `--data-dir`, every secret sealed under the
//! master keyring.
//!
//! Tables: `tenants` (id → record), `partner` (the singleton), `meta` (the store-wide
//! revision, the schema version, and a sealed key-check value). Records are serde_json of the
//! private `*Doc` structs below, which mirror the model with each secret replaced by its
//! sealed string; the plain value never reaches the encoder.
//!
//! The key check is what makes a wrong master key fail at start-up, with a message naming the
//! key ids, rather than later on the first secret. At open, anything still sealed under an
//! older key of the ring is re-sealed under the active one (rotation).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::files;
use super::master_key::{KeyId, MASTER_KEY_ENV, MasterKeys};
use super::sealing::{self, SealError};
use super::{Expect, Mutation, Store, StoreError, StoredState};
use crate::secret::Secret;
use crate::tenants::{
    Connections, M3terConn, MailkitConn, MiradoreConn, PartnerRecord, TenantRecord,
};

/// The database file inside the data directory.
pub const DATA_FILE: &str = "sidekey.redb";

/// The layout this code writes and reads. A database with a higher version was written by a
/// newer sidekey and is refused rather than misread.
pub const SCHEMA_VERSION: u64 = 1;

/// redb's page cache: 4 MiB (redb's default is 1 GiB). The store is read whole once at
/// start-up and then only written, so a large cache would only keep the start-up read in
/// memory for the life of the process.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

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
    db: Arc<Database>,
    keys: Arc<MasterKeys>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("active_key_id", &self.keys.active().id())
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if absent) the store in `data_dir`: the directory with mode 0700, the
    /// database file with 0600. Fails with [`StoreError::Key`] when no key of `keys` opens
    /// the data, and re-seals under the active key whatever an older key of the ring sealed.
    ///
    /// Blocking (file I/O and fsync): call it at start-up or inside `spawn_blocking`.
    pub fn open(data_dir: &Path, keys: MasterKeys) -> Result<Self, StoreError> {
        files::ensure_private_dir(data_dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DATA_FILE);
        // redb creates a missing file with the process umask; creating it empty first makes
        // it private, and redb initialises an empty file as a new database.
        match files::create_private_file(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "cannot create the database file {}: {e}",
                    path.display()
                )));
            }
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_error(e, data_dir, &path))?;
        let store = Self {
            db: Arc::new(db),
            keys: Arc::new(keys),
            path,
        };
        store.check_key_and_rotate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Initialises a new database, or checks that the ring opens an existing one and
    /// re-seals anything an older key sealed; one write transaction either way.
    fn check_key_and_rotate(&self) -> Result<(), StoreError> {
        let keys = &*self.keys;
        let active = keys.active().id();
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate).map_err(backend)?;

        let key_check = {
            let meta = txn.open_table(META).map_err(backend)?;
            if let Some(version) = read_u64(&meta, META_SCHEMA)?
                && version > SCHEMA_VERSION
            {
                return Err(StoreError::Backend(format!(
                    "{} was written by a newer sidekey (schema version {version}; this one \
                     reads up to {SCHEMA_VERSION})",
                    self.path.display()
                )));
            }
            let check = meta.get(META_KEY_CHECK).map_err(backend)?;
            check.map(|v| String::from_utf8_lossy(v.value()).into_owned())
        };

        let Some(key_check) = key_check else {
            return self.initialise(txn);
        };
        let sealed_with = sealing::key_id(&key_check).ok_or_else(|| {
            StoreError::Key(format!(
                "the key check in {} is malformed: the database is corrupted",
                self.path.display()
            ))
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
                self.path.display()
            ))
        })?;
        if opened.as_slice() != KEY_CHECK_VALUE {
            return Err(StoreError::Key(format!(
                "the key check in {} holds an unexpected value: the database is corrupted",
                self.path.display()
            )));
        }

        let mut old_ids: Vec<KeyId> = Vec::new();
        let resealed = reseal_all(&txn, keys, &mut old_ids)?;
        if sealed_with != active {
            old_ids.push(sealed_with);
            write_key_check(&txn, keys)?;
        }
        if resealed == 0 && sealed_with == active {
            txn.abort().map_err(backend)?;
            return Ok(());
        }
        txn.commit().map_err(backend)?;
        old_ids.sort_by_key(|id| id.to_string());
        old_ids.dedup();
        tracing::info!(
            path = %self.path.display(),
            from_key_ids = %join_ids(old_ids.iter().copied()),
            to_key_id = %active,
            secrets = resealed,
            "master key rotation finished: everything is now sealed with the active key, so the \
             older keys can be removed from the keyring"
        );
        Ok(())
    }

    fn initialise(&self, txn: WriteTransaction) -> Result<(), StoreError> {
        {
            let tenants = txn.open_table(TENANTS).map_err(backend)?;
            let partner = txn.open_table(PARTNER).map_err(backend)?;
            // Records without a key check cannot have been written by this code, which
            // writes the check in the same transaction that creates the tables.
            if !tenants.is_empty().map_err(backend)? || !partner.is_empty().map_err(backend)? {
                return Err(StoreError::Backend(format!(
                    "{} holds records but no key check: the database is corrupted",
                    self.path.display()
                )));
            }
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())
                .map_err(backend)?;
            if read_u64(&meta, META_REVISION)?.is_none() {
                meta.insert(META_REVISION, 0u64.to_be_bytes().as_slice())
                    .map_err(backend)?;
            }
        }
        write_key_check(&txn, &self.keys)?;
        txn.commit().map_err(backend)?;
        tracing::info!(path = %self.path.display(), key_id = %self.keys.active().id(),
            "created a new store");
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn load(&self) -> Result<StoredState, StoreError> {
        let db = Arc::clone(&self.db);
        let keys = Arc::clone(&self.keys);
        run_blocking(move || load_blocking(&db, &keys)).await
    }

    async fn commit_batch(&self, batch: Vec<(Mutation, Expect)>) -> Result<u64, StoreError> {
        let db = Arc::clone(&self.db);
        let keys = Arc::clone(&self.keys);
        run_blocking(move || commit_blocking(&db, &keys, batch)).await
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("the store task failed: {e}")))?
}

fn load_blocking(db: &Database, keys: &MasterKeys) -> Result<StoredState, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    let revision = read_u64(&meta, META_REVISION)?.unwrap_or(0);

    let table = txn.open_table(TENANTS).map_err(backend)?;
    let mut tenants = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (id, value) = entry.map_err(backend)?;
        let doc: TenantDoc = decode(value.value())?;
        tenants.push(doc.open(keys, id.value())?);
    }

    let table = txn.open_table(PARTNER).map_err(backend)?;
    let partner = match table.get(PARTNER_KEY).map_err(backend)? {
        Some(value) => decode::<PartnerDoc>(value.value())?.open(keys)?,
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
/// drops the transaction, so nothing of the batch is written.
fn commit_blocking(
    db: &Database,
    keys: &MasterKeys,
    batch: Vec<(Mutation, Expect)>,
) -> Result<u64, StoreError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    let revision = {
        let mut meta = txn.open_table(META).map_err(backend)?;
        let revision = read_u64(&meta, META_REVISION)?
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| StoreError::Backend("the store revision overflowed".into()))?;
        for (mutation, expect) in batch {
            match mutation {
                Mutation::PutTenant(mut record) => {
                    let mut table = txn.open_table(TENANTS).map_err(backend)?;
                    let current = table
                        .get(record.id.as_str())
                        .map_err(backend)?
                        .map(|v| decode::<TenantDoc>(v.value()).map(|d| d.revision))
                        .transpose()?;
                    check_expect(expect, current)?;
                    record.revision = revision;
                    let doc = TenantDoc::seal(keys, &record)?;
                    table
                        .insert(record.id.as_str(), encode(&doc)?.as_slice())
                        .map_err(backend)?;
                }
                // Deleting a record that is absent (with `Expect::Absent`) deletes nothing but
                // still counts as a write, like every commit whose precondition holds.
                Mutation::DeleteTenant(id) => {
                    let mut table = txn.open_table(TENANTS).map_err(backend)?;
                    let current = table
                        .get(id.as_str())
                        .map_err(backend)?
                        .map(|v| decode::<TenantDoc>(v.value()).map(|d| d.revision))
                        .transpose()?;
                    check_expect(expect, current)?;
                    table.remove(id.as_str()).map_err(backend)?;
                }
                Mutation::PutPartner(mut record) => {
                    let mut table = txn.open_table(PARTNER).map_err(backend)?;
                    let current = table
                        .get(PARTNER_KEY)
                        .map_err(backend)?
                        .map(|v| decode::<PartnerDoc>(v.value()).map(|d| d.revision))
                        .transpose()?;
                    check_expect(expect, current)?;
                    record.revision = revision;
                    let doc = PartnerDoc::seal(keys, &record)?;
                    table
                        .insert(PARTNER_KEY, encode(&doc)?.as_slice())
                        .map_err(backend)?;
                }
            }
        }
        meta.insert(META_REVISION, revision.to_be_bytes().as_slice())
            .map_err(backend)?;
        revision
    };
    txn.commit().map_err(backend)?;
    Ok(revision)
}

fn check_expect(expect: Expect, current: Option<u64>) -> Result<(), StoreError> {
    match (expect, current) {
        (Expect::Absent, None) => Ok(()),
        (Expect::Revision(want), Some(have)) if want == have => Ok(()),
        _ => Err(StoreError::Conflict),
    }
}

/// Re-seals, in `txn`, every secret sealed under a key other than the active one, adding
/// those keys' ids to `old_ids`. Returns how many secrets it re-sealed.
fn reseal_all(
    txn: &WriteTransaction,
    keys: &MasterKeys,
    old_ids: &mut Vec<KeyId>,
) -> Result<usize, StoreError> {
    let mut count = 0;
    let mut table = txn.open_table(TENANTS).map_err(backend)?;
    let mut changed: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (id, value) = entry.map_err(backend)?;
        let id = id.value().to_owned();
        let mut doc: TenantDoc = decode(value.value())?;
        let n = doc.connections.reseal(keys, &tenant_place(&id), old_ids)?;
        if n > 0 {
            count += n;
            changed.push((id, encode(&doc)?));
        }
    }
    for (id, bytes) in changed {
        table
            .insert(id.as_str(), bytes.as_slice())
            .map_err(backend)?;
    }

    let mut table = txn.open_table(PARTNER).map_err(backend)?;
    let partner = table
        .get(PARTNER_KEY)
        .map_err(backend)?
        .map(|v| decode::<PartnerDoc>(v.value()))
        .transpose()?;
    if let Some(mut doc) = partner {
        let n = doc.connections.reseal(keys, PARTNER_PLACE, old_ids)?;
        if n > 0 {
            count += n;
            table
                .insert(PARTNER_KEY, encode(&doc)?.as_slice())
                .map_err(backend)?;
        }
    }
    Ok(count)
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
    let bytes: [u8; 8] = value.value().try_into().map_err(|_| {
        StoreError::Backend(format!(
            "the stored {key} is not a 64-bit number: corrupted"
        ))
    })?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

fn open_error(e: DatabaseError, data_dir: &Path, path: &Path) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Backend(format!(
                "the data directory {} is already in use by another sidekey process (it holds \
                 the lock on {}): stop that process, or give this one another --data-dir",
                data_dir.display(),
                path.display()
            ))
        }
        other => StoreError::Backend(format!(
            "cannot open the database {}: {other}",
            path.display()
        )),
    }
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(format!("redb: {}", e.into()))
}

/// Sealing errors name the place and key id, never the value, so they pass through as is.
fn seal_error(e: SealError) -> StoreError {
    match e {
        SealError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Key(other.to_string()),
    }
}

fn join_ids(ids: impl Iterator<Item = KeyId>) -> String {
    ids.map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
}

fn encode<T: Serialize>(doc: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(doc).map_err(|e| StoreError::Backend(format!("cannot encode a record: {e}")))
}

/// serde_json errors quote at most a position and a type, and the documents hold only sealed
/// values, so the message cannot carry a secret.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Backend(format!("a stored record does not decode: {e}")))
}

// ---- encoded records -------------------------------------------------------------------

const PARTNER_PLACE: &str = "partner";

fn tenant_place(id: &str) -> String {
    format!("tenant/{id}")
}

#[derive(Serialize, Deserialize)]
struct TenantDoc {
    id: String,
    display_name: String,
    connections: ConnectionsDoc,
    revision: u64,
    create_time: TimeDoc,
    update_time: TimeDoc,
}

#[derive(Serialize, Deserialize)]
struct PartnerDoc {
    connections: ConnectionsDoc,
    revision: u64,
    update_time: Option<TimeDoc>,
}

/// Each `Option<String>` secret below holds a sealed value (see [`sealing`]), never a plain one.
#[derive(Serialize, Deserialize, Default)]
struct ConnectionsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    miradore: Option<MiradoreDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m3ter: Option<M3terDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mailkit: Option<MailkitDoc>,
}

#[derive(Serialize, Deserialize)]
struct MiradoreDoc {
    site: String,
    api_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct M3terDoc {
    access_key_id: String,
    api_secret: Option<String>,
    org_id: String,
    environment: String,
}

#[derive(Serialize, Deserialize)]
struct MailkitDoc {
    client_id: String,
    client_md5: Option<String>,
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize)]
struct TimeDoc {
    secs: u64,
    nanos: u32,
}

impl TimeDoc {
    fn from_time(t: SystemTime) -> Result<Self, StoreError> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| StoreError::Backend("a record time is before 1970".into()))?;
        Ok(Self {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        })
    }

    fn to_time(&self) -> Result<SystemTime, StoreError> {
        let bad = || StoreError::Backend("a stored time is out of range: corrupted".into());
        // Duration::new panics when nanos carry past u64::MAX seconds.
        if self.nanos >= 1_000_000_000 {
            return Err(bad());
        }
        UNIX_EPOCH
            .checked_add(Duration::new(self.secs, self.nanos))
            .ok_or_else(bad)
    }
}

impl TenantDoc {
    fn seal(keys: &MasterKeys, r: &TenantRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id.clone(),
            display_name: r.display_name.clone(),
            connections: ConnectionsDoc::seal(keys, &tenant_place(&r.id), &r.connections)?,
            revision: r.revision,
            create_time: TimeDoc::from_time(r.create_time)?,
            update_time: TimeDoc::from_time(r.update_time)?,
        })
    }

    /// `key` is the table key the record was read under; the secrets are opened for that
    /// place, so a record moved under another id fails to open.
    fn open(self, keys: &MasterKeys, key: &str) -> Result<TenantRecord, StoreError> {
        if self.id != key {
            return Err(StoreError::Backend(format!(
                "the record stored under tenant {key:?} names tenant {:?}: corrupted",
                self.id
            )));
        }
        Ok(TenantRecord {
            connections: self.connections.open(keys, &tenant_place(key))?,
            create_time: self.create_time.to_time()?,
            update_time: self.update_time.to_time()?,
            id: self.id,
            display_name: self.display_name,
            revision: self.revision,
        })
    }
}

impl PartnerDoc {
    fn seal(keys: &MasterKeys, r: &PartnerRecord) -> Result<Self, StoreError> {
        Ok(Self {
            connections: ConnectionsDoc::seal(keys, PARTNER_PLACE, &r.connections)?,
            revision: r.revision,
            update_time: r.update_time.map(TimeDoc::from_time).transpose()?,
        })
    }

    fn open(self, keys: &MasterKeys) -> Result<PartnerRecord, StoreError> {
        Ok(PartnerRecord {
            connections: self.connections.open(keys, PARTNER_PLACE)?,
            revision: self.revision,
            update_time: self
                .update_time
                .as_ref()
                .map(TimeDoc::to_time)
                .transpose()?,
        })
    }
}

impl ConnectionsDoc {
    fn seal(keys: &MasterKeys, owner: &str, c: &Connections) -> Result<Self, StoreError> {
        let seal = |field: &str, s: &Option<Secret>| -> Result<Option<String>, StoreError> {
            s.as_ref()
                .map(|s| {
                    sealing::seal(keys, &format!("{owner}/{field}"), s.expose().as_bytes())
                        .map_err(seal_error)
                })
                .transpose()
        };
        Ok(Self {
            miradore: c
                .miradore
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreDoc {
                        site: m.site.clone(),
                        api_key: seal("miradore.api_key", &m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: c
                .m3ter
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terDoc {
                        access_key_id: m.access_key_id.clone(),
                        api_secret: seal("m3ter.api_secret", &m.api_secret)?,
                        org_id: m.org_id.clone(),
                        environment: m.environment.clone(),
                    })
                })
                .transpose()?,
            mailkit: c
                .mailkit
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitDoc {
                        client_id: m.client_id.clone(),
                        client_md5: seal("mailkit.client_md5", &m.client_md5)?,
                    })
                })
                .transpose()?,
        })
    }

    fn open(self, keys: &MasterKeys, owner: &str) -> Result<Connections, StoreError> {
        let open = |field: &str, s: Option<String>| -> Result<Option<Secret>, StoreError> {
            s.map(|s| open_secret(keys, &format!("{owner}/{field}"), &s))
                .transpose()
        };
        Ok(Connections {
            miradore: self
                .miradore
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreConn {
                        site: m.site,
                        api_key: open("miradore.api_key", m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: self
                .m3ter
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terConn {
                        access_key_id: m.access_key_id,
                        api_secret: open("m3ter.api_secret", m.api_secret)?,
                        org_id: m.org_id,
                        environment: m.environment,
                    })
                })
                .transpose()?,
            mailkit: self
                .mailkit
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitConn {
                        client_id: m.client_id,
                        client_md5: open("mailkit.client_md5", m.client_md5)?,
                    })
                })
                .transpose()?,
        })
    }

    /// The sealed secrets with their field paths, for rotation.
    fn sealed_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        let mut out = Vec::new();
        if let Some(s) = self.miradore.as_mut().and_then(|m| m.api_key.as_mut()) {
            out.push(("miradore.api_key", s));
        }
        if let Some(s) = self.m3ter.as_mut().and_then(|m| m.api_secret.as_mut()) {
            out.push(("m3ter.api_secret", s));
        }
        if let Some(s) = self.mailkit.as_mut().and_then(|m| m.client_md5.as_mut()) {
            out.push(("mailkit.client_md5", s));
        }
        out
    }

    /// Re-seals under the active key each secret an older key sealed; returns how many.
    fn reseal(
        &mut self,
        keys: &MasterKeys,
        owner: &str,
        old_ids: &mut Vec<KeyId>,
    ) -> Result<usize, StoreError> {
        let active = keys.active().id();
        let mut count = 0;
        for (field, sealed) in self.sealed_mut() {
            let place = format!("{owner}/{field}");
            let id = sealing::key_id(sealed).ok_or_else(|| {
                seal_error(SealError::Malformed {
                    place: place.clone(),
                })
            })?;
            if id == active {
                continue;
            }
            let plain = sealing::open(keys, &place, sealed).map_err(seal_error)?;
            *sealed = sealing::seal(keys, &place, &plain).map_err(seal_error)?;
            old_ids.push(id);
            count += 1;
        }
        Ok(count)
    }
}

fn open_secret(keys: &MasterKeys, place: &str, sealed: &str) -> Result<Secret, StoreError> {
    let mut plain = sealing::open(keys, place, sealed).map_err(seal_error)?;
    // Moved, not copied, into the Secret, so no unzeroed copy is left behind.
    match String::from_utf8(std::mem::take(&mut *plain)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(StoreError::Key(format!(
                "the secret at {place} is not UTF-8 after opening: corrupted"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::LogCapture;

    use super::*;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    fn keys(text: &str) -> MasterKeys {
        MasterKeys::parse(text, "test").unwrap()
    }

    fn tenant(id: &str, secret: &str) -> TenantRecord {
        TenantRecord {
            id: id.into(),
            display_name: id.into(),
            connections: Connections {
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
                ..Connections::default()
            },
            revision: 0,
            create_time: SystemTime::now(),
            update_time: SystemTime::now(),
        }
    }

    fn put(store: &EmbeddedStore, t: TenantRecord) -> u64 {
        commit_blocking(
            &store.db,
            &store.keys,
            vec![(Mutation::PutTenant(t), Expect::Absent)],
        )
        .unwrap()
    }

    /// Rewrites the stored JSON of tenant `id` with `f`, behind the store's back.
    fn edit_raw(store: &EmbeddedStore, f: impl FnOnce(&mut redb::Table<&str, &[u8]>)) {
        let txn = store.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(TENANTS).unwrap();
            f(&mut table);
        }
        txn.commit().unwrap();
    }

    fn raw_json(table: &redb::Table<&str, &[u8]>, id: &str) -> serde_json::Value {
        serde_json::from_slice(table.get(id).unwrap().unwrap().value()).unwrap()
    }

    #[test]
    fn swapped_ciphertexts_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), keys(KEY_A)).unwrap();
        put(&store, tenant("alpha", "alpha-secret-value"));
        put(&store, tenant("beta", "beta-secret-value"));

        edit_raw(&store, |table| {
            let mut a = raw_json(table, "alpha");
            let mut b = raw_json(table, "beta");
            let field = "/connections/m3ter/api_secret";
            std::mem::swap(a.pointer_mut(field).unwrap(), b.pointer_mut(field).unwrap());
            let (a, b) = (
                serde_json::to_vec(&a).unwrap(),
                serde_json::to_vec(&b).unwrap(),
            );
            table.insert("alpha", a.as_slice()).unwrap();
            table.insert("beta", b.as_slice()).unwrap();
        });

        let err = load_blocking(&store.db, &store.keys).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Key(_)), "{err:?}");
        assert!(msg.contains("tenant/alpha/m3ter.api_secret"), "{msg}");
        assert!(msg.contains(&store.keys.active().id().to_string()), "{msg}");
        assert!(!msg.contains("secret-value"), "{msg}");
    }

    #[test]
    fn swapped_fields_within_a_record_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), keys(KEY_A)).unwrap();
        put(&store, tenant("alpha", "alpha-secret-value"));
        edit_raw(&store, |table| {
            let mut a = raw_json(table, "alpha");
            let md5 = a
                .pointer("/connections/mailkit/client_md5")
                .unwrap()
                .clone();
            *a.pointer_mut("/connections/m3ter/api_secret").unwrap() = md5;
            table
                .insert("alpha", serde_json::to_vec(&a).unwrap().as_slice())
                .unwrap();
        });
        let err = load_blocking(&store.db, &store.keys).unwrap_err();
        assert!(matches!(err, StoreError::Key(_)), "{err:?}");
    }

    #[test]
    fn a_record_moved_under_another_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), keys(KEY_A)).unwrap();
        put(&store, tenant("alpha", "alpha-secret-value"));
        edit_raw(&store, |table| {
            let a = raw_json(table, "alpha");
            table
                .insert("gamma", serde_json::to_vec(&a).unwrap().as_slice())
                .unwrap();
        });
        let msg = load_blocking(&store.db, &store.keys)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"gamma\" names tenant \"alpha\""), "{msg}");
    }

    #[test]
    fn rotation_leaves_nothing_under_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), keys(KEY_A)).unwrap();
            put(&store, tenant("alpha", "a-secret"));
            put(&store, tenant("beta", "b-secret"));
            commit_blocking(
                &store.db,
                &store.keys,
                vec![(
                    Mutation::PutPartner(PartnerRecord {
                        connections: tenant("p", "p-secret").connections,
                        revision: 0,
                        update_time: None,
                    }),
                    Expect::Absent,
                )],
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), keys(&format!("{KEY_B}\n{KEY_A}"))).unwrap();
        let active = store.keys.active().id();

        let txn = store.db.begin_read().unwrap();
        let mut seen = 0;
        let mut check = |doc: &mut ConnectionsDoc| {
            for (_, sealed) in doc.sealed_mut() {
                assert_eq!(sealing::key_id(sealed), Some(active));
                seen += 1;
            }
        };
        for entry in txn.open_table(TENANTS).unwrap().iter().unwrap() {
            let (_, v) = entry.unwrap();
            check(&mut decode::<TenantDoc>(v.value()).unwrap().connections);
        }
        let table = txn.open_table(PARTNER).unwrap();
        let v = table.get(PARTNER_KEY).unwrap().unwrap();
        check(&mut decode::<PartnerDoc>(v.value()).unwrap().connections);
        assert_eq!(seen, 6);
        let meta = txn.open_table(META).unwrap();
        let check_value = meta.get(META_KEY_CHECK).unwrap().unwrap();
        let check_value = std::str::from_utf8(check_value.value()).unwrap();
        assert_eq!(sealing::key_id(check_value), Some(active));
    }

    #[test]
    fn a_newer_schema_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), keys(KEY_A)).unwrap();
            let txn = store.db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                let newer = (SCHEMA_VERSION + 1).to_be_bytes();
                meta.insert(META_SCHEMA, newer.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let msg = EmbeddedStore::open(dir.path(), keys(KEY_A))
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
        {
            let _guard = capture.capture();
            let generated = MasterKeys::load(
                &super::super::master_key::MasterKeySource::Generate,
                dir.path(),
            )
            .unwrap();
            let store = EmbeddedStore::open(dir.path(), generated).unwrap();
            put(&store, tenant("alpha", "alpha-secret-value"));
            errors.push(
                commit_blocking(
                    &store.db,
                    &store.keys,
                    vec![(
                        Mutation::PutTenant(tenant("alpha", "alpha-secret-value")),
                        Expect::Absent,
                    )],
                )
                .unwrap_err()
                .to_string(),
            );
            drop(store);
            errors.push(
                EmbeddedStore::open(dir.path(), keys(KEY_A))
                    .unwrap_err()
                    .to_string(),
            );
            let generated_text = std::fs::read_to_string(dir.path().join("master.key")).unwrap();
            let generated_key = generated_text
                .lines()
                .find(|l| !l.starts_with('#'))
                .unwrap()
                .to_owned();
            let ring = keys(&format!("{KEY_A}\n{generated_key}"));
            let store = EmbeddedStore::open(dir.path(), ring).unwrap();
            load_blocking(&store.db, &store.keys).unwrap();
            drop(store);
            errors.push(
                EmbeddedStore::open(dir.path(), keys(&generated_key))
                    .unwrap_err()
                    .to_string(),
            );
            errors.push(generated_key);
        }
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
