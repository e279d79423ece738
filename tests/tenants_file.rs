//! `--tenants-file`: applied at start-up, re-applied on a Kubernetes-style symlink swap,
//! rejected whole when invalid with the previous state kept.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    let mut config = ServeConfig::ephemeral(root.join("data"));
    config.master_key = Some(Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="));
    config.tenants_file = Some(mount.path("tenants.yaml"));
    config.tenants_file_interval = Duration::from_millis(20);
    server::start(config).await
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
