//! Traces over OTLP (issue 15): the whole server (`server::start`) with `--otlp-endpoint`
//! pointing at an in-process collector (a tonic server of the OTLP `TraceService`), a mock
//! vendor behind real TLS, and the real m3ter token broker. Spans are flushed by the
//! server's shutdown, so no test waits on the export interval.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use sidekey::config::ServeConfig;
use sidekey::model::{M3terConn, MiradoreConn};
use sidekey::secret::Secret;
use sidekey::server::{self, Running};
use sidekey::tenants::Connections;
use tokio::net::TcpListener;

use support::{MockResponse, MockVendor, Recorded, TestCa};

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
const M3TER_SECRET: &str = "m3ter-api-secret-value";
const MIRADORE_KEY: &str = "1_miradore-api-key-value";
/// The token the mock m3ter issues; it must reach no span.
const ISSUED_TOKEN: &str = "tok-issued-by-mock";
/// The W3C example trace, and a second one.
const APP_TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_PARENT_A: &str = "00f067aa0ba902b7";
const APP_TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";
const APP_PARENT_B: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------
// The collector

/// Keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on 127.0.0.1:0; returns the `http://` endpoint.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A string or integer attribute, as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn named<'a>(spans: &'a [Span], name: &str, trace: &str) -> &'a Span {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.name == name && hex(&s.trace_id) == trace)
        .collect();
    assert_eq!(found.len(), 1, "one {name:?} in trace {trace}: {spans:#?}");
    found[0]
}

// ---------------------------------------------------------------------------------------
// The server

fn responder(r: &Recorded) -> MockResponse {
    if r.uri.path() == "/oauth/token" {
        return MockResponse::ok(format!(
            r#"{{"token_type":"Bearer","access_token":"{ISSUED_TOKEN}","expires_in":18000}}"#
        ))
        .header("content-type", "application/json");
    }
    MockResponse::ok("{}").header("content-type", "application/json")
}

struct Env {
    mock: MockVendor,
    running: Running,
    http: reqwest::Client,
    _ca: TestCa,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(otlp_endpoint: String) -> Env {
        let ca = TestCa::new("sidekey traces CA");
        let mock = MockVendor::builder(&ca).respond(responder).start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::ephemeral(dir.path().to_path_buf());
        config.master_key = Some(Secret::new(MASTER_KEY));
        config.upstream_ca = vec![ca.pem_file()];
        config.connect_to = support::connect_to_rules(mock.port());
        config.otlp_endpoint = Some(otlp_endpoint);
        let running = server::start(config).await.expect("server starts");
        running
            .catalog
            .create(
                "acme".into(),
                "Acme".into(),
                Connections {
                    miradore: Some(MiradoreConn {
                        site: "Acme1".into(),
                        api_key: Some(Secret::new(MIRADORE_KEY)),
                    }),
                    m3ter: Some(M3terConn {
                        access_key_id: "key-acme".into(),
                        api_secret: Some(Secret::new(M3TER_SECRET)),
                        org_id: ORG.into(),
                        environment: String::new(),
                    }),
                    ..Default::default()
                },
            )
            .await
            .expect("create tenant");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Env {
            mock,
            running,
            http,
            _ca: ca,
            _dir: dir,
        }
    }

    async fn get(
        &self,
        tenant: &str,
        path: &str,
        traceparent: Option<String>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .get(format!("http://{}{path}", self.running.proxy_addr))
            .header("x-sidekey-tenant", tenant);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        req.send().await.expect("proxy answers")
    }
}

fn traceparent(trace: &str, parent: &str) -> Option<String> {
    Some(format!("00-{trace}-{parent}-01"))
}

// ---------------------------------------------------------------------------------------
// Tests

/// One Miradore request, one m3ter request (which waits on the token exchange) and one
/// refusal: each request span is the child of the app's `traceparent`, the vendor call and
/// the exchange are its children, the vendor receives the vendor call's span as parent, and
/// no attribute holds a secret.
#[tokio::test]
async fn spans_join_the_apps_trace_and_chain_request_to_upstream_and_exchange() {
    let collector = Collector::default();
    let env = Env::start(collector.start().await).await;

    let miradore = env
        .get(
            "acme",
            "/miradore/api/v2/Device?select=Name",
            traceparent(APP_TRACE_A, APP_PARENT_A),
        )
        .await;
    assert_eq!(miradore.status(), 200);
    let miradore_id = miradore.headers()["x-sidekey-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let m3ter = env
        .get(
            "acme",
            &format!("/m3ter/organizations/{ORG}/meters"),
            traceparent(APP_TRACE_B, APP_PARENT_B),
        )
        .await;
    assert_eq!(m3ter.status(), 200);
    // No traceparent: a trace of sidekey's own. An unknown tenant: a refusal.
    let refused = env.get("ghost", "/miradore/api/v2/Device", None).await;
    assert_eq!(refused.status(), 403);

    let recorded = env.mock.requests();
    let mock = env.mock;
    assert!(env.running.shutdown().await, "drained in time");
    let spans = collector.spans();

    // Miradore: request span under the app's span, upstream span under the request span.
    let request = named(&spans, "proxy miradore", APP_TRACE_A);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(hex(&request.parent_span_id), APP_PARENT_A);
    assert_eq!(attr(request, "sidekey.tenant").as_deref(), Some("acme"));
    assert_eq!(attr(request, "sidekey.vendor").as_deref(), Some("miradore"));
    assert_eq!(attr(request, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        attr(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(request, "sidekey.request_id"), Some(miradore_id));
    assert_eq!(attr(request, "sidekey.error"), None);
    let upstream = named(&spans, "upstream miradore", APP_TRACE_A);
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    assert_eq!(upstream.parent_span_id, request.span_id);
    assert_eq!(
        attr(upstream, "http.response.status_code").as_deref(),
        Some("200")
    );
    let data = recorded
        .iter()
        .find(|r| r.uri.path().ends_with("/Device"))
        .expect("the Miradore call");
    assert_eq!(
        data.header("traceparent"),
        Some(format!("00-{APP_TRACE_A}-{}-01", hex(&upstream.span_id)).as_str())
    );

    // m3ter: the exchange and the upstream call are both children of the request span.
    let request = named(&spans, "proxy m3ter", APP_TRACE_B);
    assert_eq!(hex(&request.parent_span_id), APP_PARENT_B);
    assert_eq!(attr(request, "sidekey.vendor").as_deref(), Some("m3ter"));
    let exchange = named(&spans, "m3ter token exchange", APP_TRACE_B);
    assert_eq!(exchange.parent_span_id, request.span_id);
    let upstream = named(&spans, "upstream m3ter", APP_TRACE_B);
    assert_eq!(upstream.parent_span_id, request.span_id);
    assert!(exchange.end_time_unix_nano <= upstream.start_time_unix_nano);
    let data = recorded
        .iter()
        .find(|r| r.uri.path().ends_with("/meters"))
        .expect("the m3ter call");
    assert_eq!(
        data.header("traceparent"),
        Some(format!("00-{APP_TRACE_B}-{}-01", hex(&upstream.span_id)).as_str())
    );
    // The exchange itself is shared by every waiter: it carries no request's trace.
    let token_call = recorded
        .iter()
        .find(|r| r.uri.path() == "/oauth/token")
        .unwrap();
    assert_eq!(token_call.header("traceparent"), None);

    // The refusal: a root span with its error code.
    let refusal: Vec<_> = spans
        .iter()
        .filter(|s| attr(s, "sidekey.error").as_deref() == Some("unknown_tenant"))
        .collect();
    assert_eq!(refusal.len(), 1, "{spans:#?}");
    assert!(refusal[0].parent_span_id.is_empty());
    assert_eq!(
        attr(refusal[0], "http.response.status_code").as_deref(),
        Some("403")
    );
    assert_eq!(attr(refusal[0], "sidekey.tenant").as_deref(), Some("ghost"));

    // Nothing else, and nothing secret anywhere.
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let dump = format!("{spans:?}");
    for secret in [
        MIRADORE_KEY,
        M3TER_SECRET,
        ISSUED_TOKEN,
        "select=Name",
        "Bearer",
        "Basic",
    ] {
        assert!(!dump.contains(secret), "{secret:?} in spans");
    }
    drop(mock);
}

/// With tracing on and the app's traceparent malformed, the vendor gets sidekey's own trace
/// (a valid traceparent) and the app's tracestate is not sent with it.
#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let collector = Collector::default();
    let env = Env::start(collector.start().await).await;
    let resp = env
        .http
        .get(format!(
            "http://{}/miradore/api/v2/Device",
            env.running.proxy_addr
        ))
        .header("x-sidekey-tenant", "acme")
        .header(
            "traceparent",
            format!("00-{APP_TRACE_A}-0000000000000000-01"),
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = env.mock.single();
    assert!(env.running.shutdown().await);
    let spans = collector.spans();
    let request = spans
        .iter()
        .find(|s| s.name == "proxy miradore")
        .expect("request span");
    assert!(request.parent_span_id.is_empty(), "{request:?}");
    assert_ne!(hex(&request.trace_id), APP_TRACE_A);
    let upstream = spans
        .iter()
        .find(|s| s.name == "upstream miradore")
        .expect("upstream span");
    assert_eq!(
        sent.header("traceparent"),
        Some(
            format!(
                "00-{}-{}-01",
                hex(&request.trace_id),
                hex(&upstream.span_id)
            )
            .as_str()
        )
    );
    assert_eq!(sent.header("tracestate"), None);
}

/// A collector that refuses connections, and one that accepts them and never answers:
/// requests are served as fast as ever and every one succeeds, also while an export (started
/// when the first full batch of 512 spans was queued) hangs on the silent one; shutdown gives
/// up on the flush within its bound.
#[tokio::test]
async fn an_unreachable_or_silent_collector_never_fails_or_slows_a_request() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // Accepted by the kernel, never read: every export waits until its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_endpoint = format!("http://{}", silent.local_addr().unwrap());

    tokio::join!(
        serve_through(refused_endpoint, None),
        serve_through(silent_endpoint, Some(&silent))
    );
    drop(silent);
}

/// Serves requests through a sidekey exporting to `endpoint`, then shuts it down; with
/// `silent`, checks the collector was dialled during the requests.
async fn serve_through(endpoint: String, silent: Option<&TcpListener>) {
    let env = Env::start(endpoint).await;
    // Two spans each (request and vendor call): past one export batch.
    let requests = sidekey::telemetry::MAX_EXPORT_BATCH_SIZE / 2 + 40;
    for _ in 0..requests {
        // Far below the collector's connect (5 s) and export (10 s) deadlines.
        let resp = tokio::time::timeout(
            Duration::from_secs(2),
            env.get(
                "acme",
                "/miradore/api/v2/Device",
                traceparent(APP_TRACE_A, APP_PARENT_A),
            ),
        )
        .await
        .expect("served without waiting on the collector");
        assert_eq!(resp.status(), 200);
    }
    if let Some(silent) = silent {
        // The full batch's export has dialled the silent collector: the requests above
        // were served while it hung.
        tokio::time::timeout(Duration::from_secs(2), silent.accept())
            .await
            .expect("an export started during the requests")
            .unwrap();
    }
    let started = Instant::now();
    env.running.shutdown().await;
    let bound = sidekey::telemetry::SHUTDOWN_TIMEOUT + Duration::from_secs(3);
    assert!(
        started.elapsed() < bound,
        "shutdown took {:?}",
        started.elapsed()
    );
}
