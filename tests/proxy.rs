//! The data plane over real sockets: app → sidekey (plain HTTP) → mock vendor (TLS).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use sidekey::secret::Secret;
use sidekey::tenants::M3terCreds;
use sidekey::vendors::m3ter::{Bearer, BearerToken, TokenError, TokenSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use support::tenants::*;
use support::{MockResponse, MockVendor, TestCa, TestProxy};

const M3TER_PATH: &str = "/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters";

async fn setup(
    mock: impl FnOnce(support::MockVendorBuilder<'_>) -> support::MockVendorBuilder<'_>,
) -> (TestCa, MockVendor, TestProxy) {
    let ca = TestCa::new("sidekey test CA");
    let vendor = mock(MockVendor::builder(&ca)).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .tenant(bare())
        .trust(&ca)
        .route_to(&vendor)
        .start()
        .await;
    (ca, vendor, proxy)
}

/// Asserts a sidekey refusal: status, `x-sidekey-error`, JSON content type and body code.
async fn assert_refusal(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status().as_u16(), status, "status for {code}");
    assert_eq!(resp.headers()["x-sidekey-error"], code);
    assert_eq!(resp.headers()["content-type"], "application/json");
    request_id_of(resp.headers());
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.unwrap()).expect("JSON error body");
    assert_eq!(body["error"]["code"], code);
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    for secret in [MIRADORE_KEY, M3TER_SECRET, MAILKIT_MD5] {
        assert!(!message.contains(secret), "secret in message {message:?}");
    }
    message
}

/// The response's `x-sidekey-request-id`, which must be 32 lowercase hex digits.
fn request_id_of(headers: &reqwest::header::HeaderMap) -> String {
    let id = headers
        .get("x-sidekey-request-id")
        .expect("x-sidekey-request-id on every answer")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id}"
    );
    id
}

/// The vendor received exactly `want`, with a Content-Length that fits it and no chunking.
fn assert_rewritten_body(rec: &support::Recorded, want: &str) {
    assert_eq!(rec.body_str(), want);
    assert_eq!(
        rec.header("content-length"),
        Some(want.len().to_string().as_str())
    );
    assert!(rec.header("transfer-encoding").is_none());
}

fn assert_no_tenant_headers(rec: &support::Recorded) {
    for h in [
        "x-sidekey-tenant",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(rec.header(h).is_none(), "{h} reached the vendor");
    }
}

// ---------------------------------------------------------------------------------------
// Miradore

#[tokio::test]
async fn miradore_v1_sets_auth_query_replacing_the_apps() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let resp = proxy
        .request(
            reqwest::Method::GET,
            "/miradore/Acme1/API/Device?select=Name,ID&%61uth=app-key&auth=x",
            "acme",
        )
        .header("x-api-key", "app-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = mock.single();
    assert_eq!(
        rec.path_and_query(),
        format!("/Acme1/API/Device?select=Name,ID&auth={MIRADORE_KEY_ENCODED}")
    );
    assert_eq!(rec.host(), Some("online.miradore.com"));
    assert!(rec.header("x-api-key").is_none());
    assert_no_tenant_headers(&rec);
}

#[tokio::test]
async fn miradore_siteless_v1_gets_the_site() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    proxy
        .request(reqwest::Method::GET, "/miradore/API/Device/7", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(
        mock.single().path_and_query(),
        format!("/Acme1/API/Device/7?auth={MIRADORE_KEY_ENCODED}")
    );
}

#[tokio::test]
async fn miradore_v2_headers() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let c = proxy.client();
    for path in [
        "/miradore/Acme1/api/v2/Device?limit=1",
        "/miradore/api/v2/Device?limit=1",
    ] {
        let resp = c
            .get(proxy.url(path))
            .header("x-sidekey-tenant", "acme")
            .header("X-API-Key", "app-key")
            .header("X-Instance-Name", "Other")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let reqs = mock.requests();
    assert_eq!(reqs[0].path_and_query(), "/Acme1/api/v2/Device?limit=1");
    assert_eq!(reqs[0].header("x-api-key"), Some(MIRADORE_KEY));
    assert_eq!(reqs[0].header("x-instance-name"), None);
    assert_eq!(reqs[1].path_and_query(), "/api/v2/Device?limit=1");
    assert_eq!(reqs[1].header("x-api-key"), Some(MIRADORE_KEY));
    assert_eq!(reqs[1].header("x-instance-name"), Some(MIRADORE_SITE));
    for r in &reqs {
        assert_eq!(r.headers.get_all("x-api-key").iter().count(), 1);
        assert_no_tenant_headers(r);
    }
}

#[tokio::test]
async fn http_proxy_client_with_userinfo_uses_absolute_form() {
    let (_ca, mock, proxy) = setup(|m| m.respond(|_| MockResponse::ok("[]"))).await;
    // What `HTTP_PROXY=http://acme:x@127.0.0.1:PORT` produces.
    let resp = proxy
        .proxy_client("acme")
        .get("http://online.miradore.com/api/v2/Device")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "[]");
    // The legacy per-site host is canonicalised.
    let resp = proxy
        .proxy_client("acme")
        .get("http://acme1.online.miradore.com/API/Device")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reqs = mock.requests();
    assert_eq!(reqs[0].header("x-instance-name"), Some(MIRADORE_SITE));
    assert_eq!(reqs[0].host(), Some("online.miradore.com"));
    assert_eq!(
        reqs[1].path_and_query(),
        format!("/Acme1/API/Device?auth={MIRADORE_KEY_ENCODED}")
    );
    assert_eq!(reqs[1].host(), Some("online.miradore.com"));
    for r in &reqs {
        assert_no_tenant_headers(r);
    }
}

#[tokio::test]
async fn vendor_errors_pass_through_untouched() {
    let (_ca, _mock, proxy) = setup(|m| {
        m.respond(|_| {
            MockResponse::status(401)
                .header("content-type", "text/xml")
                .body("<Content><Error><Description>Authentication failed</Description><Code>401</Code></Error></Content>")
        })
    })
    .await;
    let resp = proxy
        .request(reqwest::Method::GET, "/miradore/Acme1/API/Device", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("x-sidekey-error").is_none());
    assert_eq!(resp.headers()["content-type"], "text/xml");
    assert!(resp.text().await.unwrap().contains("Authentication failed"));
}

// ---------------------------------------------------------------------------------------
// Mailkit

#[tokio::test]
async fn mailkit_json_round_trip_keeps_everything_but_credentials() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let body = "{\n  \"function\": \"mailkit.mailinglist.list\",\n  \"id\": \"placeholder\",\n  \"md5\": \"placeholder\",\n  \"parameters\": {\"name\": \"caf\\u00e9 \\\"q\\\"\", \"nested\": {\"id\": 1, \"list\": [1, 2.50, null]}}\n}";
    let resp = proxy
        .request(reqwest::Method::POST, "/mailkit/json.fcgi", "acme")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = mock.single();
    let want = body
        .replacen(
            "\"id\": \"placeholder\"",
            &format!("\"id\": \"{MAILKIT_ID}\""),
            1,
        )
        .replacen(
            "\"md5\": \"placeholder\"",
            &format!("\"md5\": \"{MAILKIT_MD5}\""),
            1,
        );
    assert_rewritten_body(&rec, &want);
    assert_eq!(rec.path_and_query(), "/json.fcgi");
    assert_eq!(rec.host(), Some("api.mailkit.eu"));
}

#[tokio::test]
async fn mailkit_xmlrpc_round_trip_keeps_everything_but_credentials() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<methodCall>\n\t<methodName>mailkit.campaigns.list</methodName>\n\t<params>\n\t\t<param><value><int>0</int></value></param>\n\t\t<param><value><string>x</string></value></param>\n\t\t<param><value><struct><member><name>a &amp; b</name><value><string>&lt;keep&gt; \u{e9}</string></value></member></struct></value></param>\n\t</params>\n</methodCall>\n";
    // Chunked upload (no Content-Length): the rewritten body gets one.
    let stream = futures_like_stream(body.as_bytes().to_vec());
    let resp = proxy
        .request(reqwest::Method::POST, "/mailkit/rpc.fcgi", "acme")
        .header("content-type", "text/xml")
        .body(stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = mock.single();
    let want = body
        .replacen(
            "<value><int>0</int></value>",
            &format!("<value><int>{MAILKIT_ID}</int></value>"),
            1,
        )
        .replacen(
            "<value><string>x</string></value>",
            &format!("<value><string>{MAILKIT_MD5}</string></value>"),
            1,
        );
    assert_rewritten_body(&rec, &want);
}

/// A body reqwest sends chunked, without Content-Length.
fn futures_like_stream(bytes: Vec<u8>) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        for chunk in bytes.chunks(7) {
            let _ = tx.send(Ok(chunk.to_vec())).await;
        }
    });
    reqwest::Body::wrap(http_body_util::StreamBody::new(ReceiverFrames(rx)))
}

struct ReceiverFrames(tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);
impl tokio_stream::Stream for ReceiverFrames {
    type Item = Result<http_body::Frame<bytes::Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(|v| http_body::Frame::data(bytes::Bytes::from(v)))))
    }
}

// ---------------------------------------------------------------------------------------
// m3ter

/// Hands out `tok-1`, `tok-2`, ... (a new one after each refusal), counting calls.
#[derive(Default)]
struct CountingTokens {
    issued: AtomicUsize,
    calls: AtomicUsize,
    refusals: AtomicUsize,
    fail: bool,
}

#[async_trait]
impl TokenSource for CountingTokens {
    async fn token(&self, _: &M3terCreds) -> Result<BearerToken, TokenError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(TokenError {
                message: "m3ter answered 401 to the client-credentials exchange".into(),
            });
        }
        let n = self.refusals.load(Ordering::SeqCst) + 1;
        self.issued.fetch_max(n, Ordering::SeqCst);
        Ok(Arc::new(
            Bearer::new(Secret::new(format!("tok-{n}"))).unwrap(),
        ))
    }
    fn refused(&self, _: &M3terCreds, _: &BearerToken) {
        self.refusals.fetch_add(1, Ordering::SeqCst);
    }
}

async fn m3ter_setup(
    tokens: Arc<CountingTokens>,
    mock: impl FnOnce(support::MockVendorBuilder<'_>) -> support::MockVendorBuilder<'_>,
) -> (TestCa, MockVendor, TestProxy) {
    let ca = TestCa::new("sidekey test CA");
    let vendor = mock(MockVendor::builder(&ca)).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&vendor)
        .tokens(tokens)
        .start()
        .await;
    (ca, vendor, proxy)
}

#[tokio::test]
async fn m3ter_bearer_replaces_the_apps_authorization() {
    let tokens = Arc::new(CountingTokens::default());
    let (_ca, mock, proxy) = m3ter_setup(tokens.clone(), |m| m).await;
    let resp = proxy
        .request(
            reqwest::Method::GET,
            &format!("/m3ter{M3TER_PATH}?pageSize=10"),
            "acme",
        )
        .header("authorization", "Bearer sidekey-placeholder")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = mock.single();
    assert_eq!(rec.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(rec.path_and_query(), format!("{M3TER_PATH}?pageSize=10"));
    assert_eq!(rec.host(), Some("api.m3ter.com"));
    // Ingest prefix and absolute-form to the ingest host.
    proxy
        .client()
        .post(
            proxy.url(
                "/m3ter-ingest/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/measurements",
            ),
        )
        .header("x-sidekey-tenant", "acme")
        .body("{\"measurements\":[]}")
        .send()
        .await
        .unwrap();
    proxy
        .proxy_client("acme")
        .get(format!("http://api.m3ter.com{M3TER_PATH}"))
        .send()
        .await
        .unwrap();
    let reqs = mock.requests();
    assert_eq!(reqs[1].host(), Some("ingest.m3ter.com"));
    assert_eq!(reqs[1].body_str(), "{\"measurements\":[]}");
    assert_eq!(reqs[2].host(), Some("api.m3ter.com"));
    for r in &reqs {
        assert_eq!(r.header("authorization"), Some("Bearer tok-1"));
        assert_no_tenant_headers(r);
    }
}

#[tokio::test]
async fn m3ter_replays_once_on_403_then_200() {
    let tokens = Arc::new(CountingTokens::default());
    let (_ca, mock, proxy) = m3ter_setup(tokens.clone(), |m| {
        m.respond(|r| {
            if r.header("authorization") == Some("Bearer tok-1") {
                MockResponse::status(403).body("expired")
            } else {
                MockResponse::ok("{\"data\":[]}")
            }
        })
    })
    .await;
    let resp = proxy
        .request(
            reqwest::Method::POST,
            &format!("/m3ter{M3TER_PATH}"),
            "acme",
        )
        .body("{\"name\":\"m\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"data\":[]}");
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("authorization"), Some("Bearer tok-2"));
    assert_eq!(reqs[0].body, reqs[1].body);
    assert_eq!(reqs[1].body_str(), "{\"name\":\"m\"}");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2);
    assert_eq!(tokens.refusals.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn m3ter_second_refusal_goes_to_the_app() {
    let tokens = Arc::new(CountingTokens::default());
    let (_ca, mock, proxy) = m3ter_setup(tokens.clone(), |m| {
        m.respond(|_| MockResponse::status(403).body("no"))
    })
    .await;
    let resp = proxy
        .request(reqwest::Method::GET, &format!("/m3ter{M3TER_PATH}"), "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("x-sidekey-error").is_none());
    assert_eq!(resp.text().await.unwrap(), "no");
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(tokens.refusals.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn m3ter_large_streaming_body_is_not_replayed() {
    let tokens = Arc::new(CountingTokens::default());
    let (_ca, mock, proxy) =
        m3ter_setup(tokens.clone(), |m| m.respond(|_| MockResponse::status(403))).await;
    let resp = proxy
        .request(
            reqwest::Method::POST,
            &format!("/m3ter{M3TER_PATH}"),
            "acme",
        )
        .body(futures_like_stream(vec![b'a'; 10]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(tokens.refusals.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn m3ter_oauth_token_is_answered_locally() {
    let tokens = Arc::new(CountingTokens::default());
    let (_ca, mock, proxy) = m3ter_setup(tokens.clone(), |m| m).await;
    let r1 = proxy
        .request(reqwest::Method::POST, "/m3ter/oauth/token", "acme")
        .basic_auth("dummy", Some("dummy"))
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .unwrap();
    let r2 = proxy
        .proxy_client("acme")
        .post("http://api.m3ter.com/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    for r in [r1, r2] {
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"token_type":"Bearer","access_token":"sidekey-placeholder","expires_in":18000,"scope":null})
        );
    }
    assert_eq!(mock.connections(), 0);
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn refusals_before_any_connection() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let c = proxy.client();
    let t = |b: reqwest::RequestBuilder| b.header("x-sidekey-tenant", "acme");

    assert_refusal(
        c.get(proxy.url("/nope/x"))
            .header("x-sidekey-tenant", "acme")
            .send()
            .await
            .unwrap(),
        404,
        "unknown_route",
    )
    .await;

    let resp = c
        .get(proxy.url("/miradore/api/v2/Device"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["proxy-authenticate"],
        "Basic realm=\"sidekey\""
    );
    assert_refusal(resp, 407, "tenant_required").await;

    let msg = assert_refusal(
        c.get(proxy.url("/miradore/api/v2/Device"))
            .header("x-sidekey-tenant", "ghost")
            .send()
            .await
            .unwrap(),
        403,
        "unknown_tenant",
    )
    .await;
    assert!(msg.contains("ghost"));
    assert_refusal(
        c.post(proxy.url("/mailkit/json.fcgi"))
            .header("x-sidekey-tenant", "bare")
            .body("{}")
            .send()
            .await
            .unwrap(),
        403,
        "vendor_not_configured",
    )
    .await;
    assert_refusal(
        t(c.get(proxy.url("/miradore/Other/API/Device")))
            .send()
            .await
            .unwrap(),
        403,
        "site_mismatch",
    )
    .await;
    assert_refusal(
        t(c.get(proxy.url("/m3ter/organizations/11111111-2222-3333-4444-555555555555/meters")))
            .send()
            .await
            .unwrap(),
        403,
        "org_mismatch",
    )
    .await;
    assert_refusal(
        t(c.post(proxy.url("/mailkit/json.fcgi")).body("{not json"))
            .send()
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert_refusal(
        t(c.post(proxy.url("/mailkit/rpc.fcgi"))
            .body("<methodCall><params><param><value>1</value></param></params></methodCall>"))
        .send()
        .await
        .unwrap(),
        400,
        "bad_request",
    )
    .await;

    // Absolute-form hosts that are not this tenant's.
    let pc = proxy.proxy_client("acme");
    for url in [
        "http://evil.example/steal",
        "http://api.staging.m3ter.com/organizations/x", // another m3ter environment
        "http://online.miradore.com.evil.example/API/Device",
    ] {
        assert_refusal(pc.get(url).send().await.unwrap(), 403, "host_not_allowed").await;
    }
    assert_refusal(
        pc.get("http://other.online.miradore.com/API/Device")
            .send()
            .await
            .unwrap(),
        403,
        "site_mismatch",
    )
    .await;
    assert_refusal(
        proxy
            .proxy_client("bare")
            .get("http://api.m3ter.com/x")
            .send()
            .await
            .unwrap(),
        403,
        "vendor_not_configured",
    )
    .await;

    // None of the above reached the vendor: no TCP connection was even opened.
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn connect_is_refused() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"CONNECT api.m3ter.com:443 HTTP/1.1\r\nHost: api.m3ter.com:443\r\nProxy-Authorization: Basic YWNtZTp4\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    let lc = out.to_ascii_lowercase();
    assert!(lc.contains("x-sidekey-error: connect_unsupported"), "{out}");
    assert!(lc.contains("x-sidekey-request-id: "), "{out}");
    assert!(lc.contains("content-type: application/json"), "{out}");
    assert!(out.contains("\"code\":\"connect_unsupported\""), "{out}");
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn body_too_large() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.rewrite_body_limit = 1024)
        .start()
        .await;
    let big = format!("{{\"function\":\"f\",\"pad\":\"{}\"}}", "x".repeat(2048));
    for body in [
        reqwest::Body::from(big.clone()),
        futures_like_stream(big.into_bytes()),
    ] {
        let resp = proxy
            .request(reqwest::Method::POST, "/mailkit/json.fcgi", "acme")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_refusal(resp, 413, "body_too_large").await;
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn token_exchange_failed() {
    let tokens = Arc::new(CountingTokens {
        fail: true,
        ..Default::default()
    });
    let (_ca, mock, proxy) = m3ter_setup(tokens, |m| m).await;
    let resp = proxy
        .request(reqwest::Method::GET, &format!("/m3ter{M3TER_PATH}"), "acme")
        .send()
        .await
        .unwrap();
    let msg = assert_refusal(resp, 502, "token_exchange_failed").await;
    assert!(msg.contains("401"), "{msg}");
    assert_eq!(mock.connections(), 0);
}

async fn get_via(proxy: &TestProxy) -> reqwest::Response {
    proxy
        .request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn upstream_unreachable_when_nothing_listens() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ca = TestCa::new("ca");
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to_port(port)
        .start()
        .await;
    assert_refusal(get_via(&proxy).await, 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn wrong_ca_is_unreachable_never_a_bypass() {
    let trusted = TestCa::new("trusted");
    let other = TestCa::new("other");
    let mock = MockVendor::builder(&other).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&trusted)
        .route_to(&mock)
        .start()
        .await;
    assert_refusal(get_via(&proxy).await, 502, "upstream_unreachable").await;
    assert!(mock.requests().is_empty());
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn wrong_certificate_name_is_unreachable() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .names(&["wrong.example"])
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .start()
        .await;
    assert_refusal(get_via(&proxy).await, 502, "upstream_unreachable").await;
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn upstream_timeout() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(|_| MockResponse::never())
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .upstream(|u| u.response_header_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    assert_refusal(get_via(&proxy).await, 504, "upstream_timeout").await;
    // The overall per-request bound answers the same way.
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.request_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    assert_refusal(get_via(&proxy).await, 504, "upstream_timeout").await;
}

/// A token source whose exchange never finishes.
struct HangingTokens;

#[async_trait]
impl TokenSource for HangingTokens {
    async fn token(&self, _: &M3terCreds) -> Result<BearerToken, TokenError> {
        std::future::pending().await
    }
    fn refused(&self, _: &M3terCreds, _: &BearerToken) {}
}

#[tokio::test]
async fn the_request_timeout_bounds_a_token_exchange_wait() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .tokens(Arc::new(HangingTokens))
        .config(|c| c.request_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let send = proxy
        .request(reqwest::Method::GET, &format!("/m3ter{M3TER_PATH}"), "acme")
        .send();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), send)
        .await
        .expect("an answer within the test's bound")
        .unwrap();
    assert_refusal(resp, 504, "upstream_timeout").await;
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn the_request_timeout_bounds_reading_a_body_to_rewrite() {
    // Mailkit's body is read whole before anything is sent: an app that stops sending it
    // gets 504 at the request timeout, and nothing reaches the vendor.
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.request_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /mailkit/json.fcgi HTTP/1.1\r\nHost: sidekey\r\nx-sidekey-tenant: acme\r\n\
          content-type: application/json\r\nContent-Length: 100\r\n\r\n{\"function\":",
    )
    .await
    .unwrap();
    // The app's side stays open: the proxy, not the app, must end the wait.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within the test's bound")
            .unwrap();
        assert!(n > 0, "closed without an answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 504"), "{got}");
    assert!(got.contains("x-sidekey-error: upstream_timeout"), "{got}");
    assert_eq!(mock.connections(), 0);
}

// ---------------------------------------------------------------------------------------
// Streaming, protocols, headers, shutdown

#[tokio::test]
async fn large_response_streams_without_buffering() {
    const REST: usize = 64 * 1024 * 1024;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let (_ca, _mock, proxy) =
        setup(move |m| m.respond(move |_| MockResponse::gated("first-bytes", REST, g.clone())))
            .await;
    let mut resp = get_via(&proxy).await;
    assert_eq!(resp.status(), 200);
    // The mock has sent only "first-bytes" and waits on the gate: if the proxy buffered the
    // body, this chunk could never arrive.
    let mut got = Vec::new();
    while got.len() < "first-bytes".len() {
        got.extend_from_slice(&resp.chunk().await.unwrap().expect("first chunk"));
    }
    assert_eq!(got, b"first-bytes");
    gate.notify_one();
    let mut total = 0usize;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, REST);
}

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let (_ca, mock, proxy) = setup(|m| m.respond(|_| MockResponse::ok("h2"))).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .get(proxy.url("/miradore/api/v2/Device"))
        .header("x-sidekey-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "h2");
    assert_eq!(mock.single().header("x-api-key"), Some(MIRADORE_KEY));
}

#[tokio::test]
async fn upstream_http1_gets_the_vendor_host_header() {
    let (_ca, mock, proxy) = setup(|m| m.http1_only()).await;
    let resp = get_via(&proxy).await;
    assert_eq!(resp.status(), 200);
    let rec = mock.single();
    assert_eq!(rec.version, http::Version::HTTP_11);
    assert_eq!(rec.header("host"), Some("online.miradore.com"));
}

#[tokio::test]
async fn upstream_negotiates_h2_by_alpn() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    get_via(&proxy).await;
    let rec = mock.single();
    assert_eq!(rec.version, http::Version::HTTP_2);
    assert_eq!(rec.uri.host(), Some("online.miradore.com"));
}

#[tokio::test]
async fn hop_by_hop_headers_removed_both_ways() {
    let (_ca, mock, proxy) = setup(|m| {
        m.respond(|_| {
            MockResponse::ok("ok")
                .header("x-vendor", "kept")
                .header("proxy-authenticate", "Basic realm=vendor")
                .header("keep-alive", "timeout=5")
        })
    })
    .await;
    let resp = proxy
        .request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("te", "gzip")
        .header("x-app", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-vendor"], "kept");
    assert!(resp.headers().get("proxy-authenticate").is_none());
    assert!(resp.headers().get("keep-alive").is_none());
    let rec = mock.single();
    assert_eq!(rec.header("x-app"), Some("kept"));
    for h in ["x-drop-me", "te", "connection"] {
        assert!(rec.header(h).is_none(), "{h} forwarded");
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let (_ca, _mock, proxy) =
        setup(move |m| m.respond(move |_| MockResponse::gated("a", 10, g.clone()))).await;
    let mut resp = get_via(&proxy).await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"a");
    let addr = proxy.addr;
    let done = tokio::spawn(proxy.shutdown());
    gate.notify_one();
    let mut rest = 0;
    while let Some(c) = resp.chunk().await.unwrap() {
        rest += c.len();
    }
    assert_eq!(rest, 10);
    done.await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn http_proxy_client_calling_prefix_urls_on_loopback() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    // An app with HTTP_PROXY pointing at sidekey that also uses sidekey's prefix URLs.
    let resp = proxy
        .proxy_client("acme")
        .get(proxy.url("/miradore/api/v2/Device"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.single().header("x-api-key"), Some(MIRADORE_KEY));
}

// ---------------------------------------------------------------------------------------
// TestTenant helpers

#[tokio::test]
async fn miradore_test_tenant_helper() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(|r| {
            if r.header("x-api-key") == Some(MIRADORE_KEY) {
                MockResponse::ok("[]")
            } else {
                MockResponse::status(401)
            }
        })
        .start()
        .await;
    let client = support::upstream_client(&ca, &mock);
    let ok = sidekey::vendors::miradore::test(&client, &miradore()).await;
    assert!(ok.ok, "{ok:?}");
    assert_eq!(ok.http_status, 200);
    let rec = mock.single();
    assert_eq!(rec.method, http::Method::GET);
    assert_eq!(rec.path_and_query(), "/api/v2/Device?limit=1");
    assert_eq!(rec.header("x-instance-name"), Some(MIRADORE_SITE));

    let mut wrong = miradore();
    wrong.api_key = Secret::new("wrong");
    let bad = sidekey::vendors::miradore::test(&client, &wrong).await;
    assert!(!bad.ok);
    assert_eq!(bad.http_status, 401);
    assert!(!bad.message.contains("wrong"));
}

#[tokio::test]
async fn mailkit_test_tenant_helper() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            if v["md5"] == MAILKIT_MD5 && v["id"] == MAILKIT_ID {
                MockResponse::ok(r#"[{"ID_USER_LIST":"1","NAME":"x"}]"#)
            } else {
                MockResponse::ok(r#"{"error_status":1,"error":"Unauthorized"}"#)
            }
        })
        .start()
        .await;
    let client = support::upstream_client(&ca, &mock);
    let ok = sidekey::vendors::mailkit::test(&client, &mailkit()).await;
    assert!(ok.ok, "{ok:?}");
    let rec = mock.single();
    assert_eq!(rec.path_and_query(), "/json.fcgi");
    let v: serde_json::Value = serde_json::from_slice(&rec.body).unwrap();
    assert_eq!(v["function"], "mailkit.mailinglist.list");

    let mut wrong = mailkit();
    wrong.client_md5 = Secret::new("ffffffffffffffffffffffffffffffff");
    let bad = sidekey::vendors::mailkit::test(&client, &wrong).await;
    assert!(!bad.ok);
    assert_eq!(bad.http_status, 200);
    // Mailkit's error text is not repeated (it may quote the MD5); its error code is.
    assert!(!bad.message.contains("Unauthorized"), "{bad:?}");
    assert!(bad.message.contains("error_status 1"), "{bad:?}");
}

// ---------------------------------------------------------------------------------------
// Observability

#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every flow at trace level: sidekey's own log never contains a secret or a query string,
/// and each request has its one summary event.
#[tokio::test]
async fn logs_never_contain_secrets() {
    let buf = LogBuffer::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("sidekey=trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let tokens = Arc::new(CountingTokens::default());
    let (_ca, _mock, proxy) = m3ter_setup(tokens, |m| {
        m.respond(|r| {
            if r.header("authorization") == Some("Bearer tok-1") {
                MockResponse::status(403)
            } else {
                MockResponse::ok("{}")
            }
        })
    })
    .await;
    let c = proxy.client();
    let t = |b: reqwest::RequestBuilder| b.header("x-sidekey-tenant", "acme");
    t(c.get(proxy.url("/miradore/Acme1/API/Device?select=x&auth=app")))
        .send()
        .await
        .unwrap();
    t(c.get(proxy.url("/miradore/api/v2/Device")))
        .send()
        .await
        .unwrap();
    t(c.post(proxy.url("/mailkit/json.fcgi"))
        .body(r#"{"function":"f"}"#))
    .send()
    .await
    .unwrap();
    t(c.post(proxy.url("/mailkit/rpc.fcgi")).body(
        "<methodCall><params><param><value>1</value></param><param><value>2</value></param></params></methodCall>",
    ))
    .send()
    .await
    .unwrap();
    t(c.get(proxy.url(&format!("/m3ter{M3TER_PATH}"))))
        .send()
        .await
        .unwrap();
    t(c.get(proxy.url("/miradore/Other/API/Device")))
        .send()
        .await
        .unwrap();
    drop(_guard);

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("proxied request").count(), 6, "{log}");
    assert!(
        log.contains("error=\"site_mismatch\"") || log.contains("error=site_mismatch"),
        "{log}"
    );
    for secret in [
        MIRADORE_KEY,
        MIRADORE_KEY_ENCODED,
        MAILKIT_MD5,
        M3TER_SECRET,
        "tok-1",
        "tok-2",
        "select=x",
    ] {
        assert!(!log.contains(secret), "{secret:?} in log:\n{log}");
    }
}

// ---------------------------------------------------------------------------------------
// Upstream client on its own

#[tokio::test]
async fn upstream_errors_are_classified() {
    let req = || {
        http::Request::get("https://online.miradore.com/api/v2/Device")
            .body(sidekey::upstream::empty_body())
            .unwrap()
    };
    let trusted = TestCa::new("trusted");
    let other = TestCa::new("other");

    let mock = MockVendor::builder(&other).start().await;
    let err = support::upstream_client(&trusted, &mock)
        .send(req())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "tls", "{err:?}");

    let named = MockVendor::builder(&trusted)
        .names(&["wrong.example"])
        .start()
        .await;
    let err = support::upstream_client(&trusted, &named)
        .send(req())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "tls", "{err:?}");

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let client = sidekey::upstream::Client::new(sidekey::upstream::UpstreamConfig {
        connect_to: support::connect_to_rules(port),
        ..Default::default()
    })
    .unwrap();
    let err = client.send(req()).await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err:?}");

    let silent = MockVendor::builder(&trusted)
        .respond(|_| MockResponse::never())
        .start()
        .await;
    let client = sidekey::upstream::Client::new(sidekey::upstream::UpstreamConfig {
        extra_ca_files: vec![trusted.pem_file()],
        connect_to: support::connect_to_rules(silent.port()),
        response_header_timeout: std::time::Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    let err = client.send(req()).await.unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err:?}");

    // And the happy path: certificate checked against the original name, address redirected.
    let good = MockVendor::builder(&trusted).start().await;
    let resp = support::upstream_client(&trusted, &good)
        .send(req())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------------------------------
// Upstream connection reuse

/// `n` sequential GETs through the proxy; returns each (status, body).
async fn sequential(proxy: &TestProxy, method: reqwest::Method, n: usize) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let resp = proxy
            .request(method.clone(), "/miradore/api/v2/Device", "acme")
            .send()
            .await
            .unwrap();
        out.push((resp.status().as_u16(), resp.text().await.unwrap()));
    }
    out
}

#[tokio::test]
async fn http1_vendor_connection_is_reused_for_every_response_shape() {
    // Chunked, Content-Length, empty (204) and HEAD answers each hand the connection back:
    // the empty ones are never read to an end-of-stream frame.
    let n = AtomicUsize::new(0);
    let (_ca, mock, proxy) = setup(|m| {
        m.http1_only().respond(move |rec| {
            if rec.method == http::Method::HEAD {
                return MockResponse::ok("").header("content-length", "7");
            }
            match n.fetch_add(1, Ordering::SeqCst) % 3 {
                0 => MockResponse::ok("chunked"),
                1 => MockResponse::ok("sized").header("content-length", "5"),
                _ => MockResponse::status(204),
            }
        })
    })
    .await;
    let got = sequential(&proxy, reqwest::Method::GET, 6).await;
    let want = [(200, "chunked"), (200, "sized"), (204, "")];
    for (i, (status, body)) in got.iter().enumerate() {
        assert_eq!((*status, body.as_str()), want[i % 3], "request {i}");
    }
    let heads = sequential(&proxy, reqwest::Method::HEAD, 2).await;
    assert!(
        heads.iter().all(|(s, b)| *s == 200 && b.is_empty()),
        "{heads:?}"
    );
    assert_eq!(mock.requests().len(), 8);
    assert_eq!(mock.connections(), 1, "every request on one connection");
}

#[tokio::test]
async fn more_requests_at_once_than_32_keep_their_vendor_connections() {
    // The pool once kept 32 idle HTTP/1.1 connections per host: with more requests than
    // that in flight at a time, every round closed the surplus and dialed it anew (a TCP and
    // TLS handshake per request over 32). Idle connections are now kept up to the app
    // connection limit, so a steady load of any concurrency sidekey accepts reuses them.
    const AT_ONCE: usize = 40;
    // One gate per request (a Notify keeps one permit, so a shared one could lose wake-ups),
    // and a count of the requests the vendor holds.
    let gates: Arc<std::sync::Mutex<Vec<Arc<Notify>>>> = Arc::default();
    let (arrived_tx, mut arrived) = tokio::sync::watch::channel(0usize);
    let g = gates.clone();
    let (_ca, mock, proxy) = setup(move |m| {
        m.http1_only().respond(move |_| {
            let gate = Arc::new(Notify::new());
            g.lock().unwrap().push(gate.clone());
            arrived_tx.send_modify(|n| *n += 1);
            MockResponse::held_until(gate, "held")
        })
    })
    .await;
    for round in 1..=2 {
        let requests: Vec<_> = (0..AT_ONCE)
            .map(|_| tokio::spawn(get_via_owned(proxy.url("/miradore/api/v2/Device"))))
            .collect();
        // All of them at the vendor at once, each on a connection of its own.
        arrived.wait_for(|n| *n == round * AT_ONCE).await.unwrap();
        for gate in gates.lock().unwrap().drain(..) {
            gate.notify_one();
        }
        for request in requests {
            assert_eq!(request.await.unwrap(), 200);
        }
        assert_eq!(
            mock.connections(),
            AT_ONCE,
            "round {round}: the first round's connections, none dialed again"
        );
    }
}

#[tokio::test]
async fn http2_vendor_connection_is_shared() {
    let (_ca, mock, proxy) = setup(|m| m.respond(|_| MockResponse::ok("h2"))).await;
    assert_eq!(sequential(&proxy, reqwest::Method::GET, 1).await[0].0, 200);
    let parallel: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get_via_owned(proxy.url("/miradore/api/v2/Device"))))
        .collect();
    for task in parallel {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2)
    );
    assert_eq!(
        mock.connections(),
        1,
        "all eleven requests as streams of one connection"
    );
}

async fn get_via_owned(url: String) -> u16 {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .header("x-sidekey-tenant", "acme")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn half_read_response_never_puts_its_connection_back() {
    // A response the app stops reading leaves the rest of it on the HTTP/1.1 connection;
    // reusing that connection would hand the next request those bytes.
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let n = AtomicUsize::new(0);
    let (_ca, mock, proxy) = setup(move |m| {
        m.http1_only()
            .respond(move |_| match n.fetch_add(1, Ordering::SeqCst) {
                0 => MockResponse::gated("first", 1 << 20, g.clone()),
                _ => MockResponse::ok("next"),
            })
    })
    .await;
    let mut resp = get_via(&proxy).await;
    assert_eq!(&resp.chunk().await.unwrap().unwrap()[..], b"first");
    drop(resp);
    let got = sequential(&proxy, reqwest::Method::GET, 2).await;
    assert_eq!(
        got,
        vec![(200, "next".to_owned()), (200, "next".to_owned())]
    );
    assert_eq!(mock.connections(), 2, "one new connection, then reused");
}

#[tokio::test]
async fn vendor_closing_a_connection_is_not_an_error() {
    let n = AtomicUsize::new(0);
    let (_ca, mock, proxy) = setup(move |m| {
        m.http1_only()
            .respond(move |_| match n.fetch_add(1, Ordering::SeqCst) {
                0 => MockResponse::ok("bye").header("connection", "close"),
                _ => MockResponse::ok("again"),
            })
    })
    .await;
    let got = sequential(&proxy, reqwest::Method::GET, 3).await;
    assert_eq!(
        got,
        vec![
            (200, "bye".to_owned()),
            (200, "again".to_owned()),
            (200, "again".to_owned())
        ]
    );
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn vendor_closing_an_idle_connection_silently_is_not_an_error() {
    // No `Connection: close`: the vendor just closes the idle connection. The next request
    // must not fail on it, whether sidekey has noticed the close yet (and skips the
    // connection) or not (and the request, never sent, goes on a new one).
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .http1_only()
        .close_idle_after(std::time::Duration::from_millis(50))
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .start()
        .await;
    assert_eq!(sequential(&proxy, reqwest::Method::GET, 1).await[0].0, 200);
    mock.wait_closed(1).await;
    assert_eq!(sequential(&proxy, reqwest::Method::GET, 1).await[0].0, 200);
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn idle_vendor_connections_are_closed_after_the_idle_timeout() {
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).http1_only().start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .upstream(|u| u.pool_idle_timeout = std::time::Duration::from_secs(1))
        .start()
        .await;
    assert_eq!(sequential(&proxy, reqwest::Method::GET, 1).await[0].0, 200);
    // sidekey closes the idle connection itself; the mock sees it end.
    mock.wait_closed(1).await;
    assert_eq!(sequential(&proxy, reqwest::Method::GET, 1).await[0].0, 200);
    assert_eq!(mock.connections(), 2);
}

#[tokio::test]
async fn a_vendor_body_dropped_off_the_runtime_does_not_panic() {
    // The body hands its connection back when dropped; a thread without a runtime (a
    // caller's own, or a runtime shutting down) must not make that panic.
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .http1_only()
        .respond(|_| MockResponse::status(204))
        .start()
        .await;
    let client = support::upstream_client(&ca, &mock);
    let req = http::Request::get("https://online.miradore.com/api/v2/Device")
        .body(sidekey::upstream::empty_body())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 204);
    let body = resp.into_body();
    std::thread::spawn(move || drop(body))
        .join()
        .expect("dropping the body off the runtime panicked");
}

// ---------------------------------------------------------------------------------------
// Issue 10: strict parsers (findings 2, 3, 4 and 6)

/// Sends `head` (a complete HTTP/1.1 request, `Connection: close`) over a raw socket, so no
/// client library normalises it first; returns the status and the whole answer, lower-cased.
async fn raw_request(proxy: &TestProxy, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let status = out
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    (status, out)
}

#[tokio::test]
async fn miradore_site_check_refuses_non_canonical_paths() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    for target in [
        "/miradore/Acme1/API/..;/..;/Other/API/Device",
        "/miradore/Acme1/API/..%2f..%2fOther/API/Device",
        "/miradore/Acme1/api/v2/..%2F..%2F..%2FOther/api/v2/Device",
        "/miradore//Other/api/v2/Device",
        "/miradore/%41cme1/API/Device",
        "http://online.miradore.com/Acme1/API/..;/..;/Other/API/Device",
        "http://acme1.online.miradore.com/Acme1/API/..%2f..%2fOther/API/Device",
    ] {
        let (status, out) = raw_request(
            &proxy,
            &format!(
                "GET {target} HTTP/1.1\r\nHost: online.miradore.com\r\nx-sidekey-tenant: acme\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 400, "{target}: {out}");
        assert!(out.contains("x-sidekey-error: bad_request"), "{out}");
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn repeated_tenant_headers_and_invalid_ports_are_refused() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let path = "/miradore/api/v2/Device";
    for request in [
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nx-sidekey-tenant: bare\r\nConnection: close\r\n\r\n"),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nx-sidekey-tenant: acme\r\nx-sidekey-tenant: acme\r\nConnection: close\r\n\r\n"),
        // acme:x, then bare:x
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWNtZTp4\r\nProxy-Authorization: Basic YmFyZTp4\r\nConnection: close\r\n\r\n"),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nHost: y\r\nx-sidekey-tenant: acme\r\nConnection: close\r\n\r\n"),
        format!("GET {path} HTTP/1.1\r\nHost: localhost:99999\r\nx-sidekey-tenant: acme\r\nConnection: close\r\n\r\n"),
    ]
    .into_iter()
    .chain(
        [":65536", ":99999", ":-1", ":"]
            .iter()
            .map(|port| format!("GET http://online.miradore.com{port}/api/v2/Device HTTP/1.1\r\nHost: online.miradore.com{port}\r\nProxy-Authorization: Basic YWNtZTp4\r\nConnection: close\r\n\r\n")),
    ) {
        let (status, out) = raw_request(&proxy, &request).await;
        assert_eq!(status, 400, "{request}: {out}");
        assert!(out.contains("x-sidekey-error: bad_request"), "{out}");
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn mailkit_xmlrpc_outside_the_grammar_is_refused_before_forwarding() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let creds = "<param><value><int>0</int></value></param><param><value><string>x</string></value></param>";
    for body in [
        format!(
            "<methodCall><methodName>m</methodName><params><string>X</string><string>Y</string>{creds}</params></methodCall>"
        ),
        format!(
            "<methodCall><methodName>m</methodName><params><a:param><value><string>X</string></value></a:param>{creds}</params></methodCall>"
        ),
        format!(
            "<methodCall><methodName>m</methodName><params><PARAM><value><string>X</string></value></PARAM>{creds}</params></methodCall>"
        ),
        format!(
            "<methodCall><methodName>m<value><string>X</string></value></methodName><params>{creds}</params></methodCall>"
        ),
        format!(
            "<methodCall><methodName>m</methodName><params><params>{creds}</params>{creds}</params></methodCall>"
        ),
    ] {
        let resp = proxy
            .request(reqwest::Method::POST, "/mailkit/rpc.fcgi", "acme")
            .header("content-type", "text/xml")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_refusal(resp, 400, "bad_request").await;
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn mailkit_xmlrpc_byte_order_mark_is_kept_and_the_splice_is_exact() {
    let (_ca, mock, proxy) = setup(|m| m).await;
    let body = "\u{feff}<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params><param><value><int>0</int></value></param><param><value>1</value></param></params></methodCall>";
    let resp = proxy
        .request(reqwest::Method::POST, "/mailkit/rpc.fcgi", "acme")
        .header("content-type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let want = format!(
        "\u{feff}<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params><param><value><int>{MAILKIT_ID}</int></value></param><param><value><string>{MAILKIT_MD5}</string></value></param></params></methodCall>"
    );
    assert_rewritten_body(&mock.single(), &want);
}

// ---------------------------------------------------------------------------------------
// Resource limits: deadlines on app connections, the body budget, vendor connections

/// Reads from `s` until the peer closes it (EOF or reset) or `within` passes; returns what
/// was read and whether the peer closed.
async fn read_until_closed(
    s: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn connections_that_never_finish_their_first_bytes_are_closed() {
    // Before the deadline on protocol detection, nothing, `P` or 23 of the 24 preface bytes
    // held a connection slot for ever.
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.header_read_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let sends: [&[u8]; 4] = [b"", b"P", &H2_PREFACE[..23], b"GET /miradore/api/v2/Dev"];
    let mut conns = Vec::new();
    for bytes in sends {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        conns.push((bytes, s));
    }
    for (bytes, mut s) in conns {
        let (_, closed) = read_until_closed(&mut s, std::time::Duration::from_secs(5)).await;
        assert!(closed, "a connection that sent {bytes:?} was kept open");
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn an_http2_connection_without_requests_is_closed_after_the_idle_timeout() {
    // hyper closes idle HTTP/1 connections itself; an h2c client that answers PINGs but
    // sends no request kept its connection slot for ever.
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca).start().await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.header_read_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(H2_PREFACE).await.unwrap();
    // An empty SETTINGS frame: a well-formed HTTP/2 client that then asks nothing.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let (got, closed) = read_until_closed(&mut s, std::time::Duration::from_secs(5)).await;
    assert!(closed, "an idle HTTP/2 connection was kept");
    // The server's frames: SETTINGS first, and a GOAWAY (type 7) before the close.
    let mut frame_types = Vec::new();
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frame_types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert_eq!(frame_types.first(), Some(&4), "{frame_types:?}");
    assert!(frame_types.contains(&7), "no GOAWAY: {frame_types:?}");

    // A request on h2c keeps its connection open while it is in flight.
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .get(proxy.url("/miradore/api/v2/Device"))
        .header("x-sidekey-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_app_that_stops_reading_loses_its_connection() {
    // The vendor sends far more than the socket buffers hold; the app reads nothing.
    const REST: usize = 48 * 1024 * 1024;
    let gate = Arc::new(Notify::new());
    gate.notify_one();
    let g = gate.clone();
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .http1_only()
        .respond(move |_| MockResponse::gated("first", REST, g.clone()))
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.write_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /miradore/api/v2/Device HTTP/1.1\r\nHost: sidekey\r\nx-sidekey-tenant: acme\r\n\r\n",
    )
    .await
    .unwrap();
    // The proxy gives up on the app, drops the half-sent response and so closes the vendor
    // connection (HTTP/1.1 cannot skip the rest); without the write timeout, never.
    mock.wait_closed(1).await;
    let (got, closed) = read_until_closed(&mut s, std::time::Duration::from_secs(10)).await;
    assert!(closed, "the app connection is closed");
    assert!(got.len() < REST, "the app did not get the whole response");
}

#[tokio::test]
async fn bodies_past_the_memory_budget_are_refused_until_it_frees() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(move |_| MockResponse::held_until(g.clone(), "{}"))
        .start()
        .await;
    // Room for one 10 KiB body, not two.
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .config(|c| c.body_memory_budget = 16 * 1024)
        .start()
        .await;
    let body = format!(
        "{{\"function\":\"f\",\"pad\":\"{}\"}}",
        "x".repeat(10 * 1024)
    );
    let send = |body: reqwest::Body| {
        proxy
            .request(reqwest::Method::POST, "/mailkit/json.fcgi", "acme")
            .body(body)
            .send()
    };
    let first = tokio::spawn(send(reqwest::Body::from(body.clone())));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while mock.requests().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first body never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Held at the vendor: a second body, of known or unknown length, does not fit.
    for second in [
        reqwest::Body::from(body.clone()),
        futures_like_stream(body.clone().into_bytes()),
    ] {
        let resp = send(second).await.unwrap();
        assert_eq!(resp.headers()["retry-after"], "1");
        let message = assert_refusal(resp, 503, "body_budget_exhausted").await;
        assert!(message.contains("retry"), "{message}");
    }
    assert_eq!(mock.requests().len(), 1);
    gate.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // Freed once the vendor answered.
    gate.notify_one();
    let resp = send(reqwest::Body::from(body)).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_m3ter_body_past_the_memory_budget_streams_without_replay() {
    // Within the budget the body is kept and replayed after a 403 (see
    // `m3ter_replays_once_on_403_then_200`); past it, it streams and the 403 goes to the app.
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond_seq(vec![|| MockResponse::status(403), || {
            MockResponse::ok("{}")
        }])
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .tokens(Arc::new(CountingTokens::default()))
        .config(|c| c.body_memory_budget = 1024)
        .start()
        .await;
    let body = "x".repeat(4096);
    let resp = proxy
        .request(
            reqwest::Method::POST,
            &format!("/m3ter{M3TER_PATH}"),
            "acme",
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(mock.single().body_str(), body);
}

/// Chunked framings hyper's decoder refuses, and one cut short by the app closing.
const BAD_CHUNKED: [&[u8]; 5] = [
    b"5\r\nhello\r\nzz\r\nrest\r\n0\r\n\r\n",
    b"5\r\nhello\r\n3\r\nabcdef\r\n0\r\n\r\n",
    b"5\r\nhello\r\n-1\r\nx\r\n0\r\n\r\n",
    b"5\r\nhello\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    b"5\r\nhello\r\n",
];

/// Sends `path` with a chunked `framing` on a raw connection, closes the app's side, and
/// returns what came back.
async fn send_chunked(proxy: &TestProxy, path: &str, framing: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: sidekey\r\nx-sidekey-tenant: acme\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(framing).await.unwrap();
    s.shutdown().await.unwrap();
    let (got, closed) = read_until_closed(&mut s, std::time::Duration::from_secs(10)).await;
    assert!(closed);
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn malformed_chunked_bodies_to_a_rewriting_rule_are_refused() {
    // Mailkit reads the body before forwarding: the framing error is known, nothing is sent.
    let (_ca, mock, proxy) = setup(|m| m).await;
    for framing in BAD_CHUNKED {
        let got = send_chunked(&proxy, "/mailkit/json.fcgi", framing).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{framing:?}: {got}");
        assert!(got.contains("x-sidekey-error: bad_request"), "{got}");
    }
    assert_eq!(mock.connections(), 0);
}

#[tokio::test]
async fn malformed_chunked_bodies_to_a_streamed_vendor_never_arrive_complete() {
    // Miradore streams: the credentialed head has gone when the error shows, so the request
    // to the vendor must be aborted (RST_STREAM, or the HTTP/1.1 connection closed without
    // the last chunk), never ended as if the body were whole.
    for http1 in [false, true] {
        let (_ca, mock, proxy) = setup(|m| if http1 { m.http1_only() } else { m }).await;
        for framing in BAD_CHUNKED {
            send_chunked(&proxy, "/miradore/api/v2/Device", framing).await;
        }
        // Every started request ends at the mock (cut off) once its connection or stream
        // is aborted; poll until all have, with a deadline.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while mock.requests().len() < BAD_CHUNKED.len() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let recorded = mock.requests();
        assert!(
            !recorded.is_empty(),
            "http1={http1}: the heads were streamed"
        );
        for r in &recorded {
            assert!(
                !r.body_complete,
                "http1={http1}: a malformed body reached the vendor complete: {r:#?}"
            );
        }
    }
}

#[tokio::test]
async fn a_silent_vendor_connection_is_dropped_by_its_unanswered_ping() {
    let (ca, mock, _) = setup(|m| m.respond(|_| MockResponse::ok("ok"))).await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .upstream(|u| {
            u.h2_keep_alive_interval = std::time::Duration::from_millis(200);
            u.h2_keep_alive_timeout = std::time::Duration::from_millis(200);
            u.response_header_timeout = std::time::Duration::from_secs(30);
        })
        .start()
        .await;
    let get = || get_via_owned(proxy.url("/miradore/api/v2/Device"));
    assert_eq!(get().await, 200);
    assert_eq!(mock.connections(), 1);
    mock.go_silent();
    // A request caught on the silent connection fails once the PING goes unanswered, far
    // sooner than the 30 s response timeout (a 504); the next one gets a new connection.
    let started = std::time::Instant::now();
    let caught = tokio::time::timeout(std::time::Duration::from_secs(10), get())
        .await
        .expect("the request on the silent connection ended");
    assert!(caught == 502 || caught == 200, "{caught}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        tokio::time::timeout(std::time::Duration::from_secs(10), get())
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        mock.connections(),
        2,
        "one new connection after the silent one"
    );
}

#[tokio::test]
async fn a_saturated_vendor_connection_gets_a_second_one() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let ca = TestCa::new("ca");
    let mock = MockVendor::builder(&ca)
        .respond(move |_| MockResponse::held_until(g.clone(), "ok"))
        .start()
        .await;
    let proxy = TestProxy::builder()
        .tenant(acme())
        .trust(&ca)
        .route_to(&mock)
        .upstream(|u| u.h2_max_streams_per_connection = 2)
        .start()
        .await;
    // One connection first, so that the three requests below find it.
    gate.notify_one();
    assert_eq!(
        get_via_owned(proxy.url("/miradore/api/v2/Device")).await,
        200
    );
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get_via_owned(proxy.url("/miradore/api/v2/Device"))))
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while mock.requests().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests stuck: {}",
            mock.requests().len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2)
    );
    assert_eq!(
        mock.connections(),
        2,
        "two streams on the first, one on a second"
    );
    for _ in 0..3 {
        gate.notify_one();
    }
    for task in held {
        assert_eq!(task.await.unwrap(), 200);
    }
}

// ---------------------------------------------------------------------------------------
// Request ids and trace context in the log line

/// A log line's `name` field has `value` (the text format quotes strings, not ids).
fn has_field(line: &str, name: &str, value: &str) -> bool {
    line.contains(&format!("{name}={value} "))
        || line.contains(&format!("{name}={value:?}"))
        || line.ends_with(&format!("{name}={value}"))
}

/// Runs `f` with sidekey's INFO log captured on this thread; returns the log's lines.
async fn logged<F: std::future::Future<Output = ()>>(f: F) -> Vec<String> {
    let buf = LogBuffer::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("sidekey=info"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    {
        let _guard = tracing::subscriber::set_default(subscriber);
        f.await;
    }
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    log.lines()
        .filter(|l| l.contains("proxied request"))
        .map(str::to_owned)
        .collect()
}

/// Every kind of answer (forwarded 2xx and 4xx, local, each refusal family) carries its own
/// `x-sidekey-request-id`, the `request_id` of its log line; ids share this process's prefix.
#[tokio::test]
async fn every_answer_carries_the_request_id_of_its_log_line() {
    let (_ca, _mock, proxy) = setup(|m| {
        m.respond(|r| {
            if r.path_and_query().contains("missing") {
                MockResponse::status(404)
            } else {
                MockResponse::ok("{}")
            }
        })
    })
    .await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = TestProxy::builder()
        .tenant(acme())
        .route_to_port(port)
        .start()
        .await;
    let mut ids = Vec::new();
    let lines = logged(async {
        let c = proxy.client();
        let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
            (
                proxy.request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme"),
                200,
            ),
            (
                proxy.request(reqwest::Method::GET, "/miradore/api/v2/missing", "acme"),
                404,
            ),
            (
                proxy.request(reqwest::Method::POST, "/m3ter/oauth/token", "acme"),
                200,
            ),
            (proxy.request(reqwest::Method::GET, "/nope", "acme"), 404),
            (c.get(proxy.url("/miradore/api/v2/Device")), 407),
            (
                proxy.request(reqwest::Method::GET, "/miradore/api/v2/Device", "ghost"),
                403,
            ),
            (
                proxy.request(reqwest::Method::GET, "/mailkit/json.fcgi", "bare"),
                403,
            ),
            (
                unreachable.request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme"),
                502,
            ),
        ];
        for (req, status) in cases {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), status);
            ids.push(request_id_of(resp.headers()));
        }
    })
    .await;
    assert_eq!(lines.len(), ids.len(), "{lines:#?}");
    for (id, line) in ids.iter().zip(&lines) {
        assert!(has_field(line, "request_id", id), "{id} not in {line}");
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    // One proxy, one prefix: the two proxies above have one each.
    let prefixes: std::collections::HashSet<_> = ids.iter().map(|id| &id[..16]).collect();
    assert_eq!(prefixes.len(), 2, "{ids:?}");
}

/// The app's `x-request-id` and `traceparent` reach the vendor unchanged (tracing is off) and
/// their values are logged; an invalid traceparent or an unprintable id is not logged as is.
#[tokio::test]
async fn app_request_ids_and_trace_ids_are_forwarded_and_logged() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const BAD_TRACEPARENT: &str = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    let (_ca, mock, proxy) = setup(|m| m).await;
    let send = |request_id: &'static [u8], traceparent: &'static str| {
        proxy
            .request(reqwest::Method::GET, "/miradore/api/v2/Device", "acme")
            .header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(request_id).unwrap(),
            )
            .header("traceparent", traceparent)
            .header("tracestate", "congo=t61rcWkgMzE")
            .send()
    };
    let lines = logged(async {
        assert_eq!(send(b"app-req-7", TRACEPARENT).await.unwrap().status(), 200);
        assert_eq!(
            send(b"two words", BAD_TRACEPARENT).await.unwrap().status(),
            200
        );
    })
    .await;
    let recorded = mock.requests();
    assert_eq!(recorded[0].header("x-request-id"), Some("app-req-7"));
    assert_eq!(recorded[0].header("traceparent"), Some(TRACEPARENT));
    assert_eq!(recorded[0].header("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(recorded[1].header("traceparent"), Some(BAD_TRACEPARENT));
    assert_eq!(recorded[1].header("x-request-id"), Some("two words"));

    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        has_field(&lines[0], "app_request_id", "app-req-7"),
        "{}",
        lines[0]
    );
    assert!(
        has_field(&lines[0], "trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        "{}",
        lines[0]
    );
    assert!(
        has_field(&lines[1], "app_request_id", "invalid"),
        "{}",
        lines[1]
    );
    assert!(has_field(&lines[1], "trace_id", ""), "{}", lines[1]);
    assert!(!lines[1].contains("4BF92F"), "{}", lines[1]);
    for line in &lines {
        assert!(!line.contains(MIRADORE_KEY), "{line}");
    }
}
