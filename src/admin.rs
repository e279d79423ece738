//! Admin endpoints: `/healthz` (the process is alive), `/readyz` (store open, listeners
//! bound, not draining) and `/metrics` (Prometheus text format).

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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::store::health::StoreHealth;

/// Readiness as `/readyz` reports it: set once every listener is bound and the initial
/// tenants are loaded, cleared the moment a drain starts.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>, Option<StoreHealth>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Adds the store's health to `/readyz`'s body. A failing store does not make `/readyz`
    /// fail: the proxy keeps serving the last saved credentials, and only control-plane
    /// writes are refused until the store recovers by itself.
    pub fn with_store_health(mut self, health: StoreHealth) -> Self {
        self.1 = Some(health);
        self
    }

    /// The body's line about the store, if a store is attached.
    fn store_line(&self) -> String {
        match self.1.as_ref().map(StoreHealth::failure) {
            None => String::new(),
            Some(None) => "store: ok\n".into(),
            Some(Some(reason)) => format!("store: failing, writes refused: {reason}\n"),
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use. Later calls (a second
/// server in one test process) share it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .map(|b| b.build_recorder());
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    match metrics::set_global_recorder(recorder) {
                        Ok(()) => Some(handle),
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
        "/readyz" if ready.is_ready() => {
            text(StatusCode::OK, format!("ready\n{}", ready.store_line()))
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}", ready.store_line()),
        ),
        "/metrics" => {
            let body = metrics.map(|h| h.render()).unwrap_or_default();
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

/// Serves the admin endpoints until `shutdown` resolves, and keeps the recorder's memory
/// bounded meanwhile.
pub async fn serve(listener: TcpListener, ready: Readiness, shutdown: impl Future<Output = ()>) {
    let metrics = metrics_handle();
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
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
                let Ok((stream, _)) = accepted else { continue };
                let ready = ready.clone();
                let metrics = metrics.clone();
                let svc = service_fn(move |req| {
                    let res = respond(&req, &ready, metrics.as_ref());
                    async move { Ok::<_, Infallible>(res) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}
