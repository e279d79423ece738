//! Fleet mode on one etcd (issue 13): five `sidekey serve --store etcd` processes, 10,000
//! tenants in etcd. Measures
//! - start-up: from spawning a sidekey to its `sidekey ready` line (every tenant loaded
//!   from etcd and published), and its resident memory then;
//! - propagation: 1,000 updates of one tenant's Miradore key through the first sidekey's
//!   gRPC API; for each, the time from the gRPC acknowledgement until each of the four
//!   others injects the new key (observed through its proxy, against a mock Miradore that
//!   echoes the key it receives);
//! - resident memory of every sidekey after the updates.
//!
//! Run: `cargo bench --bench fleet` (release build; docs/benchmarks.md has a run).
//! `cargo bench --bench fleet -- --quick` runs 1,000 tenants and 100 updates.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sidekey::proto::{self, tenant_service_client::TenantServiceClient};
use sidekey::secret::Secret;
use sidekey::store::etcd::{EtcdConfig, EtcdStore};
use sidekey::store::master_key::MasterKeys;
use sidekey::store::{Expect, Mutation, Store};
use sidekey::tenants::{Connections, MiradoreConn, TenantRecord};
use support::etcd::Etcd;
use support::{MockResponse, MockVendor, TestCa};
use tokio::task::JoinSet;

const SIDEKEYS: usize = 5;
const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Bound of every wait (a start, one propagation).
const DEADLINE: Duration = Duration::from_secs(30);

struct Scale {
    tenants: usize,
    updates: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick {
        Scale {
            tenants: 1_000,
            updates: 100,
        }
    } else {
        Scale {
            tenants: 10_000,
            updates: 1_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(scale));
}

struct Sidekey {
    child: Child,
    proxy: String,
    grpc: String,
    startup: Duration,
    rss_ready_kib: u64,
}

impl Drop for Sidekey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (VmRSS, VmHWM) in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn spawn(etcd: &Etcd, dir: &std::path::Path, ca: &std::path::Path, mock_port: u16) -> Sidekey {
    let connect_to: Vec<String> = ["*.miradore.com"]
        .iter()
        .map(|h| format!("{h}:443:127.0.0.1:{mock_port}"))
        .collect();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--log-format",
            "json",
            "--connect-to",
            &connect_to.join(","),
        ])
        .arg("--upstream-ca")
        .arg(ca)
        .arg("--data-dir")
        .arg(dir)
        .env("SIDEKEY_MASTER_KEY", MASTER_KEY)
        .env("RUST_LOG", "info")
        .env("TOKIO_WORKER_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidekey");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"sidekey ready\"")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(DEADLINE).expect("sidekey ready in time");
    let startup = started.elapsed();
    let ready: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    let field = |k: &str| ready[k].as_str().expect("address field").to_owned();
    let pid = child.id();
    Sidekey {
        proxy: field("proxy"),
        grpc: field("grpc"),
        startup,
        rss_ready_kib: rss(pid).0,
        child,
    }
}

fn tenant(id: &str, key: &str) -> TenantRecord {
    let now = std::time::SystemTime::now();
    TenantRecord {
        id: id.into(),
        display_name: format!("Tenant {id}"),
        connections: Connections {
            miradore: Some(MiradoreConn {
                site: "acme1".into(),
                api_key: Some(Secret::new(key)),
            }),
            ..Connections::default()
        },
        revision: 0,
        create_time: now,
        update_time: now,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(label: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "  {label:<28} n={:<5} p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
        samples.len(),
        percentile(samples, 0.50),
        percentile(samples, 0.99),
        samples[samples.len() - 1]
    );
}

async fn run(scale: Scale) {
    let etcd = Etcd::start();
    let ca = TestCa::new("sidekey fleet bench CA");
    let mock = MockVendor::builder(&ca)
        .respond(|r| MockResponse::ok(r.header("x-api-key").unwrap_or("").to_owned()))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("dir");

    // 10,000 tenants, written as sidekey writes them, in transactions of 128.
    let keys = MasterKeys::parse(MASTER_KEY, "bench").expect("key");
    let store = EtcdStore::new(EtcdConfig::new(vec![etcd.endpoint()]), keys, None).expect("store");
    let filled = Instant::now();
    let records: Vec<_> = (0..scale.tenants)
        .map(|i| {
            let id = format!("bench-{i}");
            let key = format!("key-{id}");
            (Mutation::PutTenant(tenant(&id, &key)), Expect::Absent)
        })
        .collect();
    for chunk in records.chunks(128) {
        store.commit_batch(chunk.to_vec()).await.expect("fill etcd");
    }
    println!(
        "fleet: {SIDEKEYS} sidekeys on one etcd (etcd-server 3.4, loopback), TOKIO_WORKER_THREADS=1 each"
    );
    println!(
        "  tenants in etcd              {} (written in {:?})",
        scale.tenants,
        filled.elapsed()
    );

    let ca_file = ca.pem_file();
    let mut fleet = Vec::new();
    for i in 0..SIDEKEYS {
        let sidekey = spawn(
            &etcd,
            &dir.path().join(format!("s{i}")),
            &ca_file,
            mock.port(),
        );
        println!(
            "  sidekey {i} start-up          {:>9.3?}  RSS when ready {:>6.1} MiB",
            sidekey.startup,
            sidekey.rss_ready_kib as f64 / 1024.0
        );
        fleet.push(sidekey);
    }

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        .build()
        .expect("client");
    let mut writer = TenantServiceClient::connect(fleet[0].grpc.clone())
        .await
        .expect("gRPC");
    let target = "bench-0";
    let mut samples = Vec::with_capacity(scale.updates * (SIDEKEYS - 1));
    let mut acks = Vec::with_capacity(scale.updates);
    let run_started = Instant::now();
    for n in 0..scale.updates {
        let key = format!("rotated-{n}");
        let update = proto::UpdateTenantRequest {
            tenant: Some(proto::Tenant {
                id: target.into(),
                miradore: Some(proto::MiradoreConnection {
                    site: "acme1".into(),
                    api_key: Some(proto::Secret {
                        value: key.clone(),
                        fingerprint: String::new(),
                    }),
                }),
                ..Default::default()
            }),
            update_mask: None,
        };
        let sent = Instant::now();
        writer.update_tenant(update).await.expect("update");
        let acked = Instant::now();
        acks.push(acked - sent);
        let mut watchers = JoinSet::new();
        for sidekey in &fleet[1..] {
            let url = format!("http://{}/miradore/api/v2/Device", sidekey.proxy);
            let http = http.clone();
            let key = key.clone();
            watchers.spawn(async move {
                loop {
                    let body = http
                        .get(&url)
                        .header("x-sidekey-tenant", target)
                        .send()
                        .await
                        .expect("proxy answers")
                        .text()
                        .await
                        .expect("body");
                    if body == key {
                        return acked.elapsed();
                    }
                    assert!(acked.elapsed() < DEADLINE, "update {key} never arrived");
                }
            });
        }
        while let Some(seen) = watchers.join_next().await {
            samples.push(seen.expect("watcher"));
        }
    }
    let total = run_started.elapsed();
    println!(
        "  updates through sidekey 0    {} in {:?} (each waits for all four to see it)",
        scale.updates, total
    );
    summary("gRPC update, to ack", &mut acks);
    summary("ack → injected by another", &mut samples);
    for (i, sidekey) in fleet.iter().enumerate() {
        let (now, peak) = rss(sidekey.child.id());
        println!(
            "  sidekey {i} RSS after         {:>6.1} MiB (peak {:>6.1} MiB)",
            now as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
}
