//! Fleet mode's gauges, alone in their test binary: gauges are process-wide, so with other
//! sidekeys in the same process (`cargo test` runs a binary's tests as threads of one
//! process) their values would be anyone's. One sidekey reaches a real etcd through a relay
//! the test cuts and restores; no sleeps, every wait is a condition with a deadline.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use sidekey::config::{ServeConfig, StoreChoice};
use sidekey::proto::{self, tenant_service_client::TenantServiceClient};
use sidekey::secret::Secret;
use sidekey::server;
use sidekey::store::etcd::EtcdConfig;
use support::etcd::{Etcd, Relay};

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const DEADLINE: Duration = Duration::from_secs(20);

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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_say_whether_etcd_is_reached_since_when_and_what_does_not_open() {
    let etcd = Etcd::start();
    let relay = Relay::start(etcd.addr.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::ephemeral(dir.path().to_path_buf());
    config.master_key = Some(Secret::new(MASTER_KEY));
    let mut etcd_config = EtcdConfig::new(vec![relay.endpoint()]);
    etcd_config.timeout = Duration::from_secs(2);
    config.store = StoreChoice::Etcd {
        config: Box::new(etcd_config),
        password_file: None,
    };
    let sidekey = server::start(config).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}/metrics", sidekey.admin_addr);
    let gauges = || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let text = http.get(&url).send().await.unwrap().text().await.unwrap();
            (
                metric(&text, "sidekey_store_connected"),
                metric(&text, "sidekey_store_disconnected_since_seconds"),
                metric(&text, "sidekey_store_unreadable_records"),
                metric(&text, "sidekey_store_healthy"),
            )
        }
    };
    let (connected, since, unreadable, healthy) = gauges().await;
    assert_eq!(
        (connected, since, unreadable, healthy),
        (Some(1.0), Some(0.0), Some(0.0), Some(1.0))
    );

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    relay.cut();
    let since = eventually("the loss of etcd in the gauges", || async {
        match gauges().await {
            (Some(0.0), Some(since), _, Some(0.0)) => Some(since),
            _ => None,
        }
    })
    .await;
    assert!(since >= before.floor(), "{since} is the time of the loss");
    relay.restore();
    eventually("the reconnection in the gauges", || async {
        (gauges().await.0 == Some(1.0)).then_some(())
    })
    .await;
    let (_, since, _, healthy) = gauges().await;
    assert_eq!((since, healthy), (Some(0.0), Some(1.0)));

    // A value copied onto another key does not open: counted, and no longer once removed.
    let c = TenantServiceClient::connect(sidekey.grpc_url.clone())
        .await
        .unwrap();
    eventually("a write", || {
        let mut c = c.clone();
        async move {
            c.create_tenant(proto::CreateTenantRequest {
                tenant: Some(proto::Tenant {
                    id: "acme".into(),
                    miradore: Some(proto::MiradoreConnection {
                        site: "acme1".into(),
                        api_key: Some(proto::Secret {
                            value: "k".into(),
                            fingerprint: String::new(),
                        }),
                    }),
                    ..Default::default()
                }),
            })
            .await
            .ok()
        }
    })
    .await;
    let mut raw = etcd.client().await;
    let value = raw.get("/sidekey/tenants/acme", None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    raw.put("/sidekey/tenants/copy", value, None).await.unwrap();
    eventually("one unreadable record", || async {
        (gauges().await.2 == Some(1.0)).then_some(())
    })
    .await;
    raw.delete("/sidekey/tenants/copy", None).await.unwrap();
    eventually("no unreadable record", || async {
        (gauges().await.2 == Some(0.0)).then_some(())
    })
    .await;
    sidekey.shutdown().await;
}
