//! Fleet mode against a real etcd (Debian's etcd-server, started per test on ephemeral
//! ports): several sidekeys share their tenants, see each other's writes through their
//! proxies, survive etcd outages and compactions, and never put a secret into etcd.
//!
//! Every wait is a condition polled with a deadline, never a sleep.

mod support;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use sidekey::config::{ServeConfig, StoreChoice};
use sidekey::proto::{self, tenant_service_client::TenantServiceClient};
use sidekey::secret::Secret;
use sidekey::server::{self, Running};
use sidekey::store::etcd::EtcdConfig;
use support::etcd::{Etcd, Relay};
use support::{MockResponse, MockVendor, TestCa};
use tonic::Code;
use tonic::transport::Channel;

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Bound of every polled condition.
const DEADLINE: Duration = Duration::from_secs(20);
const PREFIX: &str = "/sidekey/";

/// Polls `f` until it returns `Some`, for at most [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        // Poll at a modest rate: a condition, not a sleep, decides when to go on.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mock Miradore that echoes the API key it received, so a proxied request shows which
/// credential the sidekey injected.
struct Vendor {
    ca: TestCa,
    mock: MockVendor,
    http: reqwest::Client,
}

impl Vendor {
    async fn start() -> Vendor {
        let ca = TestCa::new("sidekey fleet CA");
        let mock = MockVendor::builder(&ca)
            .respond(|r| MockResponse::ok(r.header("x-api-key").unwrap_or("").to_owned()))
            .start()
            .await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Vendor { ca, mock, http }
    }

    fn config(&self, data_dir: &Path, endpoint: &str) -> ServeConfig {
        let mut config = ServeConfig::ephemeral(data_dir.to_path_buf());
        config.master_key = Some(Secret::new(MASTER_KEY));
        config.upstream_ca = vec![self.ca.pem_file()];
        config.connect_to = support::connect_to_rules(self.mock.port());
        let mut etcd = EtcdConfig::new(vec![endpoint.to_owned()]);
        etcd.timeout = Duration::from_secs(2);
        config.store = StoreChoice::Etcd {
            config: Box::new(etcd),
            password_file: None,
        };
        config
    }

    async fn sidekey(&self, data_dir: &Path, endpoint: &str) -> Running {
        server::start(self.config(data_dir, endpoint))
            .await
            .expect("sidekey starts")
    }

    /// The key `sidekey` injects for `tenant`, or its refusal code.
    async fn injected(&self, sidekey: &Running, tenant: &str) -> Result<String, String> {
        let resp = self
            .http
            .get(format!(
                "http://{}/miradore/api/v2/Device",
                sidekey.proxy_addr
            ))
            .header("x-sidekey-tenant", tenant)
            .send()
            .await
            .expect("proxy answers");
        if resp.status().is_success() {
            Ok(resp.text().await.unwrap())
        } else {
            Err(resp
                .headers()
                .get("x-sidekey-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned())
        }
    }

    /// Waits until `sidekey` answers `want` for `tenant`.
    async fn wait_for(&self, sidekey: &Running, tenant: &str, want: Result<&str, &str>) {
        let want = want.map(str::to_owned).map_err(str::to_owned);
        eventually(&format!("{tenant} to be {want:?}"), || async {
            (self.injected(sidekey, tenant).await == want).then_some(())
        })
        .await;
    }

    /// Waits until `sidekey`'s /readyz body says `line` about its store.
    async fn wait_for_store(&self, sidekey: &Running, line: &str) {
        eventually(&format!("/readyz to say {line:?}"), || async {
            self.admin(sidekey, "/readyz")
                .await
                .1
                .contains(line)
                .then_some(())
        })
        .await;
    }

    async fn admin(&self, sidekey: &Running, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{path}", sidekey.admin_addr))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

async fn client(sidekey: &Running) -> TenantServiceClient<Channel> {
    TenantServiceClient::connect(sidekey.grpc_url.clone())
        .await
        .unwrap()
}

fn tenant(id: &str, key: &str) -> proto::Tenant {
    proto::Tenant {
        id: id.into(),
        display_name: format!("Tenant {id}"),
        miradore: Some(proto::MiradoreConnection {
            site: "acme1".into(),
            api_key: Some(proto::Secret {
                value: key.into(),
                fingerprint: String::new(),
            }),
        }),
        ..Default::default()
    }
}

async fn create(c: &mut TenantServiceClient<Channel>, id: &str, key: &str) -> proto::Tenant {
    c.create_tenant(proto::CreateTenantRequest {
        tenant: Some(tenant(id, key)),
    })
    .await
    .expect("create")
    .into_inner()
}

async fn set_key(
    c: &mut TenantServiceClient<Channel>,
    id: &str,
    key: &str,
    etag: &str,
) -> Result<proto::Tenant, tonic::Status> {
    c.update_tenant(update_request(id, key, etag))
        .await
        .map(tonic::Response::into_inner)
}

/// Sets tenant `id`'s Miradore key, with `etag` (or none when empty).
fn update_request(id: &str, key: &str, etag: &str) -> proto::UpdateTenantRequest {
    let mut t = tenant(id, key);
    t.etag = etag.into();
    proto::UpdateTenantRequest {
        tenant: Some(t),
        update_mask: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_sidekey_reach_the_others_proxy() {
    let etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let a = vendor
        .sidekey(&dirs.path().join("a"), &etcd.endpoint())
        .await;
    let b = vendor
        .sidekey(&dirs.path().join("b"), &etcd.endpoint())
        .await;
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);

    // Created through A, injected by B without any call to B.
    let created = create(&mut ca, "acme", "key-one").await;
    vendor.wait_for(&b, "acme", Ok("key-one")).await;
    vendor.wait_for(&a, "acme", Ok("key-one")).await;

    // The etag is etcd's revision, the same on both sidekeys.
    let read_b = cb
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read_b.etag, created.etag);

    // Updated through A; B's read etag is now stale: ABORTED through B.
    let updated = set_key(&mut ca, "acme", "key-two", &created.etag)
        .await
        .unwrap();
    assert_ne!(updated.etag, created.etag);
    let stale = set_key(&mut cb, "acme", "key-three", &read_b.etag)
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    vendor.wait_for(&b, "acme", Ok("key-two")).await;

    // Create conflicts across sidekeys: the id exists in etcd.
    let twice = cb
        .create_tenant(proto::CreateTenantRequest {
            tenant: Some(tenant("acme", "k")),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(twice.code(), Code::AlreadyExists | Code::Aborted),
        "{twice:?}"
    );

    // Deleted through B: A refuses the tenant.
    cb.delete_tenant(proto::DeleteTenantRequest {
        id: "acme".into(),
        etag: updated.etag.clone(),
    })
    .await
    .unwrap();
    vendor.wait_for(&a, "acme", Err("unknown_tenant")).await;
    vendor.wait_for(&b, "acme", Err("unknown_tenant")).await;
    let gone = ca
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Partner defaults are shared too: a tenant inheriting the key follows them.
    cb.update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
        partner_defaults: Some(proto::PartnerDefaults {
            miradore: Some(proto::MiradoreConnection {
                site: "acme1".into(),
                api_key: Some(proto::Secret {
                    value: "partner-key".into(),
                    fingerprint: String::new(),
                }),
            }),
            ..Default::default()
        }),
        update_mask: None,
    })
    .await
    .unwrap();
    let mut inheriting = tenant("heir", "");
    inheriting.miradore = Some(proto::MiradoreConnection::default());
    eventually("A to know the partner defaults", || {
        let mut ca = ca.clone();
        let inheriting = inheriting.clone();
        async move {
            ca.create_tenant(proto::CreateTenantRequest {
                tenant: Some(inheriting),
            })
            .await
            .ok()
        }
    })
    .await;
    vendor.wait_for(&b, "heir", Ok("partner-key")).await;

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_keeps_the_proxies_serving_refuses_writes_and_catches_up() {
    let mut etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let relay = Relay::start(etcd.addr.clone()).await;
    let a = vendor
        .sidekey(&dirs.path().join("a"), &etcd.endpoint())
        .await;
    let b = vendor
        .sidekey(&dirs.path().join("b"), &relay.endpoint())
        .await;
    let mut ca = client(&a).await;
    let mut cb = client(&b).await;
    let acme = create(&mut ca, "acme", "key-one").await;
    vendor.wait_for(&b, "acme", Ok("key-one")).await;

    // B alone loses etcd: it keeps serving, says so, refuses writes; A goes on. (The gauges
    // are process-wide, shared by every sidekey of a test binary: tests/fleet_metrics.rs
    // checks them alone in its process.)
    relay.cut();
    vendor.wait_for_store(&b, "etcd unreachable since").await;
    let refused = set_key(&mut cb, "acme", "key-b", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    let (status, body) = vendor.admin(&b, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("etcd unreachable since"), "{body}");
    assert_eq!(vendor.injected(&b, "acme").await, Ok("key-one".into()));

    // Changes made meanwhile through A are caught up once B is back.
    let updated = set_key(&mut ca, "acme", "key-two", &acme.etag)
        .await
        .unwrap();
    create(&mut ca, "beta", "beta-key").await;
    assert_eq!(vendor.injected(&b, "acme").await, Ok("key-one".into()));
    relay.restore();
    vendor.wait_for(&b, "acme", Ok("key-two")).await;
    vendor.wait_for(&b, "beta", Ok("beta-key")).await;
    eventually("B to accept writes again", || {
        let mut cb = cb.clone();
        let etag = updated.etag.clone();
        async move { set_key(&mut cb, "acme", "key-three", &etag).await.ok() }
    })
    .await;
    vendor.wait_for(&a, "acme", Ok("key-three")).await;
    vendor.wait_for_store(&b, "store: ok").await;

    // etcd itself stops: both keep proxying, writes are refused UNAVAILABLE on both.
    etcd.stop();
    for (sidekey, c) in [(&a, &mut ca), (&b, &mut cb)] {
        let err = eventually("writes to be refused", || {
            let mut c = c.clone();
            async move {
                c.create_tenant(proto::CreateTenantRequest {
                    tenant: Some(tenant("gamma", "g")),
                })
                .await
                .err()
            }
        })
        .await;
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert_eq!(
            vendor.injected(sidekey, "acme").await,
            Ok("key-three".into())
        );
        assert_eq!(
            vendor.injected(sidekey, "beta").await,
            Ok("beta-key".into())
        );
    }
    vendor.wait_for_store(&a, "etcd unreachable since").await;
    vendor.wait_for_store(&b, "etcd unreachable since").await;

    // etcd back: writes through either sidekey work again and reach the other.
    etcd.restart();
    eventually("A to accept writes again", || {
        let mut ca = ca.clone();
        async move {
            ca.create_tenant(proto::CreateTenantRequest {
                tenant: Some(tenant("gamma", "gamma-key")),
            })
            .await
            .ok()
        }
    })
    .await;
    vendor.wait_for(&b, "gamma", Ok("gamma-key")).await;

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidekey_started_while_etcd_is_down_serves_its_cache_or_waits_not_ready() {
    let mut etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let a_dir = dirs.path().join("a");
    let cache = a_dir.join("etcd-snapshot.sealed");
    let a = vendor.sidekey(&a_dir, &etcd.endpoint()).await;
    let mut ca = client(&a).await;
    // The cache is written from what etcd sent: first the (empty) load, then the create.
    let empty_size = eventually("the first cache", || async {
        std::fs::metadata(&cache).ok().map(|m| m.len())
    })
    .await;
    create(&mut ca, "acme", "key-one").await;
    eventually("the cache to hold the tenant", || async {
        std::fs::metadata(&cache)
            .ok()
            .filter(|m| m.len() > empty_size)
            .map(|_| ())
    })
    .await;
    let raw = std::fs::read(&cache).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("key-one"));
    a.shutdown().await;
    etcd.stop();

    // With the cache: ready, serving, writes refused.
    let a = vendor.sidekey(&a_dir, &etcd.endpoint()).await;
    assert_eq!(vendor.injected(&a, "acme").await, Ok("key-one".into()));
    let (status, body) = vendor.admin(&a, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("etcd unreachable since"), "{body}");
    let mut ca = client(&a).await;
    let refused = set_key(&mut ca, "acme", "key-two", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);

    // Without one: not ready, nothing served, writes refused.
    let fresh = vendor
        .sidekey(&dirs.path().join("fresh"), &etcd.endpoint())
        .await;
    let (status, body) = vendor.admin(&fresh, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        vendor.injected(&fresh, "acme").await,
        Err("unknown_tenant".into())
    );
    let mut cf = client(&fresh).await;
    let refused = cf
        .create_tenant(proto::CreateTenantRequest {
            tenant: Some(tenant("beta", "b")),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // Reads too: an empty answer would be a wrong one.
    let refused = cf
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("not been loaded"), "{refused:?}");
    let refused = cf
        .list_tenants(proto::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // etcd back: the fresh one loads and turns ready; the cached one catches up.
    etcd.restart();
    eventually("the fresh sidekey to turn ready", || async {
        (vendor.admin(&fresh, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    vendor.wait_for(&fresh, "acme", Ok("key-one")).await;
    eventually("a write through the cached sidekey", || {
        let mut ca = ca.clone();
        async move { set_key(&mut ca, "acme", "key-two", "").await.ok() }
    })
    .await;
    vendor.wait_for(&fresh, "acme", Ok("key-two")).await;

    a.shutdown().await;
    fresh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_a_watchers_revision_reloads_the_whole_state() {
    let etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let relay = Relay::start(etcd.addr.clone()).await;
    let a = vendor
        .sidekey(&dirs.path().join("a"), &etcd.endpoint())
        .await;
    let b = vendor
        .sidekey(&dirs.path().join("b"), &relay.endpoint())
        .await;
    let mut ca = client(&a).await;
    let acme = create(&mut ca, "acme", "key-one").await;
    let doomed = create(&mut ca, "doomed", "doomed-key").await;
    vendor.wait_for(&b, "doomed", Ok("doomed-key")).await;

    relay.cut();
    vendor.wait_for_store(&b, "etcd unreachable since").await;
    set_key(&mut ca, "acme", "key-two", &acme.etag)
        .await
        .unwrap();
    ca.delete_tenant(proto::DeleteTenantRequest {
        id: "doomed".into(),
        etag: doomed.etag,
    })
    .await
    .unwrap();
    create(&mut ca, "newcomer", "new-key").await;
    let mut raw = etcd.client().await;
    let now = raw
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(now, None).await.unwrap();

    relay.restore();
    vendor.wait_for(&b, "newcomer", Ok("new-key")).await;
    assert_eq!(vendor.injected(&b, "acme").await, Ok("key-two".into()));
    assert_eq!(
        vendor.injected(&b, "doomed").await,
        Err("unknown_tenant".into())
    );
    let mut cb = client(&b).await;
    let (listed_a, listed_b) = (
        ca.list_tenants(proto::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner(),
        cb.list_tenants(proto::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(listed_a.tenants, listed_b.tenants);

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_no_secret_and_a_value_copied_to_another_key_is_refused() {
    let etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let a = vendor
        .sidekey(&dirs.path().join("a"), &etcd.endpoint())
        .await;
    let b = vendor
        .sidekey(&dirs.path().join("b"), &etcd.endpoint())
        .await;
    let mut ca = client(&a).await;
    let secrets = ["alpha-secret-key", "beta-secret-key", "partner-secret-key"];
    create(&mut ca, "alpha", secrets[0]).await;
    create(&mut ca, "beta", secrets[1]).await;
    ca.update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
        partner_defaults: Some(proto::PartnerDefaults {
            miradore: Some(proto::MiradoreConnection {
                site: "acme1".into(),
                api_key: Some(proto::Secret {
                    value: secrets[2].into(),
                    fingerprint: String::new(),
                }),
            }),
            ..Default::default()
        }),
        update_mask: None,
    })
    .await
    .unwrap();
    vendor.wait_for(&b, "beta", Ok(secrets[1])).await;

    let mut raw = etcd.client().await;
    let all = raw
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let keys: Vec<_> = all.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "/sidekey/partner",
            "/sidekey/tenants/alpha",
            "/sidekey/tenants/beta"
        ]
    );
    for kv in all.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        for secret in secrets {
            assert!(
                !value.contains(secret),
                "{secret} in {}",
                kv.key_str().unwrap()
            );
        }
        assert!(
            !value.contains("acme1"),
            "a whole record is sealed, site included"
        );
    }

    // alpha's value put under beta's key, and under a new key: neither is served.
    let alpha = all.kvs()[1].value().to_vec();
    raw.put(format!("{PREFIX}tenants/beta"), alpha.clone(), None)
        .await
        .unwrap();
    raw.put(format!("{PREFIX}tenants/gamma"), alpha.clone(), None)
        .await
        .unwrap();
    for sidekey in [&a, &b] {
        vendor
            .wait_for(sidekey, "beta", Err("unknown_tenant"))
            .await;
        assert_eq!(
            vendor.injected(sidekey, "gamma").await,
            Err("unknown_tenant".into())
        );
        assert_eq!(
            vendor.injected(sidekey, "alpha").await,
            Ok(secrets[0].into())
        );
    }
    // A sidekey loading the tampered store skips them too, and serves the rest.
    let c = vendor
        .sidekey(&dirs.path().join("c"), &etcd.endpoint())
        .await;
    assert_eq!(vendor.injected(&c, "alpha").await, Ok(secrets[0].into()));
    assert_eq!(
        vendor.injected(&c, "beta").await,
        Err("unknown_tenant".into())
    );
    assert_eq!(
        vendor.injected(&c, "gamma").await,
        Err("unknown_tenant".into())
    );

    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// `sidekey serve --store etcd` as a child process, its control plane on a unix socket.
async fn spawn_binary(etcd: &Etcd, dir: &Path, socket: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ])
        .arg("--grpc-listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--data-dir")
        .arg(dir)
        .env("SIDEKEY_MASTER_KEY", MASTER_KEY)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sidekey serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    const CYCLES: usize = 100;
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged: Vec<String> = Vec::new();
    for cycle in 0..CYCLES {
        let socket = dir.path().join(format!("grpc-{cycle}.sock"));
        let mut child = spawn_binary(&etcd, &dir.path().join("data"), &socket).await;
        let args = sidekey::cli::client::ClientArgs {
            server: format!("unix:{}", socket.display()).parse().unwrap(),
            ca_file: None,
            token_file: None,
        };
        let mut c = eventually("the sidekey to serve gRPC", || {
            let args = args.clone();
            async move {
                let mut c = args.connect(None).await.ok()?;
                c.list_tenants(proto::ListTenantsRequest::default())
                    .await
                    .ok()?;
                Some(c)
            }
        })
        .await;
        let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            for n in 0.. {
                let id = format!("t{cycle}-{n}");
                let created = c
                    .create_tenant(proto::CreateTenantRequest {
                        tenant: Some(tenant(&id, &format!("key-{id}"))),
                    })
                    .await;
                if created.is_err() || acks.send(id).is_err() {
                    return;
                }
            }
        });
        // Killed after a varying number of acknowledgements, with the next write in flight.
        let mut seen = 0;
        while seen < 1 + cycle % 4 {
            acknowledged.push(acked.recv().await.expect("a write acknowledged"));
            seen += 1;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        writer.await.unwrap();
        while let Ok(id) = acked.try_recv() {
            acknowledged.push(id);
        }
    }

    // Every acknowledged tenant is in etcd and opens in a sidekey that loads it.
    let vendor = Vendor::start().await;
    let check = vendor
        .sidekey(&dir.path().join("check"), &etcd.endpoint())
        .await;
    assert!(acknowledged.len() >= CYCLES);
    for id in &acknowledged {
        let record = check.catalog.get(id).await.unwrap_or_else(|e| {
            panic!("acknowledged tenant {id} lost: {e}");
        });
        assert_eq!(record.id, *id);
    }
    assert_eq!(
        vendor.injected(&check, &acknowledged[0]).await,
        Ok(format!("key-{}", acknowledged[0]))
    );
    check.shutdown().await;
}

fn keys() -> sidekey::store::master_key::MasterKeys {
    sidekey::store::master_key::MasterKeys::parse(MASTER_KEY, "test").unwrap()
}

fn record(id: &str, key: &str) -> sidekey::tenants::TenantRecord {
    let now = std::time::SystemTime::now();
    sidekey::tenants::TenantRecord {
        id: id.into(),
        display_name: String::new(),
        connections: sidekey::tenants::Connections {
            miradore: Some(sidekey::tenants::MiradoreConn {
                site: "acme1".into(),
                api_key: Some(Secret::new(key)),
            }),
            ..Default::default()
        },
        revision: 0,
        create_time: now,
        update_time: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_compares_and_sets_and_refuses_batches_over_the_txn_limit() {
    use sidekey::store::etcd::EtcdStore;
    use sidekey::store::{Expect, Mutation, Store, StoreError};
    let etcd = Etcd::start();
    let mut config = EtcdConfig::new(vec![etcd.endpoint()]);
    config.max_txn_ops = 3;
    let store = EtcdStore::new(config, keys(), None).unwrap();
    let put = |id: &str, key: &str| Mutation::PutTenant(record(id, key));

    let r1 = store
        .commit(put("acme", "k1"), Expect::Absent)
        .await
        .unwrap();
    assert!(matches!(
        store.commit(put("acme", "k2"), Expect::Absent).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store
            .commit(put("acme", "k2"), Expect::Revision(r1 + 1))
            .await,
        Err(StoreError::Conflict)
    ));
    let r2 = store
        .commit(put("acme", "k2"), Expect::Revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);

    // One failed expectation: nothing of the batch is written.
    let batch = vec![
        (put("beta", "b"), Expect::Absent),
        (put("acme", "k3"), Expect::Revision(r1)),
    ];
    assert!(matches!(
        store.commit_batch(batch).await,
        Err(StoreError::Conflict)
    ));
    // Over the limit: refused before etcd, saying the limit.
    let batch: Vec<_> = (0..4)
        .map(|i| (put(&format!("t{i}"), "k"), Expect::Absent))
        .collect();
    let err = store.commit_batch(batch).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(_)), "{err:?}");
    assert!(err.to_string().contains("at most 3"), "{err}");
    // At the limit: one revision for all.
    let batch = vec![
        (put("beta", "b"), Expect::Absent),
        (put("gamma", "g"), Expect::Absent),
        (Mutation::DeleteTenant("acme".into()), Expect::Revision(r2)),
    ];
    let r3 = store.commit_batch(batch).await.unwrap();
    let state = store.load().await.unwrap();
    let mut ids: Vec<_> = state
        .tenants
        .iter()
        .map(|t| (t.id.as_str(), t.revision))
        .collect();
    ids.sort();
    assert_eq!(ids, [("beta", r3), ("gamma", r3)]);
    assert_eq!(state.revision, r3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_a_password_reach_an_etcd_with_auth() {
    let etcd = Etcd::start_tls(support::etcd::EtcdTls::generate());
    let mut root = etcd.client().await;
    root.user_add("root", "root-password", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.user_add("fleet", "fleet-password", None)
        .await
        .unwrap();
    root.role_add("fleet").await.unwrap();
    root.role_grant_permission(
        "fleet",
        etcd_client::Permission::read_write(PREFIX).with_prefix(),
    )
    .await
    .unwrap();
    root.user_grant_role("fleet", "fleet").await.unwrap();
    root.auth_enable().await.unwrap();

    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let tls = etcd.tls().unwrap();
    let config = |password: &str, dir: &str| {
        let mut config = vendor.config(&dirs.path().join(dir), &etcd.endpoint());
        let StoreChoice::Etcd { config: etcd, .. } = &mut config.store else {
            unreachable!()
        };
        etcd.ca = Some(tls.ca.clone());
        etcd.cert = Some(tls.client_cert.clone());
        etcd.key = Some(tls.client_key.clone());
        etcd.user = Some("fleet".into());
        etcd.password = Some(Secret::new(password));
        config
    };
    let a = server::start(config("fleet-password", "a")).await.unwrap();
    let mut ca = client(&a).await;
    create(&mut ca, "acme", "key-one").await;
    vendor.wait_for(&a, "acme", Ok("key-one")).await;

    // A wrong password is refused at start, and the message holds no password.
    let err = match server::start(config("wrong-password", "b")).await {
        Ok(_) => panic!("started with a wrong etcd password"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("etcd"), "{err}");
    assert!(!err.contains("wrong-password"), "{err}");
    a.shutdown().await;
}

#[test]
fn serve_refuses_fleet_settings_that_cannot_work() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let base = || {
        let mut config = ServeConfig::ephemeral(dirs.path().join("d"));
        config.master_key = Some(Secret::new(MASTER_KEY));
        config.store = StoreChoice::Etcd {
            config: Box::new(EtcdConfig::new(vec!["http://127.0.0.1:9".into()])),
            password_file: None,
        };
        config
    };
    let refused = |config: ServeConfig| match rt.block_on(server::start(config)) {
        Ok(_) => panic!("started"),
        Err(e) => e.to_string(),
    };
    let mut c = base();
    c.master_key = None;
    assert!(refused(c).contains("master key"));
    let mut c = base();
    c.tenants_file = Some(dirs.path().join("tenants.yaml"));
    assert!(refused(c).contains("--tenants-file cannot be used with --store etcd"));
    let mut c = base();
    if let StoreChoice::Etcd { config, .. } = &mut c.store {
        config.endpoints = vec!["127.0.0.1:2379".into()];
    }
    assert!(refused(c).contains("expected http://HOST:PORT"));
    let mut c = base();
    if let StoreChoice::Etcd { config, .. } = &mut c.store {
        config.user = Some("fleet".into());
    }
    assert!(refused(c).contains("--etcd-user needs a password"));
    let mut c = base();
    let password = dirs.path().join("password");
    std::fs::write(&password, "pw\n").unwrap();
    if let StoreChoice::Etcd {
        config,
        password_file,
    } = &mut c.store
    {
        config.password = Some(Secret::new("pw"));
        config.user = Some("fleet".into());
        *password_file = Some(password);
    }
    assert!(refused(c).contains("not both"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_is_copied_into_etcd_and_existing_tenants_are_kept_unless_told() {
    use sidekey::store::copy::{CopyError, copy};
    use sidekey::store::embedded::EmbeddedStore;
    use sidekey::store::etcd::EtcdStore;
    use sidekey::store::{Expect, Mutation, Store};
    let etcd = Etcd::start();
    let dirs = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dirs.path().join("embedded"), keys()).unwrap();
    for i in 0..5 {
        let id = format!("t{i}");
        embedded
            .commit(
                Mutation::PutTenant(record(&id, &format!("key-{id}"))),
                Expect::Absent,
            )
            .await
            .unwrap();
    }
    let etcd_store = EtcdStore::new(EtcdConfig::new(vec![etcd.endpoint()]), keys(), None).unwrap();

    // Batches of 2: three transactions for five tenants.
    let report = copy(&embedded, &etcd_store, false, 2).await.unwrap();
    assert_eq!((report.created, report.replaced), (5, 0));
    let vendor = Vendor::start().await;
    let fleet = vendor
        .sidekey(&dirs.path().join("fleet"), &etcd.endpoint())
        .await;
    for i in 0..5 {
        let id = format!("t{i}");
        assert_eq!(vendor.injected(&fleet, &id).await, Ok(format!("key-{id}")));
    }

    // A tenant changed in etcd since: a second copy refuses and writes nothing.
    let mut c = client(&fleet).await;
    set_key(&mut c, "t0", "changed-in-etcd", "").await.unwrap();
    embedded
        .commit(Mutation::PutTenant(record("t9", "key-t9")), Expect::Absent)
        .await
        .unwrap();
    let err = copy(&embedded, &etcd_store, false, 2).await.unwrap_err();
    assert!(
        matches!(&err, CopyError::Exists { ids } if ids.len() == 5),
        "{err}"
    );
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(
        vendor.injected(&fleet, "t9").await,
        Err("unknown_tenant".into())
    );
    assert_eq!(
        vendor.injected(&fleet, "t0").await,
        Ok("changed-in-etcd".into())
    );

    // Told to: replaced, and the new one created.
    let report = copy(&embedded, &etcd_store, true, 128).await.unwrap();
    assert_eq!((report.created, report.replaced), (1, 5));
    vendor.wait_for(&fleet, "t0", Ok("key-t0")).await;
    vendor.wait_for(&fleet, "t9", Ok("key-t9")).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidekey_that_never_reached_etcd_is_not_ready_and_drains_at_once() {
    let vendor = Vendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the discard port: every attempt is refused.
    let mut config = vendor.config(dir.path(), "http://127.0.0.1:9");
    config.shutdown_grace = Duration::from_secs(2);
    let sidekey = server::start(config).await.unwrap();
    let (status, body) = vendor.admin(&sidekey, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("etcd unreachable since"), "{body}");
    // Nothing waits for a first load that will not come.
    assert!(sidekey.shutdown().await, "drained within the grace period");
}

/// `sidekey store copy ...` with `key` in SIDEKEY_MASTER_KEY: (success, stdout, stderr).
fn store_copy(args: &[&str], key: &str) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args(["store", "copy"])
        .args(args)
        .env("SIDEKEY_MASTER_KEY", key)
        .output()
        .expect("run sidekey store copy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_an_embedded_store_into_etcd_and_reseals_under_a_new_key() {
    use sidekey::store::embedded::EmbeddedStore;
    use sidekey::store::{Expect, Mutation, Store};
    let etcd = Etcd::start();
    let dirs = tempfile::tempdir().unwrap();
    let data = dirs.path().join("embedded");
    {
        let embedded = EmbeddedStore::open(&data, keys()).unwrap();
        for id in ["acme", "beta"] {
            let record = record(id, &format!("secret-of-{id}"));
            embedded
                .commit(Mutation::PutTenant(record), Expect::Absent)
                .await
                .unwrap();
        }
    }
    let from = format!("embedded:{}", data.display());
    let endpoint = etcd.endpoint();
    let etcd_flags = ["--etcd-endpoints", endpoint.as_str()];
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--from", from.as_str(), "--to", "etcd"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(etcd_flags.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str], key: &str| {
        let a = args(extra);
        store_copy(&a.iter().map(String::as_str).collect::<Vec<_>>(), key)
    };

    let (ok, out, err) = run(&[], MASTER_KEY);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "copied 2 tenants (2 created, 0 replaced)");
    // Again: refused, naming the tenants and the way out; nothing changes.
    let (ok, _, err) = run(&[], MASTER_KEY);
    assert!(!ok);
    assert!(
        err.contains("acme, beta") && err.contains("--overwrite"),
        "{err}"
    );
    let (ok, out, err) = run(&["--overwrite"], MASTER_KEY);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "copied 2 tenants (0 created, 2 replaced)");

    // Rotation across the fleet: a new key first, the old one second; etcd onto itself.
    const NEW_KEY: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";
    let ring = format!("{NEW_KEY},{MASTER_KEY}");
    let reseal = [
        "--from",
        "etcd",
        "--to",
        "etcd",
        "--etcd-endpoints",
        &endpoint,
    ];
    let (ok, _, err) = store_copy(&reseal, &ring);
    assert!(!ok, "etcd onto itself needs --overwrite");
    assert!(err.contains("--overwrite"), "{err}");
    let mut with_overwrite = reseal.to_vec();
    with_overwrite.push("--overwrite");
    let (ok, out, err) = store_copy(&with_overwrite, &ring);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "copied 2 tenants (0 created, 2 replaced)");
    let new_id = sidekey::store::master_key::MasterKeys::parse(NEW_KEY, "t")
        .unwrap()
        .active()
        .id();
    let mut raw = etcd.client().await;
    let values = raw
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(values.kvs().len(), 2);
    for kv in values.kvs() {
        assert_eq!(sidekey::store::record::key_id(kv.value()), Some(new_id));
        assert!(!String::from_utf8_lossy(kv.value()).contains("secret-of-"));
    }
    // The new key alone now opens everything.
    let vendor = Vendor::start().await;
    let mut config = vendor.config(&dirs.path().join("fleet"), &endpoint);
    config.master_key = Some(Secret::new(NEW_KEY));
    let fleet = server::start(config).await.unwrap();
    assert_eq!(
        vendor.injected(&fleet, "beta").await,
        Ok("secret-of-beta".into())
    );
    fleet.shutdown().await;

    // Malformed sides are refused before anything is opened.
    let (ok, _, err) = store_copy(&["--from", "redis", "--to", "etcd"], MASTER_KEY);
    assert!(!ok);
    assert!(err.contains("expected embedded:DIR or etcd"), "{err}");
    let missing = format!("embedded:{}", dirs.path().join("nothing").display());
    let (ok, _, err) = store_copy(
        &[
            "--from",
            &missing,
            "--to",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
        ],
        MASTER_KEY,
    );
    assert!(!ok);
    assert!(err.contains("no store in"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_password_reaches_the_log_at_trace_level() {
    let mut etcd = Etcd::start();
    let mut root = etcd.client().await;
    root.user_add("root", "root-password", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    const PASSWORD: &str = "etcd-password-never-logged";
    root.user_add("fleet", PASSWORD, None).await.unwrap();
    root.role_add("fleet").await.unwrap();
    root.role_grant_permission(
        "fleet",
        etcd_client::Permission::read_write(PREFIX).with_prefix(),
    )
    .await
    .unwrap();
    root.user_grant_role("fleet", "fleet").await.unwrap();
    root.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grpc.sock");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-user",
            "fleet",
        ])
        .arg("--grpc-listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SIDEKEY_MASTER_KEY", MASTER_KEY)
        .env("SIDEKEY_ETCD_PASSWORD", PASSWORD)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drained as it comes: a full pipe would stop the child at trace level.
    let mut stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut log = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut log)
            .await
            .unwrap();
        String::from_utf8_lossy(&log).into_owned()
    });
    let args = sidekey::cli::client::ClientArgs {
        server: format!("unix:{}", socket.display()).parse().unwrap(),
        ca_file: None,
        token_file: None,
    };
    let mut c = eventually("the sidekey to serve gRPC", || {
        let args = args.clone();
        async move { args.connect(None).await.ok() }
    })
    .await;
    const SECRET: &str = "tenant-secret-never-logged";
    let created = eventually("a first write", || {
        let mut c = c.clone();
        async move {
            c.create_tenant(proto::CreateTenantRequest {
                tenant: Some(tenant("acme", SECRET)),
            })
            .await
            .ok()
        }
    })
    .await
    .into_inner();
    // An outage and a reconnection log too.
    etcd.stop();
    let refused = c
        .update_tenant(update_request("acme", "another-secret", &created.etag))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    etcd.restart();
    eventually("writes to work again", || {
        let mut c = c.clone();
        let etag = created.etag.clone();
        async move {
            c.update_tenant(update_request("acme", SECRET, &etag))
                .await
                .ok()
        }
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let log = reader.await.unwrap();
    assert!(
        log.contains("etcd unreachable since"),
        "the outage is logged"
    );
    for needle in [SECRET, "another-secret", PASSWORD, MASTER_KEY] {
        assert!(!log.contains(needle), "{needle} in the log");
    }
}
