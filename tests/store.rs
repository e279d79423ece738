//! The embedded store through its public API, on real files in temporary directories:
//! durability across reopen, compare-and-set, master-key checks and rotation, and that no
//! secret reaches the disk in the clear.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sidekey::secret::Secret;
use sidekey::store::embedded::{DATA_FILE, EmbeddedStore};
use sidekey::store::master_key::{GENERATED_KEY_FILE, MasterKeySource, MasterKeys};
use sidekey::store::{Expect, Mutation, Store, StoreError};
use sidekey::tenants::{
    Connections, M3terConn, MailkitConn, MiradoreConn, PartnerRecord, TenantRecord,
};

const KEY_OLD: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_NEW: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="; // base64 of 32 bytes

fn keys(text: &str) -> MasterKeys {
    MasterKeys::parse(text, "test").unwrap()
}

fn key_id(text: &str) -> String {
    keys(text).active().id().to_string()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, 123_456_789)
}

/// A tenant using all three vendors, its secrets derived from `tag` so each is distinctive.
fn tenant(id: &str, tag: &str) -> TenantRecord {
    TenantRecord {
        id: id.to_owned(),
        display_name: format!("Tenant {id}"),
        connections: Connections {
            miradore: Some(MiradoreConn {
                site: "acme-site".into(),
                api_key: Some(Secret::new(format!("miradore-key-{tag}-Zq81"))),
            }),
            m3ter: Some(M3terConn {
                access_key_id: "AKID".into(),
                api_secret: Some(Secret::new(format!("m3ter-secret-{tag}-Wv27"))),
                org_id: "org-1".into(),
                environment: "production".into(),
            }),
            mailkit: Some(MailkitConn {
                client_id: "12345".into(),
                client_md5: Some(Secret::new(format!("mailkit-md5-{tag}-Pk40"))),
            }),
        },
        revision: 0,
        create_time: at(1_700_000_000),
        update_time: at(1_700_000_100),
    }
}

fn secrets_of(t: &TenantRecord) -> Vec<String> {
    let c = &t.connections;
    [
        c.miradore.as_ref().and_then(|m| m.api_key.as_ref()),
        c.m3ter.as_ref().and_then(|m| m.api_secret.as_ref()),
        c.mailkit.as_ref().and_then(|m| m.client_md5.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.expose().to_owned())
    .collect()
}

fn partner(tag: &str) -> PartnerRecord {
    PartnerRecord {
        connections: Connections {
            m3ter: Some(M3terConn {
                access_key_id: "PARTNER-AKID".into(),
                api_secret: Some(Secret::new(format!("partner-secret-{tag}-Hx55"))),
                org_id: String::new(),
                environment: "production".into(),
            }),
            ..Connections::default()
        },
        revision: 0,
        update_time: Some(at(1_700_000_200)),
    }
}

fn open(dir: &Path, key: &str) -> EmbeddedStore {
    EmbeddedStore::open(dir, keys(key)).unwrap()
}

fn key_error(result: Result<EmbeddedStore, StoreError>) -> String {
    match result {
        Err(StoreError::Key(msg)) => msg,
        other => panic!("expected StoreError::Key, got {other:?}"),
    }
}

#[tokio::test]
async fn tenants_and_partner_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), KEY_OLD);

    let empty = store.load().await.unwrap();
    assert!(empty.tenants.is_empty());
    assert_eq!(empty.partner, PartnerRecord::default());
    assert_eq!(empty.revision, 0);

    let acme = tenant("acme", "a");
    let mut bare = tenant("bare", "b");
    bare.connections = Connections::default();
    let r1 = store
        .commit(Mutation::PutTenant(acme.clone()), Expect::Absent)
        .await
        .unwrap();
    let r2 = store
        .commit(Mutation::PutTenant(bare.clone()), Expect::Absent)
        .await
        .unwrap();
    let r3 = store
        .commit(Mutation::PutPartner(partner("p")), Expect::Absent)
        .await
        .unwrap();

    let state = store.load().await.unwrap();
    assert_eq!(state.revision, r3);
    let ids: Vec<_> = state.tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["acme", "bare"]);
    // Everything comes back as written, secrets opened, with the store's revision.
    assert_eq!(
        state.tenants[0],
        TenantRecord {
            revision: r1,
            ..acme
        }
    );
    assert_eq!(
        state.tenants[1],
        TenantRecord {
            revision: r2,
            ..bare
        }
    );
    assert_eq!(
        state.partner,
        PartnerRecord {
            revision: r3,
            ..partner("p")
        }
    );
}

#[tokio::test]
async fn compare_and_set_refuses_stale_and_duplicate_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), KEY_OLD);
    let r1 = store
        .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
        .await
        .unwrap();

    // Absent on an existing record: a create that lost a race.
    let dup = store
        .commit(Mutation::PutTenant(tenant("acme", "x")), Expect::Absent)
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict)), "{dup:?}");
    // A revision that is not the current one.
    let stale = store
        .commit(
            Mutation::PutTenant(tenant("acme", "x")),
            Expect::Revision(r1 + 7),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    // A revision for a record that does not exist.
    let missing = store
        .commit(
            Mutation::PutTenant(tenant("none", "x")),
            Expect::Revision(r1),
        )
        .await;
    assert!(matches!(missing, Err(StoreError::Conflict)), "{missing:?}");

    // None of the refused writes changed anything, revision included.
    let state = store.load().await.unwrap();
    assert_eq!(state.revision, r1);
    assert_eq!(state.tenants.len(), 1);
    assert_eq!(
        secrets_of(&state.tenants[0]),
        secrets_of(&tenant("acme", "a"))
    );

    let r2 = store
        .commit(
            Mutation::PutTenant(tenant("acme", "b")),
            Expect::Revision(r1),
        )
        .await
        .unwrap();
    assert!(r2 > r1);

    // The partner defaults: Absent until first written, then their revision.
    let p1 = store
        .commit(Mutation::PutPartner(partner("1")), Expect::Absent)
        .await
        .unwrap();
    let again = store
        .commit(Mutation::PutPartner(partner("2")), Expect::Absent)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
    let stale = store
        .commit(Mutation::PutPartner(partner("2")), Expect::Revision(r1))
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    store
        .commit(Mutation::PutPartner(partner("2")), Expect::Revision(p1))
        .await
        .unwrap();
}

#[tokio::test]
async fn revisions_increase_store_wide() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), KEY_OLD);
    let a = store
        .commit(Mutation::PutTenant(tenant("a", "a")), Expect::Absent)
        .await
        .unwrap();
    let b = store
        .commit(Mutation::PutTenant(tenant("b", "b")), Expect::Absent)
        .await
        .unwrap();
    let p = store
        .commit(Mutation::PutPartner(partner("p")), Expect::Absent)
        .await
        .unwrap();
    let a2 = store
        .commit(Mutation::PutTenant(tenant("a", "c")), Expect::Revision(a))
        .await
        .unwrap();
    let del = store
        .commit(Mutation::DeleteTenant("b".into()), Expect::Revision(b))
        .await
        .unwrap();
    assert!(
        a < b && b < p && p < a2 && a2 < del,
        "{a} {b} {p} {a2} {del}"
    );

    let state = store.load().await.unwrap();
    assert_eq!(state.revision, del);
    assert_eq!(state.tenants[0].revision, a2);
    assert_eq!(state.partner.revision, p);
}

#[tokio::test]
async fn delete_removes_only_with_the_current_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), KEY_OLD);
    let r = store
        .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
        .await
        .unwrap();
    let stale = store
        .commit(
            Mutation::DeleteTenant("acme".into()),
            Expect::Revision(r - 1),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    let gone = store
        .commit(Mutation::DeleteTenant("other".into()), Expect::Revision(r))
        .await;
    assert!(matches!(gone, Err(StoreError::Conflict)), "{gone:?}");

    store
        .commit(Mutation::DeleteTenant("acme".into()), Expect::Revision(r))
        .await
        .unwrap();
    assert!(store.load().await.unwrap().tenants.is_empty());
    // The id can be created again.
    store
        .commit(Mutation::PutTenant(tenant("acme", "b")), Expect::Absent)
        .await
        .unwrap();
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (r_t, r_p) = {
        let store = open(dir.path(), KEY_OLD);
        let t = store
            .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
            .await
            .unwrap();
        let p = store
            .commit(Mutation::PutPartner(partner("p")), Expect::Absent)
            .await
            .unwrap();
        (t, p)
    };
    let store = open(dir.path(), KEY_OLD);
    let state = store.load().await.unwrap();
    assert_eq!(state.revision, r_p);
    assert_eq!(
        state.tenants,
        [TenantRecord {
            revision: r_t,
            ..tenant("acme", "a")
        }]
    );
    assert_eq!(state.partner.revision, r_p);
    // The revision counter carries on from where it was.
    let next = store
        .commit(Mutation::DeleteTenant("acme".into()), Expect::Revision(r_t))
        .await
        .unwrap();
    assert_eq!(next, r_p + 1);
}

#[tokio::test]
async fn a_wrong_master_key_fails_open_and_names_both_key_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), KEY_OLD);
        store
            .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
            .await
            .unwrap();
    }
    let msg = key_error(EmbeddedStore::open(dir.path(), keys(KEY_NEW)));
    assert!(msg.contains(&key_id(KEY_OLD)), "{msg}");
    assert!(msg.contains(&key_id(KEY_NEW)), "{msg}");
    assert!(msg.contains("--master-key-file"), "{msg}");
    assert!(!msg.contains(KEY_OLD) && !msg.contains(KEY_NEW), "{msg}");

    // The refusal left the data untouched: the right key still opens it.
    let store = open(dir.path(), KEY_OLD);
    assert_eq!(store.load().await.unwrap().tenants.len(), 1);
}

#[tokio::test]
async fn rotation_reseals_under_the_new_key_so_the_old_one_can_go() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), KEY_OLD);
        store
            .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
            .await
            .unwrap();
        store
            .commit(Mutation::PutPartner(partner("p")), Expect::Absent)
            .await
            .unwrap();
    }
    let before = open(dir.path(), KEY_OLD).load().await.unwrap();

    // New key first (active), old key kept to open what it sealed.
    {
        let store = open(dir.path(), &format!("{KEY_NEW}\n{KEY_OLD}"));
        let state = store.load().await.unwrap();
        assert_eq!(state.tenants, before.tenants);
        assert_eq!(state.partner, before.partner);
        assert_eq!(state.revision, before.revision, "rotation is not a write");
    }
    // Everything is now sealed under the new key alone.
    {
        let store = open(dir.path(), KEY_NEW);
        let state = store.load().await.unwrap();
        assert_eq!(state.tenants, before.tenants);
        assert_eq!(state.partner, before.partner);
    }
    let msg = key_error(EmbeddedStore::open(dir.path(), keys(KEY_OLD)));
    assert!(msg.contains(&key_id(KEY_NEW)), "{msg}");
}

#[tokio::test]
async fn a_generated_key_is_private_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let ring = MasterKeys::load(&MasterKeySource::Generate, &data_dir).unwrap();
    let first_id = ring.active().id();
    {
        let store = EmbeddedStore::open(&data_dir, ring).unwrap();
        store
            .commit(Mutation::PutTenant(tenant("acme", "a")), Expect::Absent)
            .await
            .unwrap();
    }
    let key_file = data_dir.join(GENERATED_KEY_FILE);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&data_dir.join(DATA_FILE)), 0o600);
    assert_eq!(mode(&data_dir), 0o700);

    let ring = MasterKeys::load(&MasterKeySource::Generate, &data_dir).unwrap();
    assert_eq!(ring.active().id(), first_id);
    let store = EmbeddedStore::open(&data_dir, ring).unwrap();
    assert_eq!(store.load().await.unwrap().tenants.len(), 1);
}

#[tokio::test]
async fn no_secret_reaches_the_data_directory_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut secrets = Vec::new();
    {
        let store = open(dir.path(), KEY_OLD);
        for (id, tag) in [
            ("acme", "Acme9"),
            ("globex", "Globex4"),
            ("initech", "Ini7"),
        ] {
            let t = tenant(id, tag);
            secrets.extend(secrets_of(&t));
            store
                .commit(Mutation::PutTenant(t), Expect::Absent)
                .await
                .unwrap();
        }
        // An update leaves the previous value in freed pages unless it was sealed too.
        let t = tenant("acme", "AcmeUpdated");
        secrets.extend(secrets_of(&t));
        let r = store.load().await.unwrap().tenants[0].revision;
        store
            .commit(Mutation::PutTenant(t), Expect::Revision(r))
            .await
            .unwrap();
        let p = partner("Partner3");
        secrets.push("partner-secret-Partner3-Hx55".into());
        store
            .commit(Mutation::PutPartner(p), Expect::Absent)
            .await
            .unwrap();
    }
    // Rotation writes again: still nothing in the clear.
    drop(open(dir.path(), &format!("{KEY_NEW}\n{KEY_OLD}")));

    let files = all_files(dir.path());
    assert!(files.iter().any(|f| f.ends_with(DATA_FILE)));
    for file in &files {
        let bytes = fs::read(file).unwrap();
        for secret in &secrets {
            for needle in encodings(secret) {
                assert!(
                    !contains(&bytes, needle.as_bytes()),
                    "{} holds a secret as {needle:?}",
                    file.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn a_data_directory_in_use_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), KEY_OLD);
    match EmbeddedStore::open(dir.path(), keys(KEY_OLD)) {
        Err(StoreError::Backend(msg)) => {
            assert!(
                msg.contains("already in use by another sidekey process"),
                "{msg}"
            );
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        }
        other => panic!("expected a Backend error, got {other:?}"),
    }
}

fn encodings(secret: &str) -> Vec<String> {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    vec![
        secret.to_owned(),
        STANDARD.encode(secret).trim_end_matches('=').to_owned(),
        URL_SAFE_NO_PAD.encode(secret),
        hex.to_uppercase(),
        hex,
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_batch_is_written_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), KEY_NEW);
    let first = store
        .commit(Mutation::PutTenant(tenant("alpha", "a")), Expect::Absent)
        .await
        .unwrap();

    // The second write's precondition fails: the first must not land either.
    let err = store
        .commit_batch(vec![
            (Mutation::PutTenant(tenant("beta", "b")), Expect::Absent),
            (
                Mutation::PutTenant(tenant("alpha", "a2")),
                Expect::Revision(first + 7),
            ),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    let state = store.load().await.unwrap();
    assert_eq!(state.revision, first);
    assert_eq!(state.tenants.len(), 1);

    // A valid batch lands whole, every record with the one new revision.
    let rev = store
        .commit_batch(vec![
            (Mutation::PutTenant(tenant("beta", "b")), Expect::Absent),
            (
                Mutation::DeleteTenant("alpha".into()),
                Expect::Revision(first),
            ),
            (Mutation::PutPartner(partner("p")), Expect::Absent),
        ])
        .await
        .unwrap();
    assert_eq!(rev, first + 1);
    let state = store.load().await.unwrap();
    let ids: Vec<_> = state.tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["beta"]);
    assert_eq!(state.tenants[0].revision, rev);
    assert_eq!(state.partner.revision, rev);
}

// ---- fault injection -------------------------------------------------------------------
//
// The store runs over a storage backend that wraps the real file and fails writes, syncs or
// reads on demand, so each failure path is driven deterministically.

mod faults {
    use std::io;
    use std::ops::Bound;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use redb::{BackendError, StorageBackend};
    use sidekey::store::backend::{BackendOpener, file_backend};

    pub const ENOSPC: i32 = 28;
    pub const EIO: i32 = 5;

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum Fault {
        #[default]
        None,
        /// Every write and every growth of the file fails with this errno.
        Writes(i32),
        /// Every write lands only its first half, then fails with EIO.
        ShortWrites,
        /// Every sync fails with EIO, after the writes before it reached the file.
        Syncs,
        /// Only the n-th sync from now (1-based) fails with EIO; the ones before succeed. With
        /// the right n the commit is complete in the file, yet the client is told it failed.
        SyncAt(u32),
        /// Every read fails with EIO.
        Reads,
    }

    #[derive(Clone, Debug, Default)]
    pub struct Switch(Arc<Mutex<(Fault, u32)>>);

    impl Switch {
        pub fn set(&self, fault: Fault) {
            *self.0.lock().unwrap() = (fault, 0);
        }
        fn get(&self) -> Fault {
            self.0.lock().unwrap().0
        }
        /// Counts a sync; whether it is the one to fail.
        fn sync_fails(&self) -> bool {
            let mut state = self.0.lock().unwrap();
            state.1 += 1;
            match state.0 {
                Fault::Syncs => true,
                Fault::SyncAt(n) => state.1 == n,
                _ => false,
            }
        }
        pub fn opener(&self) -> BackendOpener {
            let switch = self.clone();
            Arc::new(move |path: &Path| {
                Ok(Box::new(Faulty {
                    inner: file_backend(path)?,
                    switch: switch.clone(),
                }) as Box<dyn StorageBackend>)
            })
        }
    }

    #[derive(Debug)]
    struct Faulty {
        inner: Box<dyn StorageBackend>,
        switch: Switch,
    }

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    impl StorageBackend for Faulty {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            match self.switch.get() {
                Fault::Reads => Err(errno(EIO)),
                _ => self.inner.read(offset, out),
            }
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            match self.switch.get() {
                Fault::Writes(n) if len > self.inner.len()? => Err(errno(n)),
                _ => self.inner.set_len(len),
            }
        }
        fn sync_data(&self) -> io::Result<()> {
            if self.switch.sync_fails() {
                return Err(errno(EIO));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            match self.switch.get() {
                Fault::Writes(n) => Err(errno(n)),
                Fault::ShortWrites => {
                    self.inner.write(offset, &data[..data.len() / 2])?;
                    Err(errno(EIO))
                }
                _ => self.inner.write(offset, data),
            }
        }
        fn close(&self) -> io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }
}

use faults::{EIO, ENOSPC, Fault, Switch};

fn open_faulty(dir: &Path, switch: &Switch) -> EmbeddedStore {
    EmbeddedStore::open_with_backend(dir, keys(KEY_OLD), switch.opener()).unwrap()
}

async fn ids(store: &EmbeddedStore) -> Vec<String> {
    let state = store.load().await.unwrap();
    state.tenants.into_iter().map(|t| t.id).collect()
}

/// Drives one fault through a write: the client's error, the health report, refusal while the
/// fault lasts, recovery once it clears, and on disk exactly the acknowledged writes.
async fn fault_then_recover(fault: Fault, expect_in_error: &str) {
    let dir = tempfile::tempdir().unwrap();
    let switch = Switch::default();
    let store = open_faulty(dir.path(), &switch);
    let health = store.health();
    let r1 = store
        .commit(Mutation::PutTenant(tenant("before", "b")), Expect::Absent)
        .await
        .unwrap();

    switch.set(fault);
    let err = store
        .commit(Mutation::PutTenant(tenant("lost", "l")), Expect::Absent)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Io(_)), "{fault:?}: {err:?}");
    assert!(msg.contains(expect_in_error), "{fault:?}: {msg}");
    let reason = health.failure().expect("the store reports itself failing");
    assert!(reason.contains(expect_in_error), "{reason}");
    // Still failing while a lasting fault lasts, and every attempt is refused.
    if !matches!(fault, Fault::SyncAt(_)) {
        let again = store
            .commit(
                Mutation::PutTenant(tenant("also-lost", "x")),
                Expect::Absent,
            )
            .await;
        assert!(again.is_err(), "{fault:?}: {again:?}");
        assert!(!health.is_healthy());
    }

    switch.set(Fault::None);
    let r2 = store
        .commit(Mutation::PutTenant(tenant("after", "a")), Expect::Absent)
        .await
        .unwrap();
    assert!(health.is_healthy(), "{:?}", health.failure());
    assert!(r2 > r1);
    assert_eq!(ids(&store).await, ["after", "before"], "{fault:?}");
    // The unacknowledged writes can be made now: nothing of them was left behind.
    store
        .commit(Mutation::PutTenant(tenant("lost", "l")), Expect::Absent)
        .await
        .unwrap();
    drop(store);

    let reopened = open(dir.path(), KEY_OLD);
    let state = reopened.load().await.unwrap();
    let on_disk: Vec<_> = state.tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(on_disk, ["after", "before", "lost"], "{fault:?}");
    assert_eq!(state.revision, r2 + 1);
}

#[tokio::test]
async fn a_full_disk_refuses_writes_then_recovers_by_itself() {
    fault_then_recover(Fault::Writes(ENOSPC), "No space left on device").await;
}

#[tokio::test]
async fn an_io_error_on_write_refuses_writes_then_recovers() {
    fault_then_recover(Fault::Writes(EIO), "Input/output error").await;
}

#[tokio::test]
async fn short_writes_are_refused_then_recovered() {
    fault_then_recover(Fault::ShortWrites, "Input/output error").await;
}

/// The commit's data reaches the file but its sync fails: the write may be on disk although
/// the client was told it failed. Recovery puts the previous records back.
#[tokio::test]
async fn a_failed_sync_never_leaves_the_refused_write_visible() {
    fault_then_recover(Fault::Syncs, "Input/output error").await;
    fault_then_recover(Fault::SyncAt(1), "Input/output error").await;
    // redb's commit syncs twice; failing the second leaves the commit whole in the file.
    fault_then_recover(Fault::SyncAt(2), "Input/output error").await;
}

#[tokio::test]
async fn a_failed_sync_of_an_update_and_a_delete_restores_the_previous_records() {
    let dir = tempfile::tempdir().unwrap();
    let switch = Switch::default();
    let store = open_faulty(dir.path(), &switch);
    let r1 = store
        .commit(Mutation::PutTenant(tenant("a", "one")), Expect::Absent)
        .await
        .unwrap();
    let r2 = store
        .commit(Mutation::PutTenant(tenant("b", "one")), Expect::Absent)
        .await
        .unwrap();
    let before = store.load().await.unwrap();

    // The second sync of the commit fails after its header reached the file.
    switch.set(Fault::SyncAt(2));
    let batch = vec![
        (
            Mutation::PutTenant(tenant("a", "two")),
            Expect::Revision(r1),
        ),
        (Mutation::DeleteTenant("b".into()), Expect::Revision(r2)),
    ];
    store.commit_batch(batch).await.unwrap_err();
    switch.set(Fault::None);

    let after = store.load().await.unwrap();
    assert_eq!(after.tenants, before.tenants);
    assert_eq!(after.revision, before.revision);
    drop(store);
    let on_disk = open(dir.path(), KEY_OLD).load().await.unwrap();
    assert_eq!(on_disk.tenants, before.tenants);
    assert_eq!(on_disk.revision, before.revision);
}

#[tokio::test]
async fn a_read_error_fails_the_load_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let switch = Switch::default();
    let store = open_faulty(dir.path(), &switch);
    store
        .commit(Mutation::PutTenant(tenant("a", "one")), Expect::Absent)
        .await
        .unwrap();
    // Force redb back to the file: reopen through a failure, then fail its reads.
    switch.set(Fault::Writes(EIO));
    store
        .commit(Mutation::PutTenant(tenant("b", "one")), Expect::Absent)
        .await
        .unwrap_err();
    switch.set(Fault::Reads);
    let err = store.load().await.unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err:?}");
    assert!(!store.health().is_healthy());
    switch.set(Fault::None);
    assert_eq!(ids(&store).await, ["a"]);
    assert!(store.health().is_healthy());
}

/// Without any further write, the background retry brings the store back once the disk works.
#[tokio::test]
async fn a_failing_store_recovers_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let switch = Switch::default();
    let store = open_faulty(dir.path(), &switch);
    switch.set(Fault::Writes(ENOSPC));
    store
        .commit(Mutation::PutTenant(tenant("a", "one")), Expect::Absent)
        .await
        .unwrap_err();
    let health = store.health();
    assert!(!health.is_healthy());
    switch.set(Fault::None);
    let deadline = std::time::Instant::now()
        + sidekey::store::embedded::RECOVERY_INTERVAL * 3
        + Duration::from_secs(2);
    while !health.is_healthy() {
        assert!(
            std::time::Instant::now() < deadline,
            "no background recovery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ids(&store).await.is_empty());
}

/// Through the catalog, as the control plane uses it: a full disk turns an update into
/// UNAVAILABLE with the cause, the proxy's snapshot keeps the last saved credentials (never
/// the refused ones), `/readyz` and the `sidekey_store_healthy` gauge report the failure, and
/// all recover by themselves once space is free.
#[tokio::test]
async fn a_full_disk_is_reported_to_clients_probes_and_metrics_then_clears() {
    use sidekey::admin::{self, Readiness};
    use sidekey::tenants::Catalog;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let metrics = admin::metrics_handle().expect("recorder");
    let dir = tempfile::tempdir().unwrap();
    let switch = Switch::default();
    let store = open_faulty(dir.path(), &switch);
    let health = store.health();
    let catalog = Catalog::open(Arc::new(store)).await.unwrap();
    let mut m = tenant("acme", "a").connections;
    m.m3ter = None;
    m.mailkit = None;
    catalog
        .create("acme".into(), "Acme".into(), m.clone())
        .await
        .unwrap();
    let key_of = |catalog: &Catalog| {
        let snap = catalog.snapshot().load();
        let t = snap.tenant("acme").unwrap().clone();
        t.miradore.as_ref().unwrap().api_key.expose().to_owned()
    };
    let saved = key_of(&catalog);

    let readiness = Readiness::default().with_store_health(health.clone());
    readiness.set(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(listener, readiness, async move {
        let _ = stopped.await;
    }));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
            .await
            .unwrap()
            .unwrap();
        body
    };
    assert!(get("/readyz").await.contains("store: ok"));

    switch.set(Fault::Writes(ENOSPC));
    let mut changed = m.clone();
    changed.miradore.as_mut().unwrap().api_key = Some(Secret::new("refused-new-key"));
    let err = catalog
        .update("acme", None, |r| r.connections = changed.clone())
        .await
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("not saved") && status.message().contains("No space left"),
        "{status:?}"
    );
    assert_eq!(key_of(&catalog), saved, "the proxy must keep the saved key");
    let ready = get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("store: failing, writes refused") && ready.contains("No space left"),
        "{ready}"
    );
    assert!(
        metrics.render().contains("sidekey_store_healthy 0"),
        "{}",
        metrics.render()
    );

    switch.set(Fault::None);
    catalog
        .update("acme", None, |r| r.connections = changed.clone())
        .await
        .unwrap();
    assert_eq!(key_of(&catalog), "refused-new-key");
    assert!(get("/readyz").await.contains("store: ok"));
    assert!(metrics.render().contains("sidekey_store_healthy 1"));
    let _ = stop.send(());
    admin_task.await.unwrap();
}
