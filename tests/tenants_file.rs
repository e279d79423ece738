//! `--tenants-file`: applied at start-up, re-applied on a Kubernetes-style symlink swap,
//! rejected whole when invalid with the previous state kept.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sidekey::config::ServeConfig;
use sidekey::secret::Secret;
use sidekey::server::{self, Running};
use sidekey::tenants::{Connections, MiradoreConn};

const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
/// Bounds a wait that should end at once; never used to let time pass.
const BOUND: Duration = Duration::from_secs(30);

/// A directory laid out as the kubelet mounts a Secret: `tenants.yaml` and `md5` are
/// symlinks through `..data`, which is swapped atomically to a new timestamped directory.
struct SecretMount {
    dir: PathBuf,
    version: u32,
}

impl SecretMount {
    fn new(dir: &Path, files: &[(&str, &str)]) -> Self {
        let mut m = Self {
            dir: dir.to_owned(),
            version: 0,
        };
        m.swap(files);
        for (name, _) in files {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        m
    }

    fn swap(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let versioned = format!("..2026_11_23_{:02}", self.version);
        std::fs::create_dir(self.dir.join(&versioned)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&versioned).join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&versioned, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn file(tenants: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "partnerDefaults:\n  mailkit:\n    clientMd5: { valueFrom: { file: MD5_PATH } }\ntenants:\n",
    );
    for (id, site) in tenants {
        out.push_str(&format!(
            "  - id: {id}\n    miradore: {{ site: {site}, apiKey: {{ value: key-{id} }} }}\n    mailkit: {{ clientId: \"42\" }}\n"
        ));
    }
    out
}

async fn start(root: &Path, mount: &SecretMount) -> Result<Running, server::StartError> {
    let path = mount.path("tenants.yaml");
    server::start(config_with_file(root, &path, Duration::from_millis(20))).await
}

fn sites(running: &Running) -> Vec<(String, String)> {
    let snap = running.catalog.snapshot().load();
    let mut out: Vec<_> = snap
        .tenants()
        .map(|t| {
            let site = t
                .miradore
                .as_ref()
                .map(|m| m.site.clone())
                .unwrap_or_default();
            (t.id.to_string(), site)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn applied_at_start_then_on_each_symlink_swap() {
    let root = tempfile::tempdir().unwrap();
    let mount_dir = root.path().join("mount");
    std::fs::create_dir(&mount_dir).unwrap();
    let md5_path = mount_dir.join("md5");
    let v1 =
        file(&[("acme", "Acme"), ("beta", "Beta")]).replace("MD5_PATH", md5_path.to_str().unwrap());
    let mut mount = SecretMount::new(
        &mount_dir,
        &[
            ("tenants.yaml", &v1),
            ("md5", "0123456789abcdef0123456789abcdef\n"),
        ],
    );
    let running = start(root.path(), &mount).await.unwrap();

    // In force before start() returned, i.e. before the proxy accepted anything.
    assert_eq!(
        sites(&running),
        [
            ("acme".into(), "Acme".into()),
            ("beta".into(), "Beta".into())
        ]
    );
    let snap = running.catalog.snapshot().load();
    let mk = snap.tenant("acme").unwrap().mailkit.as_ref().unwrap();
    assert_eq!(mk.client_md5.expose(), "0123456789abcdef0123456789abcdef");

    // A tenant added through the API is not the file's to remove.
    running
        .catalog
        .create(
            "api-made".into(),
            String::new(),
            Connections {
                miradore: Some(MiradoreConn {
                    site: "Api".into(),
                    api_key: Some(Secret::new("k")),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // Swap: acme changes site, beta is no longer declared, gamma is new.
    let mut changes = running.catalog.snapshot().changes();
    changes.borrow_and_update();
    let v2 = file(&[("acme", "AcmeTwo"), ("gamma", "Gamma")])
        .replace("MD5_PATH", md5_path.to_str().unwrap());
    mount.swap(&[
        ("tenants.yaml", &v2),
        ("md5", "0123456789abcdef0123456789abcdef"),
    ]);
    tokio::time::timeout(BOUND, changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sites(&running),
        [
            ("acme".into(), "AcmeTwo".into()),
            ("api-made".into(), "Api".into()),
            ("gamma".into(), "Gamma".into())
        ]
    );

    // Only a referenced secret changes: that is a change too.
    changes.borrow_and_update();
    mount.swap(&[
        ("tenants.yaml", &v2),
        ("md5", "fedcba9876543210fedcba9876543210"),
    ]);
    tokio::time::timeout(BOUND, changes.changed())
        .await
        .unwrap()
        .unwrap();
    let snap = running.catalog.snapshot().load();
    let mk = snap.tenant("gamma").unwrap().mailkit.as_ref().unwrap();
    assert_eq!(mk.client_md5.expose(), "fedcba9876543210fedcba9876543210");
}

#[tokio::test]
async fn an_invalid_file_is_rejected_whole_and_the_old_state_kept() {
    let root = tempfile::tempdir().unwrap();
    let mount_dir = root.path().join("mount");
    std::fs::create_dir(&mount_dir).unwrap();
    let md5_path = mount_dir.join("md5");
    let v1 = file(&[("acme", "Acme")]).replace("MD5_PATH", md5_path.to_str().unwrap());
    let mut mount = SecretMount::new(
        &mount_dir,
        &[
            ("tenants.yaml", &v1),
            ("md5", "0123456789abcdef0123456789abcdef"),
        ],
    );
    let running = start(root.path(), &mount).await.unwrap();
    let mut status = running.tenants_file.clone().unwrap();
    let before = running.catalog.get("acme").await.unwrap();

    // One good tenant and one bad: neither lands.
    let bad = file(&[("acme", "Changed"), ("beta", "bad site!")])
        .replace("MD5_PATH", md5_path.to_str().unwrap());
    mount.swap(&[
        ("tenants.yaml", &bad),
        ("md5", "0123456789abcdef0123456789abcdef"),
    ]);
    let s = tokio::time::timeout(BOUND, status.wait_for(|s| s.rejected == 1))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let error = s.last_error.unwrap();
    assert!(error.contains("tenants[beta].miradore.site"), "{error}");
    assert!(
        !error.contains("key-"),
        "a secret leaked into the error: {error}"
    );
    assert_eq!(running.catalog.get("acme").await.unwrap(), before);
    assert!(running.catalog.get("beta").await.is_err());

    // Unparsable YAML is rejected too.
    mount.swap(&[("tenants.yaml", "tenants: [ {"), ("md5", "x")]);
    tokio::time::timeout(BOUND, status.wait_for(|s| s.rejected == 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sites(&running), [("acme".into(), "Acme".into())]);

    // A fixed file applies again.
    let good = file(&[("acme", "Fixed")]).replace("MD5_PATH", md5_path.to_str().unwrap());
    mount.swap(&[
        ("tenants.yaml", &good),
        ("md5", "0123456789abcdef0123456789abcdef"),
    ]);
    tokio::time::timeout(BOUND, status.wait_for(|s| s.applied == 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sites(&running), [("acme".into(), "Fixed".into())]);
}

#[tokio::test]
async fn an_invalid_file_at_start_up_stops_sidekey_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let mount_dir = root.path().join("mount");
    std::fs::create_dir(&mount_dir).unwrap();
    let text = format!(
        "tenants:\n  - id: acme\n    m3ter: {{ accessKeyId: AK, apiSecret: {{ value: s }}, orgId: {ORG}0 }}\n"
    );
    let mount = SecretMount::new(&mount_dir, &[("tenants.yaml", &text)]);
    let err = start(root.path(), &mount)
        .await
        .err()
        .expect("must not start");
    let msg = err.to_string();
    assert!(msg.contains("tenants[acme].m3ter.org_id"), "{msg}");
}

#[tokio::test]
async fn a_fingerprint_without_a_value_is_refused_in_a_tenants_file() {
    let root = tempfile::tempdir().unwrap();
    let mount_dir = root.path().join("mount");
    std::fs::create_dir(&mount_dir).unwrap();
    let text = "tenants:\n  - id: acme\n    miradore: { site: acme, apiKey: { fingerprint: \"sha256:0123456789ab\" } }\n";
    let mount = SecretMount::new(&mount_dir, &[("tenants.yaml", text)]);
    let msg = start(root.path(), &mount)
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(
        msg.contains("tenants[acme].miradore.api_key") && msg.contains("fingerprint"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// Half-written files, explicit emptiness, the deletion guard, bounded reads (issue 18).
// The watcher is driven poll by poll: no clock, no sleep.

use std::sync::Arc;

use sidekey::store::embedded::EmbeddedStore;
use sidekey::store::master_key::MasterKeys;
use sidekey::tenants::Catalog;
use sidekey::tenants_file::{Poll, TenantsFile};

async fn catalog(dir: &Path) -> Arc<Catalog> {
    let keys = MasterKeys::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap();
    let store = EmbeddedStore::open(&dir.join("data"), keys).unwrap();
    Arc::new(Catalog::open(Arc::new(store)).await.unwrap())
}

fn plain(n: usize) -> String {
    let mut out = String::from("tenants:\n");
    for i in 0..n {
        out.push_str(&format!(
            "  - id: t{i}\n    miradore: {{ site: s{i}, apiKey: {{ value: key-{i} }} }}\n"
        ));
    }
    out
}

/// Two polls: the first sees a new version, the second confirms and applies it.
async fn settle(w: &mut TenantsFile) -> Poll {
    assert_eq!(w.poll().await, Poll::Settling);
    w.poll().await
}

fn count(catalog: &Catalog) -> usize {
    catalog.snapshot().load().len()
}

#[tokio::test]
async fn a_half_written_file_is_not_applied_until_two_reads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    let full = plain(20);
    std::fs::write(&path, &full).unwrap();
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(HOUR);
    assert!(matches!(settle(&mut w).await, Poll::Applied(_)));
    assert_eq!(count(&catalog), 20);
    // Unchanged: nothing read, nothing applied.
    assert_eq!(w.poll().await, Poll::Unchanged);

    // Truncate-and-rewrite caught in the middle, at every kind of cut: seen once, never
    // applied, and the rewritten file is the version already in force.
    for cut in [0, 1, 9, full.len() / 3, full.len() / 2, full.len() - 20] {
        std::fs::write(&path, &full[..cut]).unwrap();
        assert_eq!(w.poll().await, Poll::Settling, "cut at {cut}");
        assert_eq!(count(&catalog), 20);
        std::fs::write(&path, &full).unwrap();
        assert_eq!(w.poll().await, Poll::Unchanged, "cut at {cut}");
        assert_eq!(count(&catalog), 20);
    }
}

/// Sets a file's modification time, as `touch -d` would.
fn set_modified(path: &Path, at: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(at)
        .unwrap();
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_file_unmodified_for_the_quiet_period_is_applied_at_first_sight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    let quiet = Duration::from_secs(60);
    let watcher = || {
        TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
            .quiet_period(quiet)
    };

    // Written an hour ago (a Secret mounted before the pod started): no second read needed.
    std::fs::write(&path, plain(3)).unwrap();
    set_modified(&path, SystemTime::now() - HOUR);
    let mut w = watcher();
    assert!(matches!(w.poll().await, Poll::Applied(_)));
    assert_eq!(count(&catalog), 3);

    // Written just now: it may still be being written, so a second read confirms it.
    std::fs::write(&path, plain(4)).unwrap();
    assert_eq!(w.poll().await, Poll::Settling);
    assert_eq!(count(&catalog), 3);
    assert!(matches!(w.poll().await, Poll::Applied(_)));
    assert_eq!(count(&catalog), 4);

    // A modification time in the future (a skewed clock) proves nothing.
    std::fs::write(&path, plain(5)).unwrap();
    set_modified(&path, SystemTime::now() + HOUR);
    assert_eq!(w.poll().await, Poll::Settling);
    assert_eq!(count(&catalog), 4);
    assert!(matches!(w.poll().await, Poll::Applied(_)));
    assert_eq!(count(&catalog), 5);

    // An old file whose secret file was written just now waits too: every file counts.
    let secret = dir.path().join("key");
    std::fs::write(&secret, "key-from-file\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "tenants:\n  - id: t0\n    miradore: {{ site: s0, apiKey: {{ valueFrom: {{ file: {} }} }} }}\n",
            secret.display()
        ),
    )
    .unwrap();
    set_modified(&path, SystemTime::now() - HOUR);
    let mut w = watcher().max_delete_percent(100);
    assert_eq!(w.poll().await, Poll::Settling);
    assert_eq!(count(&catalog), 5);
    // Both old: applied at first sight by a watcher that has seen neither.
    set_modified(&secret, SystemTime::now() - HOUR);
    let mut w = watcher().max_delete_percent(100);
    assert!(matches!(w.poll().await, Poll::Applied(r) if r.deleted == 4));
    assert_eq!(count(&catalog), 1);
}

#[tokio::test]
async fn start_up_does_not_wait_a_poll_interval_for_a_file_already_in_place() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("tenants.yaml");
    std::fs::write(&path, plain(2)).unwrap();
    set_modified(&path, SystemTime::now() - HOUR);
    // Two reads one interval apart would take an hour.
    let running = start_with_an_hour_interval(root.path(), &path).await;
    assert_eq!(count(&running.catalog), 2);
}

/// Starts sidekey with `path` polled every hour: a start-up that waited for a poll interval
/// would fail here rather than hang.
async fn start_with_an_hour_interval(root: &Path, path: &Path) -> Running {
    let config = config_with_file(root, path, HOUR);
    tokio::time::timeout(BOUND, server::start(config))
        .await
        .expect("start-up waited a poll interval")
        .unwrap()
}

fn config_with_file(root: &Path, path: &Path, interval: Duration) -> ServeConfig {
    let mut config = ServeConfig::ephemeral(root.join("data"));
    config.master_key = Some(Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="));
    config.tenants_file = Some(path.to_owned());
    config.tenants_file_interval = interval;
    config
}

#[tokio::test]
async fn start_up_reads_a_file_written_just_before_it_again_after_the_quiet_period() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("tenants.yaml");
    std::fs::write(&path, plain(2)).unwrap();
    // Not an hour: the second read comes once the file has been quiet for QUIET_PERIOD.
    let running = start_with_an_hour_interval(root.path(), &path).await;
    assert_eq!(count(&running.catalog), 2);
}

#[tokio::test]
async fn a_file_that_keeps_changing_at_start_up_stops_sidekey() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("tenants.yaml");
    std::fs::write(&path, plain(1)).unwrap();
    // A writer replacing the file (whole, by rename) with a new version all the time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let tmp = path.with_extension("tmp");
            let mut version = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                std::fs::write(&tmp, format!("# version {version}\n{}", plain(1))).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
        })
    };
    let config = config_with_file(root.path(), &path, Duration::from_millis(300));
    let result = tokio::time::timeout(BOUND, server::start(config))
        .await
        .expect("start-up gave up");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let msg = result.err().expect("must not start").to_string();
    assert!(msg.contains("kept changing"), "{msg}");
    assert!(msg.contains("tenants.yaml"), "{msg}");
}

#[tokio::test]
async fn an_empty_declaration_must_be_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    std::fs::write(&path, plain(1)).unwrap();
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(HOUR);
    assert!(matches!(settle(&mut w).await, Poll::Applied(_)));

    for text in [
        "",
        "\n",
        "# all tenants moved\n",
        "tenants:\n",
        "tenants: ~\n",
        "partnerDefaults: {}\n",
    ] {
        std::fs::write(&path, text).unwrap();
        match settle(&mut w).await {
            Poll::Rejected(e) => assert!(e.contains("tenants: []"), "{text:?}: {e}"),
            other => panic!("{text:?}: {other:?}"),
        }
        assert_eq!(count(&catalog), 1, "{text:?}");
    }
    std::fs::write(&path, "tenants: []\n").unwrap();
    assert!(matches!(settle(&mut w).await, Poll::Applied(r) if r.deleted == 1));
    assert_eq!(count(&catalog), 0);
}

#[tokio::test]
async fn deleting_more_than_the_allowed_share_needs_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    std::fs::write(&path, plain(10)).unwrap();
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(HOUR);
    assert!(matches!(settle(&mut w).await, Poll::Applied(_)));

    // 6 of 10 is more than the default 50 %: refused, all ten kept.
    std::fs::write(&path, plain(4)).unwrap();
    match settle(&mut w).await {
        Poll::Rejected(e) => {
            assert!(e.contains("delete 6 of the 10"), "{e}");
            assert!(e.contains("--tenants-file-max-delete"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(count(&catalog), 10);
    // 5 of 10 is within it.
    std::fs::write(&path, plain(5)).unwrap();
    assert!(matches!(settle(&mut w).await, Poll::Applied(r) if r.deleted == 5));
    // With the setting raised, a large deletion goes through.
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(HOUR)
        .max_delete_percent(100);
    std::fs::write(&path, "tenants: []\n").unwrap();
    assert!(matches!(settle(&mut w).await, Poll::Applied(r) if r.deleted == 5));
}

#[tokio::test]
async fn secret_references_and_the_file_itself_are_read_with_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    let fifo = dir.path().join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let huge = dir.path().join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();

    for (source, why) in [
        (Path::new("/dev/zero"), "not a regular file"),
        (fifo.as_path(), "not a regular file"),
        (huge.as_path(), "larger than"),
        (dir.path(), "not a regular file"),
    ] {
        std::fs::write(
            &path,
            format!(
                "tenants:\n  - id: a\n    miradore: {{ site: a, apiKey: {{ valueFrom: {{ file: {} }} }} }}\n",
                source.display()
            ),
        )
        .unwrap();
        let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
            .quiet_period(HOUR);
        // Bounded by the test itself: a read that blocked would fail here, not hang.
        let polled = tokio::time::timeout(BOUND, settle(&mut w))
            .await
            .expect("no hang");
        match polled {
            Poll::Rejected(e) => assert!(e.contains(why), "{source:?}: {e}"),
            other => panic!("{source:?}: {other:?}"),
        }
    }

    // The tenants file itself: a FIFO, and a file over the size cap (not read at all).
    for (file, why) in [
        (fifo.as_path(), "not a regular file"),
        (huge.as_path(), "larger than"),
    ] {
        let mut w = TenantsFile::new(file.to_owned(), &dir.path().join("data"), catalog.clone())
            .quiet_period(HOUR);
        match tokio::time::timeout(BOUND, w.poll())
            .await
            .expect("no hang")
        {
            Poll::Rejected(e) => assert!(e.contains(why), "{file:?}: {e}"),
            other => panic!("{file:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn deeply_nested_yaml_is_refused_before_parsing_and_never_quotes_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    let catalog = catalog(dir.path()).await;
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(HOUR);
    std::fs::write(
        &path,
        format!("tenants: {}{}\n", "[".repeat(60_000), "]".repeat(60_000)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    match settle(&mut w).await {
        Poll::Rejected(e) => assert!(e.contains("nested more than"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A string where `{ value: ... }` is expected: the error names the field and the line.
    std::fs::write(
        &path,
        "tenants:\n  - id: a\n    miradore: { site: a, apiKey: \"s3cret-value\" }\n",
    )
    .unwrap();
    match settle(&mut w).await {
        Poll::Rejected(e) => {
            assert!(
                e.contains("tenants[0].miradore.apiKey") && e.contains("line 3"),
                "{e}"
            );
            assert!(!e.contains("s3cret"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}
