//! Admin endpoints: `/healthz` (the process is alive), `/readyz` (store open, listeners
//! bound, not draining) and `/metrics` (Prometheus text format: the recorder's families,
//! each described once where it is defined, then the `process_*` families).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::process_metrics::ProcessStats;
use crate::proxy::ConnectionSlots;
use crate::proxy::connection::first_bytes;
use crate::proxy::listener::AcceptBackoff;
use crate::store::health::StoreHealth;

/// Readiness as `/readyz` reports it: set once every listener is bound and the initial
/// tenants are loaded, cleared the moment a drain starts; and, once the proxy's connection
/// slots are attached, not ready while every slot is taken (new app connections would wait
/// in the accept backlog).
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default)]
struct ReadinessInner {
    ready: AtomicBool,
    proxy_slots: OnceLock<ConnectionSlots>,
    store_health: OnceLock<StoreHealth>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }
    /// Makes `/readyz` answer 503 while every one of `slots` is taken.
    pub fn watch_proxy_slots(&self, slots: ConnectionSlots) {
        let _ = self.0.proxy_slots.set(slots);
    }
    /// Why `/readyz` answers 503, or `None` when it answers 200.
    pub fn not_ready_because(&self) -> Option<String> {
        if !self.0.ready.load(Ordering::SeqCst) {
            return Some("not ready: starting or draining".to_owned());
        }
        let slots = self.0.proxy_slots.get()?;
        slots.is_full().then(|| {
            format!(
                "not ready: all {} proxy connections are in use (the connection cap)",
                slots.limit()
            )
        })
    }

    /// Adds the store's health to `/readyz`'s body. A failing store does not make `/readyz`
    /// fail: the proxy keeps serving the last saved credentials, and only control-plane
    /// writes are refused until the store recovers by itself.
    pub fn with_store_health(self, health: StoreHealth) -> Self {
        let _ = self.0.store_health.set(health);
        self
    }

    /// The body's line about the store, if a store is attached.
    fn store_line(&self) -> String {
        match self.0.store_health.get().map(StoreHealth::failure) {
            None => String::new(),
            Some(None) => "store: ok\n".into(),
            Some(Some(reason)) => format!("store: failing, writes refused: {reason}\n"),
        }
    }
}

/// Upper bounds (seconds) of the buckets of every `_seconds` histogram: from 0.5 ms up to
/// the longest timeout a measured request can run into, the proxy's request timeout (120 s,
/// [`crate::proxy::ProxyConfig::request_timeout`]), with the control plane's call timeout
/// (60 s) on the way. A request cut off by its timeout lands in the last finite bucket or
/// `+Inf`, never hidden among merely slow ones.
pub const DURATION_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// `sidekey_build_info{version,os,arch}`: always 1, for joining a version to other series.
pub const METRIC_BUILD_INFO: &str = "sidekey_build_info";

/// Registers the help text of every metric family sidekey exports, once, where each is
/// defined, and sets the build info.
fn describe_metrics() {
    crate::proxy::describe_metrics();
    crate::upstream::describe_metrics();
    crate::vendors::m3ter::client::describe_metrics();
    crate::control::service::describe_metrics();
    crate::store::describe_metrics();
    crate::tenants::snapshot::describe_metrics();
    crate::tenants_file::describe_metrics();
    crate::log_writer::describe_metrics();
    metrics::describe_gauge!(
        METRIC_BUILD_INFO,
        "Always 1; the labels say which sidekey build is running"
    );
    metrics::gauge!(METRIC_BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "os" => std::env::consts::OS,
        "arch" => std::env::consts::ARCH)
    .set(1.0);
}

/// The process-wide Prometheus recorder, installed on first use with every family
/// described. Later calls (a second server in one test process) share it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &DURATION_BUCKETS,
                )
                .map(|b| b.build_recorder());
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    match metrics::set_global_recorder(recorder) {
                        Ok(()) => {
                            describe_metrics();
                            Some(handle)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics recorder already installed; /metrics will be empty");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build the metrics recorder; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn respond(
    req: &Request<Incoming>,
    ready: &Readiness,
    metrics: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready.not_ready_because() {
            None => text(StatusCode::OK, format!("ready\n{}", ready.store_line())),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}\n{}", ready.store_line()),
            ),
        },
        "/metrics" => {
            let mut body = metrics.map(|h| h.render()).unwrap_or_default();
            ProcessStats::read().render(&mut body);
            let mut res = text(StatusCode::OK, body);
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

/// How often the recorder drains histogram samples into its buckets. Without this upkeep
/// the exporter keeps every recorded sample until a scrape, so memory would grow with
/// traffic whenever nobody scrapes `/metrics`.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Deadline on an admin connection's first bytes, on each request head, and on a write the
/// peer does not read: probes and scrapes send their request at once, so anything slower is
/// a stuck or hostile client.
pub const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until `shutdown` resolves, and keeps the recorder's memory
/// bounded meanwhile.
pub async fn serve(listener: TcpListener, ready: Readiness, shutdown: impl Future<Output = ()>) {
    serve_with_timeout(listener, ready, shutdown, ADMIN_IO_TIMEOUT).await;
}

async fn serve_with_timeout(
    listener: TcpListener,
    ready: Readiness,
    shutdown: impl Future<Output = ()>,
    io_timeout: Duration,
) {
    let metrics = metrics_handle();
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(io_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(io_timeout))
        .keep_alive_timeout(io_timeout);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = upkeep.tick() => {
                if let Some(handle) = &metrics {
                    handle.run_upkeep();
                }
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => {
                        backoff.reset();
                        stream
                    }
                    Err(e) => {
                        backoff.after(&e, "admin").await;
                        continue;
                    }
                };
                let ready = ready.clone();
                let metrics = metrics.clone();
                let svc = service_fn(move |req| {
                    let res = respond(&req, &ready, metrics.as_ref());
                    async move { Ok::<_, Infallible>(res) }
                });
                let builder = builder.clone();
                // Watched from the start, so a shutdown waits at most `io_timeout` for a
                // connection still sending its first bytes.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let Ok(io) = first_bytes(stream, io_timeout, io_timeout).await else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    let _ = watcher.watch(conn).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The families no single-store integration test reaches (fleet mode, resource
    /// exhaustion, a successful m3ter exchange) are described too.
    #[test]
    fn every_family_is_described() {
        use crate::vendors::m3ter::broker;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = [
            crate::proxy::METRIC_REQUESTS,
            crate::proxy::METRIC_REQUESTS_BY_TENANT,
            crate::upstream::METRIC_ERRORS,
            broker::METRIC_EXCHANGES,
            broker::METRIC_CACHE_HITS,
            broker::METRIC_REPLAYS,
            broker::METRIC_BACKOFF_REJECTIONS,
            crate::control::service::METRIC_CALLS,
            crate::control::listener::METRIC_ACCEPT_ERRORS,
            crate::tenants_file::METRIC_APPLIES,
            crate::log_writer::METRIC_LINES_LOST,
        ];
        let gauges = [
            crate::budget::METRIC_HELD_BYTES,
            crate::tenants::snapshot::METRIC_TENANTS,
            crate::store::health::HEALTH_GAUGE,
            crate::store::etcd::CONNECTED_GAUGE,
            crate::store::etcd::DISCONNECTED_SINCE_GAUGE,
            crate::store::etcd::UNREADABLE_GAUGE,
            METRIC_BUILD_INFO,
        ];
        metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            for name in counters {
                metrics::counter!(name).increment(1);
            }
            for name in gauges {
                metrics::gauge!(name).set(1.0);
            }
            metrics::histogram!(crate::proxy::METRIC_REQUEST_DURATION).record(1.0);
        });
        let text = handle.render();
        let all = counters
            .iter()
            .chain(&gauges)
            .chain(&[crate::proxy::METRIC_REQUEST_DURATION]);
        for name in all {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP:\n{text}"
            );
            assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
        }
    }

    #[test]
    fn buckets_reach_the_longest_timeout() {
        let top = DURATION_BUCKETS[DURATION_BUCKETS.len() - 1];
        assert!(
            top >= crate::proxy::ProxyConfig::default()
                .request_timeout
                .as_secs_f64()
        );
        assert!(top >= crate::control::CALL_TIMEOUT.as_secs_f64());
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn silent_or_partial_admin_connections_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Readiness::default();
        ready.set(true);
        tokio::spawn(serve_with_timeout(
            listener,
            ready,
            std::future::pending(),
            Duration::from_millis(200),
        ));
        for sent in [
            &b""[..],
            b"P",
            b"PRI * HTTP/2.0\r\n",
            b"GET /readyz HTTP/1.1\r\n",
        ] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(sent).await.unwrap();
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf));
            assert!(
                read.await.is_ok(),
                "an admin connection that sent {sent:?} was kept"
            );
        }
        // A real probe is answered.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert!(
            buf.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
}
