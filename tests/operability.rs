//! Operability: health and readiness through start, ready and drain (with a slow upstream
//! request in flight), and metrics that move with traffic.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use sidekey::config::ServeConfig;
use sidekey::secret::Secret;
use sidekey::server::{self, Running};
use sidekey::tenants::{Connections, MiradoreConn};
use support::{MockResponse, MockVendor, TestCa, connect_to_rules};
use tokio::sync::Notify;

/// The metrics recorder is process-wide. Under `cargo test` every test of this file runs on a
/// thread of one process, so one test's traffic would move the counters another test reads;
/// each test holds this lock for its whole run (nextest runs a process per test anyway).
static ONE_TEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(dir: &std::path::Path, ca: &TestCa, mock: &MockVendor) -> Running {
    start_with(dir, ca, mock, false).await
}

async fn start_with(
    dir: &std::path::Path,
    ca: &TestCa,
    mock: &MockVendor,
    tenant_label: bool,
) -> Running {
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.metrics_tenant_label = tenant_label;
    config.master_key = Some(Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="));
    config.upstream_ca = vec![ca.pem_file()];
    config.connect_to = connect_to_rules(mock.port());
    let running = server::start(config).await.unwrap();
    running
        .catalog
        .create(
            "acme".into(),
            String::new(),
            Connections {
                miradore: Some(MiradoreConn {
                    site: "acme".into(),
                    api_key: Some(Secret::new("1_AaDf234sdf8!4")),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    running
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The value of one series in Prometheus text, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_and_refuses_new_connections() {
    let _serial = ONE_TEST_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("drain test CA");
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let mock = MockVendor::builder(&ca)
        .respond(move |_| MockResponse::gated("first-", 1 << 20, g.clone()))
        .start()
        .await;
    let running = start(dir.path(), &ca, &mock).await;
    let (admin, proxy) = (running.admin_addr, running.proxy_addr);
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await.0, 200);

    // A slow download is in flight: its head and first bytes have arrived.
    let resp = reqwest::Client::new()
        .get(format!("http://{proxy}/miradore/acme/api/v2/Device"))
        .header("x-sidekey-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = http_body_util::BodyStream::new(reqwest::Body::from(resp));

    running.drain();
    assert_eq!(
        get(admin, "/readyz").await.0,
        503,
        "not ready from the moment the drain starts"
    );
    assert_eq!(
        get(admin, "/healthz").await.0,
        200,
        "still alive while draining"
    );

    // The proxy's listener closes (the kernel refuses new connections once it is dropped).
    let mut refused = false;
    for _ in 0..100_000 {
        if tokio::net::TcpStream::connect(proxy).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "new connections are still accepted while draining");

    // The in-flight download completes in full.
    let shutdown = tokio::spawn(running.shutdown());
    gate.notify_one();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
        }
    }
    assert_eq!(received, "first-".len() + (1 << 20));
    assert!(
        shutdown.await.unwrap(),
        "everything finished within the grace period"
    );
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "admin stops last"
    );
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let _serial = ONE_TEST_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("metrics test CA");
    let mock = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let running = start(dir.path(), &ca, &mock).await;
    let before = get(running.admin_addr, "/metrics").await.1;

    let client = reqwest::Client::new();
    for tenant in ["acme", "acme", "nobody"] {
        client
            .get(format!(
                "http://{}/miradore/acme/api/v2/Device",
                running.proxy_addr
            ))
            .header("x-sidekey-tenant", tenant)
            .send()
            .await
            .unwrap();
    }
    let mut grpc = sidekey::proto::tenant_service_client::TenantServiceClient::connect(
        running.grpc_url.clone(),
    )
    .await
    .unwrap();
    let _ = grpc
        .get_tenant(sidekey::proto::GetTenantRequest { id: "ghost".into() })
        .await;

    let after = get(running.admin_addr, "/metrics").await.1;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta(r#"sidekey_proxy_requests_total{vendor="miradore",status_class="2xx",error="none"}"#),
        2.0,
        "{after}"
    );
    assert_eq!(
        delta(
            r#"sidekey_proxy_requests_total{vendor="none",status_class="4xx",error="unknown_tenant"}"#
        ),
        1.0
    );
    assert_eq!(
        delta(r#"sidekey_proxy_request_duration_seconds_count{vendor="miradore"}"#),
        2.0
    );
    assert_eq!(
        delta(r#"sidekey_control_calls_total{method="GetTenant",code="NotFound"}"#),
        1.0
    );
    assert_eq!(metric(&after, "sidekey_tenants_configured"), 1.0);
    // No tenant label unless asked for.
    assert!(!after.contains("sidekey_proxy_requests_by_tenant_total"));
}

#[tokio::test]
async fn the_opt_in_tenant_label_is_capped() {
    let _serial = ONE_TEST_AT_A_TIME.lock().await;
    use sidekey::proxy::MAX_TENANT_LABELS;
    use sidekey::tenants::{Declared, DeclaredTenant};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("label test CA");
    let mock = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let running = start_with(dir.path(), &ca, &mock, true).await;
    let ids: Vec<String> = (0..MAX_TENANT_LABELS + 5)
        .map(|i| format!("t{i}"))
        .collect();
    running
        .catalog
        .apply_declared(Declared {
            tenants: ids
                .iter()
                .map(|id| DeclaredTenant {
                    id: id.clone(),
                    display_name: String::new(),
                    connections: Connections {
                        miradore: Some(MiradoreConn {
                            site: "acme".into(),
                            api_key: Some(Secret::new("k")),
                        }),
                        ..Default::default()
                    },
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    let client = reqwest::Client::new();
    for id in ids.iter().chain(["unknown-tenant".to_owned()].iter()) {
        client
            .get(format!(
                "http://{}/miradore/acme/api/v2/Device",
                running.proxy_addr
            ))
            .header("x-sidekey-tenant", id)
            .send()
            .await
            .unwrap();
    }
    let text = get(running.admin_addr, "/metrics").await.1;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sidekey_proxy_requests_by_tenant_total{"))
        .collect();
    assert_eq!(series.len(), MAX_TENANT_LABELS + 1, "{series:?}");
    assert_eq!(
        metric(
            &text,
            r#"sidekey_proxy_requests_by_tenant_total{tenant="other",vendor="miradore"}"#
        ),
        5.0
    );
    assert!(
        !text.contains("unknown-tenant"),
        "callers must not mint labels"
    );
}

#[tokio::test]
async fn readyz_reports_a_proxy_whose_connection_slots_are_all_taken() {
    use sidekey::admin::{self, Readiness};
    use sidekey::proxy::{Proxy, ProxyConfig};
    use sidekey::tenants::SnapshotReader;

    let client = sidekey::upstream::Client::new(Default::default()).unwrap();
    let proxy = Proxy::new(
        SnapshotReader::fixed(Vec::new()),
        client,
        Arc::new(support::tokens::Fixed("t")),
        ProxyConfig {
            max_connections: 2,
            ..ProxyConfig::default()
        },
    );
    let readiness = Readiness::default();
    readiness.set(true);
    readiness.watch_proxy_slots(proxy.connection_slots());
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap();
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    tokio::spawn(sidekey::proxy::serve(
        proxy_listener,
        proxy,
        std::future::pending(),
    ));
    tokio::spawn(admin::serve(
        admin_listener,
        readiness,
        std::future::pending(),
    ));

    let until = |want: u16| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, body) = get(admin_addr, "/readyz").await;
            if status == want {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz stayed {status}: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    assert_eq!(until(200).await, "ready\n");
    // Two connections that send nothing take both slots.
    let idle = [
        tokio::net::TcpStream::connect(proxy_addr).await.unwrap(),
        tokio::net::TcpStream::connect(proxy_addr).await.unwrap(),
    ];
    let why = until(503).await;
    assert!(why.contains("all 2 proxy connections are in use"), "{why}");
    // `/healthz` is about the process, which is fine.
    assert_eq!(get(admin_addr, "/healthz").await.0, 200);
    drop(idle);
    until(200).await;
}

/// A sidekey whose Miradore mock (`good`) is trusted and whose m3ter host leads to a mock
/// (`untrusted`) with a certificate from a CA sidekey does not trust, with a tenants file
/// declaring `acme` (Miradore) and `metered` (m3ter). The tenant label stays off: its series
/// would outlive this test in a shared process and break the others' counts of it.
async fn start_with_untrusted_m3ter(
    dir: &std::path::Path,
    ca: &TestCa,
    good: &MockVendor,
    untrusted: &MockVendor,
) -> Running {
    let file = dir.join("tenants.yaml");
    std::fs::write(
        &file,
        "tenants:\n  \
         - id: acme\n    miradore: { site: acme, apiKey: { value: k1 } }\n  \
         - id: metered\n    m3ter: { accessKeyId: key-1, apiSecret: { value: s1 }, \
         orgId: 0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa }\n",
    )
    .unwrap();
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.master_key = Some(Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="));
    config.upstream_ca = vec![ca.pem_file()];
    config.connect_to = vec![
        format!("*.miradore.com:443:127.0.0.1:{}", good.port())
            .parse()
            .unwrap(),
        format!("*.m3ter.com:443:127.0.0.1:{}", untrusted.port())
            .parse()
            .unwrap(),
    ];
    config.tenants_file = Some(file);
    config.tenants_file_interval = std::time::Duration::from_millis(20);
    server::start(config).await.unwrap()
}

async fn proxied(running: &Running, tenant: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{}{path}", running.proxy_addr))
        .header("x-sidekey-tenant", tenant)
        .send()
        .await
        .unwrap()
}

const M3TER_METERS: &str = "/m3ter/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters";

/// A TLS failure toward m3ter's token endpoint counts as an upstream error of kind `tls`,
/// like the same failure on a data call, and the app's 502 counts under `5xx`.
#[tokio::test]
async fn a_tls_failure_in_the_token_exchange_is_an_upstream_error() {
    let _serial = ONE_TEST_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("trusted CA");
    let other = TestCa::new("a CA sidekey does not trust");
    let good = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let untrusted = MockVendor::builder(&other)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let running = start_with_untrusted_m3ter(dir.path(), &ca, &good, &untrusted).await;
    let before = get(running.admin_addr, "/metrics").await.1;

    let resp = proxied(&running, "metered", M3TER_METERS).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sidekey-error"], "token_exchange_failed");
    assert!(untrusted.requests().is_empty(), "no request got past TLS");

    let after = get(running.admin_addr, "/metrics").await.1;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta(r#"sidekey_upstream_errors_total{vendor="m3ter",kind="tls"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(r#"sidekey_token_exchanges_total{outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        delta(
            r#"sidekey_proxy_requests_total{vendor="m3ter",status_class="5xx",error="token_exchange_failed"}"#
        ),
        1.0
    );
    running.shutdown().await;
}

/// Every family in a scrape after traffic through every plane has one `# HELP` and one
/// `# TYPE` line (what `promtool check metrics` requires), and the families this traffic
/// reaches are all there.
#[tokio::test]
async fn every_family_has_help_and_type() {
    let _serial = ONE_TEST_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("trusted CA");
    let other = TestCa::new("a CA sidekey does not trust");
    let good = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let untrusted = MockVendor::builder(&other)
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let running = start_with_untrusted_m3ter(dir.path(), &ca, &good, &untrusted).await;
    for (tenant, path) in [
        ("acme", "/miradore/acme/api/v2/Device"),
        ("nobody", "/miradore/acme/api/v2/Device"),
        ("metered", M3TER_METERS),
        // Within the failed exchange's backoff: refused without a new exchange.
        ("metered", M3TER_METERS),
    ] {
        proxied(&running, tenant, path).await;
    }
    let mut grpc = sidekey::proto::tenant_service_client::TenantServiceClient::connect(
        running.grpc_url.clone(),
    )
    .await
    .unwrap();
    let _ = grpc
        .get_tenant(sidekey::proto::GetTenantRequest { id: "ghost".into() })
        .await;
    let text = get(running.admin_addr, "/metrics").await.1;

    let declared = |prefix: &str| -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, rest)| (name.to_owned(), rest.to_owned()))
            .collect()
    };
    let types = declared("# TYPE ");
    let helps = declared("# HELP ");
    for (name, _) in &types {
        assert_eq!(
            types.iter().filter(|(n, _)| n == name).count(),
            1,
            "{name}: TYPE twice"
        );
        assert_eq!(
            helps.iter().filter(|(n, _)| n == name).count(),
            1,
            "{name} has no HELP (or two):\n{text}"
        );
    }
    // Every sample belongs to a family with a TYPE (histograms: _bucket, _sum, _count).
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = [name]
            .into_iter()
            .chain(["_bucket", "_sum", "_count"].map(|s| name.strip_suffix(s).unwrap_or(name)))
            .find(|f| types.iter().any(|(n, _)| n == f));
        assert!(family.is_some(), "{name} has no TYPE:\n{text}");
    }
    for family in [
        "sidekey_proxy_requests_total",
        "sidekey_proxy_request_duration_seconds",
        "sidekey_proxy_body_budget_held_bytes",
        "sidekey_upstream_errors_total",
        "sidekey_token_exchanges_total",
        "sidekey_token_backoff_rejections_total",
        "sidekey_control_calls_total",
        "sidekey_tenants_configured",
        "sidekey_tenants_file_applies_total",
        "sidekey_store_healthy",
        "sidekey_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            types.iter().any(|(n, _)| n == family),
            "{family} missing:\n{text}"
        );
    }
    // The histogram reaches the proxy's request timeout.
    let top = sidekey::proxy::ProxyConfig::default()
        .request_timeout
        .as_secs_f64();
    assert!(
        text.contains(&format!(
            "sidekey_proxy_request_duration_seconds_bucket{{vendor=\"miradore\",le=\"{top}\"}}"
        )),
        "no {top} s bucket:\n{text}"
    );
    running.shutdown().await;
}
