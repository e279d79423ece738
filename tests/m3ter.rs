//! m3ter end to end through the whole server (`server::start`): app → sidekey proxy (plain
//! HTTP) → mock m3ter (real TLS), with the real token broker and the real exchange.
//!
//! The mock issues `tok-<access key id>-<n>` from `/oauth/token` (n counts exchanges at the
//! mock, from 1) and answers data paths 200 only with a bearer it issued, so a request that
//! reached a data path with the right token is visible in what the mock recorded.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sidekey::config::ServeConfig;
use sidekey::proto::tenant_service_client::TenantServiceClient;
use sidekey::proto::{TestTenantRequest, Vendor};
use sidekey::secret::Secret;
use sidekey::server::{self, Running};
use sidekey::tenants::{Connections, M3terConn};
use tokio::task::JoinSet;

use support::{MockResponse, MockVendor, Recorded, TestCa};

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const ORG_A: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
const ORG_B: &str = "7d1e4b20-1c3f-4a5b-8e9d-0f1a2b3c4d5e";
const OTHER_ORG: &str = "11111111-2222-3333-4444-555555555555";
const SECRET: &str = "m3ter-api-secret-value";
/// Access key IDs the mock refuses at `/oauth/token` with 401.
const BAD_KEY: &str = "revoked-key";

// ---------------------------------------------------------------------------------------
// Harness

/// How the mock m3ter behaves beyond the defaults.
#[derive(Clone, Default)]
struct Behaviour {
    /// When set, the first data request is answered 403 and the flag is cleared.
    refuse_first_data_call: Option<Arc<AtomicBool>>,
    /// `organizationconfig` of this org is answered 403.
    refuse_org_config: Option<&'static str>,
    /// Every data request is answered 403 (e.g. the org was deleted at m3ter).
    refuse_all_data_calls: bool,
}

fn is_token_call(r: &Recorded) -> bool {
    r.uri.path() == "/oauth/token"
}

/// The access key ID of a well-formed exchange request, or `None`.
fn basic_key_id(r: &Recorded) -> Option<String> {
    let b64 = r.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(BASE64.decode(b64).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    (secret == SECRET).then(|| id.to_owned())
}

fn m3ter_responder(b: Behaviour) -> impl Fn(&Recorded) -> MockResponse + Send + Sync + 'static {
    let issued = AtomicUsize::new(0);
    move |r: &Recorded| {
        if is_token_call(r) {
            let well_formed = r.method == http::Method::POST
                && r.body_str() == r#"{"grant_type":"client_credentials"}"#;
            return match basic_key_id(r) {
                Some(id) if well_formed && id != BAD_KEY => {
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    MockResponse::ok(format!(
                        r#"{{"token_type":"Bearer","access_token":"tok-{id}-{n}","expires_in":18000}}"#
                    ))
                    .header("content-type", "application/json")
                }
                _ => MockResponse::status(401).body(r#"{"message":"Unauthorized"}"#),
            };
        }
        let bearer_ok = r
            .header("authorization")
            .is_some_and(|a| a.starts_with("Bearer tok-"));
        if !bearer_ok {
            return MockResponse::status(401);
        }
        if b.refuse_all_data_calls {
            return MockResponse::status(403).body(r#"{"message":"Forbidden"}"#);
        }
        if let Some(flag) = &b.refuse_first_data_call
            && flag.swap(false, Ordering::SeqCst)
        {
            return MockResponse::status(403).body(r#"{"message":"Forbidden"}"#);
        }
        if let Some(org) = b.refuse_org_config
            && r.uri.path() == format!("/organizations/{org}/organizationconfig")
        {
            return MockResponse::status(403).body(r#"{"message":"Forbidden"}"#);
        }
        MockResponse::ok("{}").header("content-type", "application/json")
    }
}

/// The whole server, pointed at a mock m3ter that trusts only the test CA.
struct Env {
    mock: MockVendor,
    running: Running,
    http: reqwest::Client,
    _ca: TestCa,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(b: Behaviour) -> Env {
        let ca = TestCa::new("sidekey m3ter e2e CA");
        let mock = MockVendor::builder(&ca)
            .respond(m3ter_responder(b))
            .start()
            .await;
        let dir = tempfile::tempdir().expect("data dir");
        let mut config = ServeConfig::ephemeral(dir.path().to_path_buf());
        config.master_key = Some(Secret::new(MASTER_KEY));
        config.upstream_ca = vec![ca.pem_file()];
        config.connect_to = support::connect_to_rules(mock.port());
        let running = server::start(config).await.expect("server starts");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        Env {
            mock,
            running,
            http,
            _ca: ca,
            _dir: dir,
        }
    }

    /// A tenant with its own m3ter credentials (blank fields inherit the partner's).
    async fn tenant(&self, id: &str, conn: M3terConn) {
        self.running
            .catalog
            .create(
                id.into(),
                format!("Tenant {id}"),
                Connections {
                    m3ter: Some(conn),
                    ..Default::default()
                },
            )
            .await
            .expect("create tenant");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.proxy_addr, path)
    }

    async fn get(&self, tenant: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .header("x-sidekey-tenant", tenant)
            .send()
            .await
            .expect("proxy answers")
    }

    fn exchanges(&self) -> Vec<Recorded> {
        self.mock
            .requests()
            .into_iter()
            .filter(is_token_call)
            .collect()
    }

    fn data_calls(&self) -> Vec<Recorded> {
        self.mock
            .requests()
            .into_iter()
            .filter(|r| !is_token_call(r))
            .collect()
    }

    async fn stop(self) {
        self.running.shutdown().await;
    }
}

fn own(key: &str, org: &str) -> M3terConn {
    M3terConn {
        access_key_id: key.into(),
        api_secret: Some(Secret::new(SECRET)),
        org_id: org.into(),
        environment: String::new(),
    }
}

fn meters(org: &str) -> String {
    format!("/m3ter/organizations/{org}/meters")
}

/// Asserts a sidekey refusal and returns its message, which must not contain the secret.
async fn refusal(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status().as_u16(), status, "status for {code}");
    assert_eq!(resp.headers()["x-sidekey-error"], code);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON error body");
    assert_eq!(body["error"]["code"], code);
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(!message.contains(SECRET), "secret in message {message:?}");
    let basic = BASE64.encode(format!("{BAD_KEY}:{SECRET}"));
    assert!(!message.contains(&basic), "Basic credential in {message:?}");
    message
}

// ---------------------------------------------------------------------------------------
// Single flight and sharing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_first_requests_make_one_exchange() {
    let env = Env::start(Behaviour::default()).await;
    env.tenant("acme", own("key-acme", ORG_A)).await;

    const N: usize = 500;
    // All 500 are in flight before any can finish: each waits at the barrier, then sends.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut set = JoinSet::new();
    for _ in 0..N {
        let (http, url, barrier) = (env.http.clone(), env.url(&meters(ORG_A)), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            let resp = http
                .get(url)
                .header("x-sidekey-tenant", "acme")
                .send()
                .await
                .expect("proxy answers");
            resp.status().as_u16()
        });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }

    let exchanges = env.exchanges();
    assert_eq!(exchanges.len(), 1, "exactly one exchange for 500 requests");
    let x = &exchanges[0];
    assert_eq!(x.method, http::Method::POST);
    assert_eq!(x.host(), Some("api.m3ter.com"));
    assert_eq!(basic_key_id(x).as_deref(), Some("key-acme"));
    assert_eq!(x.body_str(), r#"{"grant_type":"client_credentials"}"#);

    let data = env.data_calls();
    assert_eq!(data.len(), N);
    let bearers: HashSet<_> = data
        .iter()
        .filter_map(|r| r.header("authorization"))
        .collect();
    assert_eq!(bearers, HashSet::from(["Bearer tok-key-acme-1"]));
    for r in &data {
        assert_eq!(r.path_and_query(), format!("/organizations/{ORG_A}/meters"));
        assert!(r.header("x-sidekey-tenant").is_none());
    }
    env.stop().await;
}

#[tokio::test]
async fn tenants_inheriting_partner_credentials_share_one_exchange() {
    let env = Env::start(Behaviour::default()).await;
    env.running
        .catalog
        .update_partner(None, |p| {
            p.connections.m3ter = Some(own("partner-key", ""));
        })
        .await
        .expect("partner defaults");
    // Own organisations, key and secret inherited.
    for (id, org) in [("t1", ORG_A), ("t2", ORG_B)] {
        let inherit = M3terConn {
            api_secret: None,
            ..own("", org)
        };
        env.tenant(id, inherit).await;
    }

    assert_eq!(env.get("t1", &meters(ORG_A)).await.status(), 200);
    assert_eq!(env.get("t2", &meters(ORG_B)).await.status(), 200);
    assert_eq!(env.get("t1", &meters(ORG_A)).await.status(), 200);

    let exchanges = env.exchanges();
    assert_eq!(exchanges.len(), 1, "shared credential, one exchange");
    assert_eq!(basic_key_id(&exchanges[0]).as_deref(), Some("partner-key"));
    for r in env.data_calls() {
        assert_eq!(r.header("authorization"), Some("Bearer tok-partner-key-1"));
    }
    env.stop().await;
}

#[tokio::test]
async fn tenants_with_different_credentials_exchange_separately() {
    let env = Env::start(Behaviour::default()).await;
    env.tenant("t1", own("key-1", ORG_A)).await;
    env.tenant("t2", own("key-2", ORG_A)).await;

    for _ in 0..2 {
        assert_eq!(env.get("t1", &meters(ORG_A)).await.status(), 200);
        assert_eq!(env.get("t2", &meters(ORG_A)).await.status(), 200);
    }

    let keys: HashSet<_> = env.exchanges().iter().filter_map(basic_key_id).collect();
    assert_eq!(env.exchanges().len(), 2);
    assert_eq!(keys, HashSet::from(["key-1".into(), "key-2".into()]));
    let bearers: Vec<_> = env
        .data_calls()
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_owned())
        .collect();
    // Each tenant keeps its own token; which one exchanged first is up to the mock's count.
    assert_eq!(bearers[0], bearers[2]);
    assert_eq!(bearers[1], bearers[3]);
    assert_ne!(bearers[0], bearers[1]);
    assert!(bearers[0].starts_with("Bearer tok-key-1-"));
    assert!(bearers[1].starts_with("Bearer tok-key-2-"));
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Failures

#[tokio::test]
async fn refused_exchange_is_a_502_and_backs_off() {
    let env = Env::start(Behaviour::default()).await;
    env.tenant("revoked", own(BAD_KEY, ORG_A)).await;

    let started = std::time::Instant::now();
    let message = refusal(
        env.get("revoked", &meters(ORG_A)).await,
        502,
        "token_exchange_failed",
    )
    .await;
    assert!(message.contains("HTTP 401"), "{message:?}");
    assert_eq!(env.exchanges().len(), 1);

    // Within the broker's first backoff (1 s), later requests fail fast from the cached
    // error without reaching m3ter.
    for _ in 0..5 {
        let again = refusal(
            env.get("revoked", &meters(ORG_A)).await,
            502,
            "token_exchange_failed",
        )
        .await;
        assert_eq!(again, message);
    }
    let elapsed = started.elapsed();
    assert_eq!(
        env.exchanges().len(),
        1,
        "requests during the backoff reached the token endpoint ({elapsed:?} elapsed)"
    );
    assert!(env.data_calls().is_empty(), "no data call without a token");
    env.stop().await;
}

/// m3ter refuses the data call once (a revoked token): the proxy drops the token, exchanges
/// a fresh one and replays once with it; the app sees only the 200.
#[tokio::test]
async fn data_call_refused_once_is_replayed_once() {
    let flag = Arc::new(AtomicBool::new(true));
    let env = Env::start(Behaviour {
        refuse_first_data_call: Some(flag.clone()),
        ..Default::default()
    })
    .await;
    env.tenant("acme", own("key-acme", ORG_A)).await;

    let resp = env
        .http
        .post(env.url(&format!("/m3ter/organizations/{ORG_A}/measurements")))
        .header("x-sidekey-tenant", "acme")
        .header("content-type", "application/json")
        .body(r#"{"measurements":[]}"#)
        .send()
        .await
        .expect("proxy answers");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-sidekey-error").is_none());
    assert!(!flag.load(Ordering::SeqCst), "the 403 was served");

    let data = env.data_calls();
    assert_eq!(data.len(), 2, "original + exactly one replay");
    for r in &data {
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.body_str(), r#"{"measurements":[]}"#, "body replayed");
    }
    assert_eq!(
        data[0].header("authorization"),
        Some("Bearer tok-key-acme-1")
    );
    assert_eq!(
        data[1].header("authorization"),
        Some("Bearer tok-key-acme-2")
    );
    assert_eq!(
        env.exchanges().len(),
        2,
        "one fresh exchange for the replay"
    );
    env.stop().await;
}

/// m3ter refuses every data call: one fresh exchange and one replay, then the 403 goes to
/// the app unchanged; further refusals within 30 s cause no exchange storm.
#[tokio::test]
async fn data_call_refused_twice_reaches_the_app() {
    let env = Env::start(Behaviour {
        refuse_all_data_calls: true,
        ..Default::default()
    })
    .await;
    env.tenant("acme", own("key-acme", ORG_A)).await;
    for _ in 0..5 {
        let resp = env.get("acme", &meters(ORG_A)).await;
        assert_eq!(resp.status(), 403);
        assert!(
            resp.headers().get("x-sidekey-error").is_none(),
            "m3ter's own answer"
        );
        assert_eq!(resp.text().await.unwrap(), r#"{"message":"Forbidden"}"#);
    }
    // First request: original + replay with a fresh token. Later ones: no replay (the
    // refused token is kept within the refusal interval), no exchange.
    assert_eq!(env.exchanges().len(), 2);
    assert_eq!(env.data_calls().len(), 2 + 4);
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Routing and local answers

#[tokio::test]
async fn oauth_token_is_answered_locally_and_org_is_checked() {
    let env = Env::start(Behaviour::default()).await;
    env.tenant("acme", own("key-acme", ORG_A)).await;

    let resp = env
        .http
        .post(env.url("/m3ter/oauth/token"))
        .header("x-sidekey-tenant", "acme")
        .basic_auth("app-key", Some("app-secret"))
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .expect("proxy answers");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("token JSON");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["access_token"], "sidekey-placeholder");

    let message = refusal(
        env.get("acme", &meters(OTHER_ORG)).await,
        403,
        "org_mismatch",
    )
    .await;
    assert!(message.contains(OTHER_ORG), "{message:?}");

    assert!(
        env.mock.requests().is_empty(),
        "neither the local token nor the mismatch reached m3ter: {:#?}",
        env.mock.requests()
    );
    env.stop().await;
}

#[tokio::test]
async fn staging_environment_routes_to_staging_hosts() {
    let env = Env::start(Behaviour::default()).await;
    env.tenant(
        "stage",
        M3terConn {
            environment: "staging".into(),
            ..own("key-stage", ORG_A)
        },
    )
    .await;

    assert_eq!(env.get("stage", &meters(ORG_A)).await.status(), 200);
    let resp = env
        .http
        .post(env.url(&format!("/m3ter-ingest/organizations/{ORG_A}/measurements")))
        .header("x-sidekey-tenant", "stage")
        .body(r#"{"measurements":[]}"#)
        .send()
        .await
        .expect("proxy answers");
    assert_eq!(resp.status(), 200);

    let exchanges = env.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].host(), Some("api.staging.m3ter.com"));
    let data = env.data_calls();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0].host(), Some("api.staging.m3ter.com"));
    assert_eq!(
        data[0].path_and_query(),
        format!("/organizations/{ORG_A}/meters")
    );
    assert_eq!(data[1].host(), Some("ingest.staging.m3ter.com"));
    assert_eq!(
        data[1].path_and_query(),
        format!("/organizations/{ORG_A}/measurements")
    );
    for r in &data {
        assert_eq!(r.header("authorization"), Some("Bearer tok-key-stage-1"));
    }
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// TestTenant over gRPC

#[tokio::test]
async fn test_tenant_reports_the_vendors_verdict() {
    let env = Env::start(Behaviour {
        refuse_org_config: Some(ORG_B),
        ..Default::default()
    })
    .await;
    env.tenant("good", own("key-good", ORG_A)).await;
    env.tenant("wrong-org", own("key-wrong", ORG_B)).await;
    env.tenant("revoked", own(BAD_KEY, ORG_A)).await;

    let mut grpc = TenantServiceClient::connect(env.running.grpc_url.clone())
        .await
        .expect("gRPC connects");
    let test = |id: &str| TestTenantRequest {
        id: id.into(),
        vendor: Vendor::M3ter as i32,
    };

    let ok = grpc
        .test_tenant(test("good"))
        .await
        .expect("rpc")
        .into_inner();
    assert!(ok.ok, "{ok:?}");
    assert_eq!(ok.http_status, 200);
    let config_reads: Vec<_> = env
        .data_calls()
        .into_iter()
        .filter(|r| r.uri.path() == format!("/organizations/{ORG_A}/organizationconfig"))
        .collect();
    assert_eq!(config_reads.len(), 1);
    assert_eq!(config_reads[0].method, http::Method::GET);
    assert_eq!(config_reads[0].host(), Some("api.m3ter.com"));
    assert_eq!(
        config_reads[0].header("authorization"),
        Some("Bearer tok-key-good-1")
    );

    let refused = grpc
        .test_tenant(test("wrong-org"))
        .await
        .expect("rpc")
        .into_inner();
    assert!(!refused.ok, "{refused:?}");
    assert_eq!(refused.http_status, 403);
    assert!(refused.message.contains("403"), "{refused:?}");

    let revoked = grpc
        .test_tenant(test("revoked"))
        .await
        .expect("rpc")
        .into_inner();
    assert!(!revoked.ok, "{revoked:?}");
    assert!(revoked.message.contains("HTTP 401"), "{revoked:?}");
    assert!(!revoked.message.contains(SECRET));
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Canonical paths (issue 10, finding 4)

/// Sends `head` (a complete HTTP/1.1 request head, `Connection: close`) over a raw socket, so
/// no client library normalises the path first, and returns the status and the whole answer.
async fn raw_request(env: &Env, head: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(env.running.proxy_addr)
        .await
        .expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    (status, out)
}

#[tokio::test]
async fn shared_token_never_reaches_another_organisation_through_a_non_canonical_path() {
    // t1 and t2 share the partner's credentials, hence one token: the organisation check is
    // all that keeps t1 out of t2's organisation.
    let env = Env::start(Behaviour::default()).await;
    env.running
        .catalog
        .update_partner(None, |p| {
            p.connections.m3ter = Some(own("partner-key", ""));
        })
        .await
        .expect("partner defaults");
    for (id, org) in [("t1", ORG_A), ("t2", ORG_B)] {
        let inherit = M3terConn {
            api_secret: None,
            ..own("", org)
        };
        env.tenant(id, inherit).await;
    }
    let paths = [
        format!("//organizations/{ORG_B}/meters"),
        format!("/organizations;v=1/{ORG_B}/meters"),
        format!("/organizations/{ORG_A}/..;/{ORG_B}/meters"),
        format!("/organizations/{ORG_A}/..;/..;/organizations/{ORG_B}/meters"),
        format!("/organizations/{ORG_A}/..%2f..%2forganizations/{ORG_B}/meters"),
        format!("/organizations/{ORG_A}/%2e%2e/{ORG_B}/meters"),
        format!("/%6Frganizations/{ORG_B}/meters"),
        format!("/Organizations/{ORG_B}/meters"),
    ];
    for path in &paths {
        for (prefix, host) in [
            ("/m3ter", "api.m3ter.com"),
            ("/m3ter-ingest", "ingest.m3ter.com"),
        ] {
            for target in [format!("{prefix}{path}"), format!("http://{host}{path}")] {
                let head = format!(
                    "GET {target} HTTP/1.1\r\nHost: {host}\r\nx-sidekey-tenant: t1\r\nConnection: close\r\n\r\n"
                );
                let (status, out) = raw_request(&env, &head).await;
                assert_eq!(status, 400, "{target}: {out}");
                assert!(
                    out.to_ascii_lowercase()
                        .contains("x-sidekey-error: bad_request"),
                    "{target}: {out}"
                );
            }
        }
    }
    assert!(
        env.mock.requests().is_empty(),
        "a non-canonical path reached m3ter: {:#?}",
        env.mock.requests()
    );
    // The canonical path to t1's own organisation still works, on both prefixes.
    assert_eq!(env.get("t1", &meters(ORG_A)).await.status(), 200);
    env.stop().await;
}
