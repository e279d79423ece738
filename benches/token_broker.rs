//! Token broker under load, end to end: the full server (`server::start`) in front of a mock
//! m3ter over real TLS. 1,000 tenants with distinct credentials, 100,000 requests spread over
//! them with bounded concurrency. Prints how many exchanges m3ter saw and the latency of
//! each tenant's first request (which waits for an exchange) against later ones (cache hits).
//!
//! Run: `cargo bench --bench token_broker` (see docs/benchmarks.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sidekey::config::ServeConfig;
use sidekey::secret::Secret;
use sidekey::server;
use sidekey::tenants::{Connections, M3terConn};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use support::{MockResponse, MockVendor, TestCa};

const TENANTS: usize = 1_000;
const REQUESTS: usize = 100_000;
const CONCURRENCY: usize = 64;
const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let ca = TestCa::new("sidekey bench CA");
    let exchanges = Arc::new(AtomicUsize::new(0));
    let counted = exchanges.clone();
    let mock = MockVendor::builder(&ca)
        .respond(move |r| {
            if r.uri.path() == "/oauth/token" {
                let n = counted.fetch_add(1, Ordering::Relaxed);
                MockResponse::ok(format!(
                    r#"{{"token_type":"Bearer","access_token":"tok-{n}","expires_in":18000}}"#
                ))
            } else if r
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer tok-"))
            {
                MockResponse::ok("{}")
            } else {
                MockResponse::status(401)
            }
        })
        .start()
        .await;

    let dir = tempfile::tempdir().expect("data dir");
    let mut config = ServeConfig::ephemeral(dir.path().to_path_buf());
    config.master_key = Some(Secret::new(MASTER_KEY));
    config.upstream_ca = vec![ca.pem_file()];
    config.connect_to = support::connect_to_rules(mock.port());
    let running = server::start(config).await.expect("server starts");

    let setup = Instant::now();
    for i in 0..TENANTS {
        let conn = M3terConn {
            access_key_id: format!("key-{i}"),
            api_secret: Some(Secret::new(format!("secret-{i}"))),
            org_id: ORG.into(),
            environment: String::new(),
        };
        running
            .catalog
            .create(
                format!("t{i}"),
                format!("Tenant {i}"),
                Connections {
                    m3ter: Some(conn),
                    ..Default::default()
                },
            )
            .await
            .expect("create tenant");
    }
    let setup = setup.elapsed();

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let url = format!(
        "http://{}/m3ter/organizations/{ORG}/meters",
        running.proxy_addr
    );
    let first_claimed: Arc<Vec<AtomicBool>> =
        Arc::new((0..TENANTS).map(|_| AtomicBool::new(false)).collect());
    let permits = Arc::new(Semaphore::new(CONCURRENCY));

    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..REQUESTS {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let (http, url, first_claimed) = (http.clone(), url.clone(), first_claimed.clone());
        set.spawn(async move {
            let tenant = i % TENANTS;
            let first = !first_claimed[tenant].swap(true, Ordering::Relaxed);
            let t0 = Instant::now();
            let resp = http
                .get(url)
                .header("x-sidekey-tenant", format!("t{tenant}"))
                .send()
                .await
                .expect("proxy answers");
            let status = resp.status();
            let _ = resp.bytes().await;
            drop(permit);
            (first, t0.elapsed(), status.as_u16())
        });
    }
    let mut firsts = Vec::with_capacity(TENANTS);
    let mut laters = Vec::with_capacity(REQUESTS);
    let mut failures = 0usize;
    while let Some(r) = set.join_next().await {
        let (first, latency, status) = r.expect("request task");
        if status != 200 {
            failures += 1;
        }
        if first { &mut firsts } else { &mut laters }.push(latency);
    }
    let total = start.elapsed();
    let made = exchanges.load(Ordering::Relaxed);

    println!("token_broker: full server + mock m3ter over TLS");
    println!(
        "  tenants {TENANTS} (distinct credentials), requests {REQUESTS}, concurrency {CONCURRENCY}"
    );
    println!("  tenant setup          {setup:?}");
    println!("  non-200 answers       {failures}");
    println!("  exchanges at m3ter    {made}");
    println!(
        "  exchanges per 10,000  {:.1}",
        made as f64 * 10_000.0 / REQUESTS as f64
    );
    println!(
        "  total time            {total:?} ({:.0} req/s)",
        REQUESTS as f64 / total.as_secs_f64()
    );
    report("first request/tenant", &mut firsts);
    report("later requests      ", &mut laters);

    running.shutdown().await;
    drop(mock);
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let pct = |p: f64| -> Duration {
        if samples.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[idx]
    };
    println!(
        "  {label}  n={:<5} p50 {:>9.3?}  p99 {:>9.3?}",
        samples.len(),
        pct(0.50),
        pct(0.99)
    );
}
