//! Adversarial cases: store. A failing or hostile disk under the embedded store: damaged
//! files of every kind (empty, truncated, bit-flipped in each page, not a store, another
//! key, a read-only directory), each refused with a clear message and left byte-for-byte
//! unchanged, never served; and `kill -9` of the real binary during concurrent writes, after
//! which every acknowledged write is there.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sidekey::secret::Secret;
use sidekey::store::embedded::{DATA_FILE, EmbeddedStore, verify_file};
use sidekey::store::master_key::MasterKeys;
use sidekey::store::{Expect, Mutation, Store, StoreError, StoredState};
use sidekey::tenants::{Connections, MiradoreConn, PartnerRecord, TenantRecord};

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const OTHER_KEY: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

fn keys(text: &str) -> MasterKeys {
    MasterKeys::parse(text, "test").unwrap()
}

fn tenant(id: &str) -> TenantRecord {
    TenantRecord {
        id: id.into(),
        display_name: format!("Tenant {id}"),
        connections: Connections {
            miradore: Some(MiradoreConn {
                site: format!("{id}-site"),
                api_key: Some(Secret::new(format!("{id}-miradore-key"))),
            }),
            ..Connections::default()
        },
        revision: 0,
        create_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        update_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

/// A store of 30 tenants and partner defaults, closed; returns what it holds.
async fn populated(dir: &Path) -> StoredState {
    let store = EmbeddedStore::open(dir, keys(KEY)).unwrap();
    for i in 0..30 {
        store
            .commit(
                Mutation::PutTenant(tenant(&format!("tenant-{i:02}"))),
                Expect::Absent,
            )
            .await
            .unwrap();
    }
    store
        .commit(
            Mutation::PutPartner(PartnerRecord {
                connections: tenant("partner").connections,
                revision: 0,
                update_time: None,
            }),
            Expect::Absent,
        )
        .await
        .unwrap();
    store.load().await.unwrap()
}

/// Opens the damaged store: either refused with a message that names the problem (and the
/// file unchanged), or, for damage in space redb does not use, exactly the original data.
async fn refused_or_intact(dir: &Path, original: &StoredState, what: &str) -> Option<String> {
    let path = dir.join(DATA_FILE);
    let before = fs::read(&path).unwrap();
    let opened = EmbeddedStore::open(dir, keys(KEY));
    let outcome = match opened {
        Err(e) => {
            let after = fs::read(&path).unwrap();
            assert!(
                after == before,
                "{what}: a refused start changed the file ({e})"
            );
            Some(e.to_string())
        }
        Ok(store) => {
            let state = store.load().await;
            match state {
                Ok(state) => {
                    assert_eq!(
                        state.tenants, original.tenants,
                        "{what}: served altered data"
                    );
                    assert_eq!(state.partner, original.partner, "{what}");
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        }
    };
    if let Some(msg) = &outcome {
        assert!(
            msg.contains("corrupted")
                || msg.contains("failed to authenticate")
                || msg.contains("not a redb database")
                || msg.contains("not a sidekey store"),
            "{what}: unclear refusal: {msg}"
        );
        assert!(!msg.contains("miradore-key"), "{what}: {msg}");
    }
    outcome
}

#[tokio::test]
async fn a_zero_length_store_is_refused_not_taken_for_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path()).await;
    fs::File::create(dir.path().join(DATA_FILE)).unwrap(); // truncate -s 0
    let err = EmbeddedStore::open(dir.path(), keys(KEY)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupted(_)), "{err:?}");
    assert!(
        msg.contains("is empty (0 bytes)") && msg.contains("backup"),
        "{msg}"
    );
    assert_eq!(fs::metadata(dir.path().join(DATA_FILE)).unwrap().len(), 0);
}

#[tokio::test]
async fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(DATA_FILE), b"tenants: []\n").unwrap();
    let msg = EmbeddedStore::open(dir.path(), keys(KEY))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("is not a redb database"), "{msg}");
    assert_eq!(
        fs::read(dir.path().join(DATA_FILE)).unwrap(),
        b"tenants: []\n"
    );
}

#[tokio::test]
async fn a_truncated_store_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let original = populated(dir.path()).await;
    let path = dir.path().join(DATA_FILE);
    let full = fs::read(&path).unwrap();
    for len in [
        9,
        100,
        4096,
        full.len() / 2,
        full.len() - 4096,
        full.len() - 1,
    ] {
        fs::write(&path, &full[..len]).unwrap();
        let outcome =
            refused_or_intact(dir.path(), &original, &format!("truncated to {len}")).await;
        assert!(
            outcome.is_some() || len > full.len() / 2,
            "truncated to {len}: accepted"
        );
    }
}

/// One flipped byte in each 4 KiB page (header, allocator state, branch and leaf pages of
/// every table, free pages), and in each record's stored value: never served altered.
#[tokio::test]
async fn a_flipped_byte_in_any_page_is_refused_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let original = populated(dir.path()).await;
    let path = dir.path().join(DATA_FILE);
    let full = fs::read(&path).unwrap();
    let mut offsets: Vec<usize> = (0..full.len()).step_by(4096).map(|p| p + 2048).collect();
    // The header's own fields.
    offsets.extend([0, 9, 16, 32, 64, 128, 200, 300]);
    // Inside each sealed record (they start with the format tag "v1.").
    let mut at = 0;
    while let Some(i) = full[at..].windows(3).position(|w| w == b"v1.") {
        offsets.push(at + i + 20);
        at += i + 3;
    }
    let mut refused = 0;
    for &offset in offsets.iter().filter(|&&o| o < full.len()) {
        let mut bad = full.clone();
        bad[offset] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        if refused_or_intact(dir.path(), &original, &format!("byte {offset} flipped"))
            .await
            .is_some()
        {
            refused += 1;
        }
        fs::write(&path, &full).unwrap();
    }
    assert!(refused > 0, "no flip was noticed");
}

#[tokio::test]
async fn a_wrong_key_is_refused_and_the_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path()).await;
    let path = dir.path().join(DATA_FILE);
    let before = fs::read(&path).unwrap();
    let err = EmbeddedStore::open(dir.path(), keys(OTHER_KEY)).unwrap_err();
    assert!(matches!(err, StoreError::Key(_)), "{err:?}");
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a wrong key rewrote the store"
    );
    let err = verify_file(&path, &keys(OTHER_KEY)).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// A file this user may read but not write: the checks pass read-only, then the open for
/// writing is refused (the opener stands in for the permission bits, which root ignores).
#[tokio::test]
async fn a_store_that_cannot_be_opened_for_writing_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path()).await;
    let path = dir.path().join(DATA_FILE);
    let before = fs::read(&path).unwrap();
    let read_only: sidekey::store::backend::BackendOpener = std::sync::Arc::new(|_: &Path| {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    });
    let err = EmbeddedStore::open_with_backend(dir.path(), keys(KEY), read_only).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot open the database") && msg.contains("ermission denied"),
        "{msg}"
    );
    assert!(fs::read(&path).unwrap() == before, "the file changed");
}

// ---- kill -9 during concurrent writes ---------------------------------------------------

mod crash {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use sidekey::proto::{self, tenant_service_client::TenantServiceClient};

    /// Kills the server if the test fails before it does.
    pub struct Reaped(pub Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";

    /// Starts `sidekey serve` on `data`; the child and its gRPC URL, from the ready line.
    pub fn serve(data: &Path) -> (Child, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sidekey"))
            .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen"])
            .args(["127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("SIDEKEY_MASTER_KEY", KEY_B64)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sidekey serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Drains stderr until the process exits, so its log writes never hit a closed pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = String::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
            if line.contains("sidekey ready") {
                let url = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("grpc="))
                    .expect("grpc= in the ready line")
                    .to_owned();
                return (child, url);
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sidekey did not start:\n{seen}");
    }

    pub fn tenant(id: &str) -> proto::Tenant {
        proto::Tenant {
            id: id.into(),
            display_name: format!("Tenant {id}"),
            m3ter: Some(proto::M3terConnection {
                access_key_id: "AK-1".into(),
                api_secret: Some(proto::Secret {
                    value: format!("secret-of-{id}"),
                    fingerprint: String::new(),
                }),
                org_id: ORG.into(),
                environment: String::new(),
            }),
            ..Default::default()
        }
    }

    /// Writers creating tenants until the process dies; every acknowledged id is recorded.
    pub async fn write_until_killed(
        url: &str,
        cycle: usize,
        writers: usize,
        acked: &Arc<Mutex<Vec<String>>>,
        enough: usize,
        child: &mut Child,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        let this_cycle = Arc::new(Mutex::new(0usize));
        for w in 0..writers {
            let url = url.to_owned();
            let acked = acked.clone();
            let this_cycle = this_cycle.clone();
            tasks.spawn(async move {
                let Ok(mut client) = TenantServiceClient::connect(url).await else {
                    return;
                };
                for n in 0.. {
                    let id = format!("c{cycle}-w{w}-{n}");
                    let req = proto::CreateTenantRequest {
                        tenant: Some(tenant(&id)),
                    };
                    let call =
                        tokio::time::timeout(Duration::from_secs(10), client.create_tenant(req));
                    match call.await {
                        Ok(Ok(_)) => {
                            acked.lock().unwrap().push(id);
                            *this_cycle.lock().unwrap() += 1;
                        }
                        _ => return,
                    }
                }
            });
        }
        // Kill once this cycle has `enough` acknowledged writes (bounded by a deadline),
        // while the writers still have calls in flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        while *this_cycle.lock().unwrap() < enough {
            assert!(Instant::now() < deadline, "cycle {cycle}: writes stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        while tasks.join_next().await.is_some() {}
    }
}

/// `kill -9` of the real binary, mid-way through concurrent gRPC writes, a dozen times: each
/// restart succeeds and every acknowledged write is in the store afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_writes_loses_no_acknowledged_write() {
    const CYCLES: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for cycle in 0..CYCLES {
        let (child, url) = crash::serve(&data);
        let mut child = crash::Reaped(child);
        crash::write_until_killed(&url, cycle, 4, &acked, 12, &mut child.0).await;
    }
    let ring = MasterKeys::parse(crash::KEY_B64, "test").unwrap();
    let store = EmbeddedStore::open(&data, ring).unwrap();
    let state = store.load().await.unwrap();
    let stored: std::collections::HashSet<_> =
        state.tenants.iter().map(|t| t.id.as_str()).collect();
    let acked = acked.lock().unwrap();
    assert!(acked.len() >= CYCLES * 12, "{}", acked.len());
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !stored.contains(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
}

/// The start-up decision: one record that fails to authenticate (here a tenant's record
/// copied over another's) stops `sidekey serve` with a message naming the record and the
/// remedy, and exit code 1; the file is left unchanged.
#[tokio::test]
async fn serve_refuses_to_start_on_a_record_that_fails_to_authenticate() {
    use redb::{ReadableDatabase, TableDefinition};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ring = MasterKeys::parse(crash::KEY_B64, "test").unwrap();
    {
        let store = EmbeddedStore::open(&data, ring).unwrap();
        for id in ["alpha", "beta"] {
            store
                .commit(Mutation::PutTenant(tenant(id)), Expect::Absent)
                .await
                .unwrap();
        }
    }
    {
        let tenants: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
        let db = redb::Database::create(data.join(DATA_FILE)).unwrap();
        let alpha = {
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(tenants).unwrap();
            table.get("alpha").unwrap().unwrap().value().to_vec()
        };
        let txn = db.begin_write().unwrap();
        txn.open_table(tenants)
            .unwrap()
            .insert("beta", alpha.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let before = fs::read(data.join(DATA_FILE)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen"])
        .args(["127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("SIDEKEY_MASTER_KEY", crash::KEY_B64)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tenant record \"beta\" failed to authenticate")
            && stderr.contains("restore")
            && stderr.contains("sidekey store verify"),
        "{stderr}"
    );
    assert!(!stderr.contains("-miradore-key"), "{stderr}");
    assert!(
        fs::read(data.join(DATA_FILE)).unwrap() == before,
        "the file changed"
    );
}

/// The case from the fault campaign: the last 4 KiB page zeroed made redb panic. Now a clear
/// "store file is corrupted" error, and the file unchanged.
#[tokio::test]
async fn a_zeroed_last_page_is_a_corrupted_store_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let original = populated(dir.path()).await;
    let path = dir.path().join(DATA_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[len - 4096..].fill(0);
    fs::write(&path, &bytes).unwrap();
    let msg = refused_or_intact(dir.path(), &original, "last page zeroed")
        .await
        .expect("a zeroed last page is noticed");
    assert!(msg.contains("store file is corrupted"), "{msg}");
    // Every page zeroed in turn, the same way.
    let full = bytes.clone();
    for page in (0..len).step_by(4096) {
        let mut bad = full.clone();
        bad[page..(page + 4096).min(len)].fill(0);
        fs::write(&path, &bad).unwrap();
        refused_or_intact(dir.path(), &original, &format!("page at {page} zeroed")).await;
    }
}

/// A new store that cannot be written (disk full while creating it) leaves no store file
/// behind, so the next start does not find a half-made one; it creates the store once the
/// disk works.
#[tokio::test]
async fn a_failed_creation_leaves_no_store_behind() {
    let dir = tempfile::tempdir().unwrap();
    let full_disk: sidekey::store::backend::BackendOpener =
        std::sync::Arc::new(|_: &Path| Err(std::io::Error::from_raw_os_error(28)));
    let err = EmbeddedStore::open_with_backend(dir.path(), keys(KEY), full_disk).unwrap_err();
    assert!(
        err.to_string().contains("cannot create a new store"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A leftover temporary file from a crash mid-creation is not a store either.
    fs::write(dir.path().join("sidekey.redb.new"), b"half").unwrap();
    let store = EmbeddedStore::open(dir.path(), keys(KEY)).unwrap();
    assert!(store.load().await.unwrap().tenants.is_empty());
    assert!(!dir.path().join("sidekey.redb.new").exists());
}
