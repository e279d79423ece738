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
    let mut t = tenant(id, key);
    t.etag = etag.into();
    c.update_tenant(proto::UpdateTenantRequest {
        tenant: Some(t),
        update_mask: None,
    })
    .await
    .map(tonic::Response::into_inner)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_sidekey_reach_the_others_proxy() {
    let etcd = Etcd::start();
    let vendor = Vendor::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let a = vendor.sidekey(&dirs.path().join("a"), &etcd.endpoint()).await;
    let b = vendor.sidekey(&dirs.path().join("b"), &etcd.endpoint()).await;
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
