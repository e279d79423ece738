//! The data plane: accepts an app's plain-HTTP request, names the tenant, applies the vendor's
//! rule and forwards it over TLS through [`crate::upstream`].
//!
//! - [`listener`]: the accept loop, connection limits and graceful shutdown.
//! - `connection`: deadlines on an app connection's first bytes and on its writes.
//! - [`BodyBudget`] ([`crate::budget`]): the byte budget of request bodies held in memory.
//! - [`route`]: request form, tenant, vendor and host, in the documented order of checks.
//! - [`crate::vendors::path`]: the one path form forwarded, so rules check what vendors read.
//! - [`error`]: the refusals sidekey answers itself, and the one mapping of every cause
//!   (vendor rules, body budget, upstream) to them.
//! - the rules themselves live in [`crate::vendors`].
//!
//! Wiring (from `sidekey serve`):
//! ```ignore
//! let client = sidekey::upstream::Client::new(upstream_config)?;
//! let proxy = sidekey::proxy::Proxy::new(snapshot_reader, client, token_source, ProxyConfig::default());
//! let listener = tokio::net::TcpListener::bind(proxy_listen).await?;
//! sidekey::proxy::serve(listener, proxy, shutdown_signal).await;
//! ```

pub(crate) mod connection;
pub mod error;
mod headers;
pub mod listener;
pub mod request_id;
pub(crate) mod route;
pub(crate) mod tunnel;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

pub use crate::budget::BodyBudget;
pub use error::ProxyError;
pub use listener::{ConnectionSlots, serve};
pub use request_id::REQUEST_ID_HEADER;

use crate::intercept::Leaves;
use crate::telemetry::traceparent::TraceParent;
use crate::telemetry::{self, RequestOutcome, RequestTrace, Tracing};
use crate::tenants::SnapshotReader;
use crate::upstream;
use crate::vendors::m3ter::TokenSource;
use crate::vendors::{BodyRule, Registry, RuleInput, SendContext, Via};
use request_id::RequestIds;
use route::Endpoint;
pub(crate) use tunnel::TunnelOrigin;

/// The header that names the tenant; removed before forwarding.
pub const TENANT_HEADER: HeaderName = HeaderName::from_static("x-sidekey-tenant");
/// The header on every refusal sidekey answers itself, carrying the error code.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-sidekey-error");

/// The body of responses to apps: the vendor's, streamed, or one sidekey wrote.
pub type ResponseBody = Either<upstream::VendorBody, Full<Bytes>>;

/// Data-plane limits and timeouts. Every default is documented on its field.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Connections served at once; further connections wait in the kernel's accept backlog
    /// until one closes, and `/readyz` answers 503 while all are taken. Default: 1024.
    pub max_connections: usize,
    /// Bound on a request head: HTTP/1 read buffer (hence request line plus headers; hyper
    /// answers 431 past it, and never goes below 8 KiB) and HTTP/2 header list size.
    /// Default: 64 KiB.
    pub max_header_bytes: usize,
    /// HTTP/1: time allowed to receive a complete request head, counted from when the
    /// connection is ready for the next request, so it is also the keep-alive idle timeout.
    /// Past it the connection is closed. A new connection (HTTP/1 or h2c) must also send its
    /// first bytes, enough to tell the two apart, within it. Default: 30 s.
    pub header_read_timeout: Duration,
    /// A write to the app that makes no progress for this long (the app stopped reading a
    /// response) closes the connection. Default: 30 s.
    pub write_timeout: Duration,
    /// HTTP/2: interval of keep-alive pings on an idle connection; a peer that does not answer
    /// one within `h2_keep_alive_timeout` is disconnected. Default: 30 s.
    pub h2_keep_alive_interval: Duration,
    /// HTTP/2: how long to wait for a ping answer. Default: 20 s.
    pub h2_keep_alive_timeout: Duration,
    /// HTTP/2: concurrent streams per connection. Default: 256.
    pub h2_max_concurrent_streams: u32,
    /// Overall bound from receiving a request to sending the response head (reading a body
    /// to rewrite it, token exchange, connect, replay, the vendor's answer). Past it the app
    /// gets 504 `upstream_timeout`. Response bodies are not bounded: they stream as long as
    /// the vendor sends. Default: 120 s.
    pub request_timeout: Duration,
    /// Largest body a rule may read to rewrite it (Mailkit); larger gives 413
    /// `body_too_large`. Default: 16 MiB (Mailkit itself accepts up to 128 MB).
    pub rewrite_body_limit: usize,
    /// Largest m3ter request body kept in memory so the request can be replayed once after a
    /// refused token; bigger or unknown-length bodies stream and are not replayed.
    /// Default: 1 MiB (m3ter ingest accepts at most 512 KB).
    pub replay_body_limit: usize,
    /// Bytes of request bodies held in memory at once, over all requests: Mailkit bodies
    /// being rewritten and m3ter bodies kept for replay (`--body-memory-budget`). A Mailkit
    /// body that does not fit is refused with 503 `body_budget_exhausted` and
    /// `Retry-After: 1`; an m3ter body that does not fit is streamed without replay.
    /// Default: 64 MiB ([`DEFAULT_BODY_MEMORY_BUDGET`]).
    pub body_memory_budget: usize,
    /// Count requests per tenant too, in `sidekey_proxy_requests_by_tenant_total{tenant,
    /// vendor}` (`--metrics-tenant-label`). Off by default: one series per tenant can swamp
    /// a Prometheus server. At most [`MAX_TENANT_LABELS`] tenants get their own series; the
    /// rest are counted as `tenant="other"`.
    pub tenant_metrics: bool,
    /// HTTPS interception (`--intercept-ca-cert`/`--intercept-ca-key`): `CONNECT` to one of
    /// the tenant's vendor hosts is answered and its TLS terminated with leaves from this CA
    /// (docs/interception.md). Default: none, and `CONNECT` is refused with 405
    /// `connect_unsupported`.
    pub intercept: Option<Arc<Leaves>>,
    /// Traces over OTLP (`--otlp-endpoint`, [`crate::telemetry`]): a span per request,
    /// exported to a collector. Default: none, and no request pays for tracing.
    pub tracing: Option<Tracing>,
}

/// Default of [`ProxyConfig::body_memory_budget`]: 64 MiB, four Mailkit bodies at the
/// default rewrite limit or sixty-four m3ter bodies at the replay limit; it keeps a sidecar
/// with a few hundred MiB of memory limit clear of the OOM killer.
pub const DEFAULT_BODY_MEMORY_BUDGET: usize = 64 * 1024 * 1024;

/// The hard cap on distinct `tenant` label values of the per-tenant request counter.
pub const MAX_TENANT_LABELS: usize = 100;

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(20),
            h2_max_concurrent_streams: 256,
            request_timeout: Duration::from_secs(120),
            rewrite_body_limit: 16 * 1024 * 1024,
            replay_body_limit: 1024 * 1024,
            body_memory_budget: DEFAULT_BODY_MEMORY_BUDGET,
            tenant_metrics: false,
            intercept: None,
            tracing: None,
        }
    }
}

/// The credential-injecting proxy. Cheap to clone; one per process.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    snapshot: SnapshotReader,
    client: upstream::Client,
    vendors: Registry,
    config: ProxyConfig,
    slots: ConnectionSlots,
    budget: BodyBudget,
    ids: RequestIds,
    /// Tenants with their own label, when per-tenant metrics are on.
    tenant_labels: Option<Mutex<HashSet<Arc<str>>>>,
    metrics: HotMetrics,
}

/// `sidekey_proxy_requests_total{vendor,status_class,error}`: requests by the status class
/// the app got and sidekey's error code (`none` when the vendor answered).
pub const METRIC_REQUESTS: &str = "sidekey_proxy_requests_total";
/// `sidekey_proxy_request_duration_seconds{vendor}`: time to the response head.
pub const METRIC_REQUEST_DURATION: &str = "sidekey_proxy_request_duration_seconds";
/// `sidekey_proxy_requests_by_tenant_total{tenant,vendor}`: only with the tenant label on.
pub const METRIC_REQUESTS_BY_TENANT: &str = "sidekey_proxy_requests_by_tenant_total";

/// Registers the help texts of the proxy's metric families.
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_REQUESTS,
        "Proxied requests, by vendor, status class of the response the app got, and sidekey's \
         error code (none when the vendor answered)"
    );
    metrics::describe_histogram!(
        METRIC_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a proxied request's arrival to its response head, by vendor"
    );
    metrics::describe_counter!(
        METRIC_REQUESTS_BY_TENANT,
        "Proxied requests by tenant (at most 100 tenant labels, then other) and vendor"
    );
    crate::budget::describe_metrics();
}

/// The request metrics of the vendors' answers, registered once: looking a labelled metric
/// up in the recorder's registry on every request (hashing its name and labels) costs
/// measurable CPU at tens of thousands of requests per second. Sidekey's own refusals (a
/// closed set of error codes, but rare) are still looked up when they happen.
struct HotMetrics {
    /// Indexed like the vendor registry, then one for requests with no vendor.
    vendors: Box<[VendorMetrics]>,
}

struct VendorMetrics {
    /// The `vendor` label: the vendor's name, or `none`.
    label: &'static str,
    /// `error="none"`, indexed like [`HotMetrics::CLASSES`].
    answered: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl HotMetrics {
    /// The `status_class` label values.
    const CLASSES: [&'static str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    /// The `error` label of a request sidekey did not refuse.
    const NO_ERROR: &'static str = "none";

    fn new(vendors: &Registry) -> Self {
        let labels = vendors.iter().map(|v| v.name()).chain(["none"]);
        Self {
            vendors: labels
                .map(|vendor| VendorMetrics {
                    label: vendor,
                    answered: Self::CLASSES.map(|class| {
                        metrics::counter!(METRIC_REQUESTS, "vendor" => vendor,
                            "status_class" => class, "error" => Self::NO_ERROR)
                    }),
                    duration: metrics::histogram!(METRIC_REQUEST_DURATION, "vendor" => vendor),
                })
                .collect(),
        }
    }

    /// The metrics of the vendor at registry index `vendor`, or of no vendor.
    fn of(&self, vendor: Option<usize>) -> &VendorMetrics {
        let none = self.vendors.len() - 1;
        &self.vendors[vendor.map_or(none, |v| v.min(none))]
    }

    /// The `vendor` label and log field: the vendor's name, or `none` before one is known.
    fn label(&self, vendor: Option<usize>) -> &'static str {
        self.of(vendor).label
    }

    /// Index into [`HotMetrics::CLASSES`] of the status the app got; hyper lets a vendor
    /// answer up to 999, which counts as `5xx` so that the label set stays closed.
    fn class(status: http::StatusCode) -> usize {
        usize::from(status.as_u16() / 100).clamp(1, 5) - 1
    }

    /// Counts a request by the status the app got and `error`, sidekey's error code when
    /// sidekey answered itself.
    fn record(
        &self,
        vendor: Option<usize>,
        status: http::StatusCode,
        error: Option<&'static str>,
        seconds: f64,
    ) {
        let m = self.of(vendor);
        let class = Self::class(status);
        match error {
            None => m.answered[class].increment(1),
            Some(code) => metrics::counter!(METRIC_REQUESTS, "vendor" => m.label,
                "status_class" => Self::CLASSES[class], "error" => code)
            .increment(1),
        }
        m.duration.record(seconds);
    }
}

/// The log line's fields taken from the request, copied only when the line will be written.
struct LoggedRequest {
    method: Method,
    path: Box<str>,
    app_request_id: Option<Box<str>>,
    app_trace: Option<TraceParent>,
}

/// What one request's log line and metrics say, filled in as the request is understood.
struct RequestLog {
    tenant: Option<Arc<str>>,
    /// The vendor's index in the registry.
    vendor: Option<usize>,
}

impl Proxy {
    pub fn new(
        snapshot: SnapshotReader,
        client: upstream::Client,
        tokens: Arc<dyn TokenSource>,
        config: ProxyConfig,
    ) -> Self {
        Self::with_vendors(snapshot, client, Registry::new(tokens), config)
    }

    /// A proxy serving the vendors of `vendors`: [`Registry::new`]'s, and any added with
    /// [`Registry::with_vendor`].
    pub fn with_vendors(
        snapshot: SnapshotReader,
        client: upstream::Client,
        vendors: Registry,
        config: ProxyConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                snapshot,
                client,
                metrics: HotMetrics::new(&vendors),
                vendors,
                tenant_labels: config.tenant_metrics.then(Default::default),
                slots: ConnectionSlots::new(config.max_connections),
                budget: BodyBudget::new(config.body_memory_budget),
                config,
                ids: RequestIds::new(),
            }),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.inner.config
    }

    /// The connection cap's slots, for `/readyz` to report a proxy with none free.
    pub fn connection_slots(&self) -> ConnectionSlots {
        self.inner.slots.clone()
    }

    /// Serves one request, which arrived inside the tunnel `origin` if there is one: never
    /// fails, refusals become sidekey's error responses.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        origin: Option<TunnelOrigin>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let request_id = self.inner.ids.next();
        // The log line's request fields, copied only when the line will be written.
        let logged = tracing::enabled!(tracing::Level::INFO).then(|| LoggedRequest {
            method: req.method().clone(),
            path: req.uri().path().into(),
            app_request_id: request_id::loggable_app_request_id(req.headers()),
            app_trace: TraceParent::from_headers(req.headers()),
        });
        let trace = (self.inner.config.tracing.as_ref())
            .map(|t| t.start_request(req.method(), req.headers()));
        let mut log = RequestLog {
            tenant: None,
            vendor: None,
        };
        // The request timeout is a deadline that every wait in `route` ends by, rather than
        // a timer around it: the vendor's answer is then bounded by one timer, not two.
        let deadline = tokio::time::Instant::from_std(start) + self.inner.config.request_timeout;
        // Boxed: the routing future holds the whole upstream exchange, a large state machine
        // that would otherwise be moved with this one.
        let route = Box::pin(self.route(req, origin, deadline, &mut log, trace.as_ref()));
        let (mut resp, code) = match route.await {
            Ok(resp) => (resp, None),
            Err(e) => (e.to_response().map(Either::Right), Some(e.code())),
        };
        let elapsed = start.elapsed();
        resp.headers_mut()
            .insert(REQUEST_ID_HEADER, request_id.header_value());
        let status = resp.status();
        self.inner
            .metrics
            .record(log.vendor, status, code, elapsed.as_secs_f64());
        if let (Some(labels), Some(tenant)) = (&self.inner.tenant_labels, &log.tenant)
            && !matches!(code, Some("unknown_tenant" | "tenant_required"))
        {
            // Only tenants that exist get here, so callers cannot mint labels.
            let label = {
                let mut set = labels.lock().unwrap_or_else(PoisonError::into_inner);
                if set.contains(tenant) || set.len() < MAX_TENANT_LABELS {
                    set.insert(tenant.clone());
                    tenant.to_string()
                } else {
                    "other".to_owned()
                }
            };
            metrics::counter!(METRIC_REQUESTS_BY_TENANT,
                "tenant" => label, "vendor" => self.inner.metrics.label(log.vendor))
            .increment(1);
        }
        if let Some(logged) = logged {
            // Sidekey's trace when tracing (the app's trace id when it sent a valid
            // traceparent), else the app's.
            let trace_id = match (&trace, logged.app_trace) {
                (Some(trace), _) => Some(trace.trace_id_text()),
                (None, Some(app)) => Some(app.trace_id_text()),
                (None, None) => None,
            };
            // Path without query: Miradore v1 keys travel in the query.
            tracing::info!(
                request_id = %request_id,
                tenant = log.tenant.as_deref().unwrap_or("-"),
                vendor = self.inner.metrics.label(log.vendor),
                method = %logged.method,
                path = %logged.path,
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                error = code.unwrap_or(""),
                app_request_id = logged.app_request_id.as_deref().unwrap_or(""),
                trace_id = trace_id.as_ref().map_or("", |t| t.as_str()),
                "proxied request"
            );
        }
        if let Some(trace) = trace {
            trace.finish(RequestOutcome {
                vendor: self.inner.metrics.label(log.vendor),
                tenant: log.tenant.as_deref(),
                status: status.as_u16(),
                error: code,
                request_id: request_id.as_str(),
            });
        }
        resp
    }

    /// The tenant the app named, from the current snapshot (logged either way).
    fn tenant(
        &self,
        id: std::borrow::Cow<'_, str>,
        log: &mut RequestLog,
    ) -> Result<Arc<crate::tenants::EffectiveTenant>, ProxyError> {
        let Some(tenant) = self.inner.snapshot.load().tenant(&id).cloned() else {
            log.tenant = Some(Arc::from(id.as_ref()));
            return Err(ProxyError::UnknownTenant(id.into_owned()));
        };
        log.tenant = Some(tenant.id.clone());
        Ok(tenant)
    }

    /// Routes and forwards one request. Every wait ends by `deadline` (the request timeout)
    /// with 504 `upstream_timeout`.
    async fn route(
        &self,
        mut req: Request<Incoming>,
        origin: Option<TunnelOrigin>,
        deadline: tokio::time::Instant,
        log: &mut RequestLog,
        trace: Option<&RequestTrace>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let vendors = &self.inner.vendors;
        match &origin {
            Some(origin) => tunnel::into_forward_form(&mut req, origin)?,
            None => {
                if req.method() == Method::CONNECT
                    && let Some(leaves) = &self.inner.config.intercept
                {
                    return self.open_tunnel(req, leaves, log);
                }
            }
        }
        let target = route::classify(&req, vendors)?;
        let named = route::tenant_id(req.headers())?;
        let tenant_id = match (&origin, named) {
            (Some(origin), Some(named)) if *named != *origin.tenant => {
                return Err(ProxyError::bad_request(format!(
                    "this tunnel belongs to tenant {:?}; the request names tenant {named:?}",
                    origin.tenant
                )));
            }
            (Some(origin), _) => std::borrow::Cow::Borrowed(&*origin.tenant),
            (None, named) => named.ok_or(ProxyError::TenantRequired)?,
        };
        let tenant = self.tenant(tenant_id, log)?;
        log.vendor = target.endpoint.vendor();
        let (vendor, host) = route::upstream_host(&target.endpoint, &tenant, vendors)?;
        let input = RuleInput {
            method: req.method(),
            headers: req.headers(),
            path: target.path,
            query: target.query,
        };
        let plan = vendor.plan(input, &tenant)?;
        let path_and_query = match plan.path_and_query {
            Some(rewritten) => Bytes::from(rewritten),
            None => match target.query {
                Some(q) => Bytes::from(format!("{}?{q}", target.path.as_str())),
                None => Bytes::copy_from_slice(target.path.as_str().as_bytes()),
            },
        };
        let uri = upstream_uri(host, path_and_query)?;
        if let BodyRule::Local(resp) = plan.body {
            return Ok(resp.map(Either::Right));
        }

        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        // The upstream client picks HTTP/2 or HTTP/1.1 by ALPN; it wants an HTTP/1.1 request.
        parts.version = Version::HTTP_11;
        prepare_headers(&mut parts.headers);

        let label = vendor.name();
        let upstream_failed = |e| ProxyError::upstream(label, host, e);
        match plan.body {
            BodyRule::Stream => {
                vendor.inject(&mut parts, &tenant)?;
                let req = Request::from_parts(parts, Either::Left(body));
                let resp = telemetry::send(&self.inner.client, trace, label, req, deadline).await;
                Ok(to_app(resp.map_err(upstream_failed)?))
            }
            BodyRule::Rewrite => {
                // Boxed: a body read is a state machine the header-only rules need not carry.
                let limit = self.inner.config.rewrite_body_limit;
                // A body that came with the head is read at once: the timer is only armed
                // while waiting for the app to send more.
                let read = Box::pin(self.inner.budget.read(body, limit));
                let (raw, mut held) =
                    tokio::time::timeout_at(deadline, read)
                        .await
                        .map_err(|_| ProxyError::UpstreamTimeout {
                            host: host.to_owned(),
                        })??;
                let rewritten = vendor.rewrite_body(&parts, &raw, &tenant)?;
                // The rewritten body replaces the raw one in the reservation; it is longer by
                // the credentials spliced in.
                let grown = rewritten.len().saturating_sub(raw.len());
                drop(raw);
                self.inner.budget.grow(&mut held, grown)?;
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                let req = Request::from_parts(parts, upstream::full_body(rewritten));
                let resp = telemetry::send(&self.inner.client, trace, label, req, deadline)
                    .await
                    .map_err(upstream_failed)?;
                // The body has been sent by the time the vendor answers.
                drop(held);
                Ok(to_app(resp))
            }
            BodyRule::Send => {
                let cx = SendContext {
                    client: &self.inner.client,
                    tenant: &tenant,
                    host,
                    replay_limit: self.inner.config.replay_body_limit,
                    budget: &self.inner.budget,
                    deadline,
                    trace,
                };
                Ok(to_app(vendor.send(cx, parts, body).await?))
            }
            // Answered above, before the request was taken apart.
            BodyRule::Local(resp) => Ok(resp.map(Either::Right)),
        }
    }
}

impl Proxy {
    /// `CONNECT host:443` with interception on: the same tenant and host checks as an
    /// absolute-form request for `host`, then `200` and the tunnel served in the background.
    /// Nothing is dialled here; requests inside the tunnel dial as plain ones do. A `CONNECT`
    /// over HTTP/2 is refused first: a tunnel is a whole HTTP/1.1 connection, holding its
    /// connection slot and its deadlines, which one stream of a shared HTTP/2 connection is not.
    fn open_tunnel(
        &self,
        mut req: Request<Incoming>,
        leaves: &Leaves,
        log: &mut RequestLog,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if req.version() == http::Version::HTTP_2 {
            return Err(ProxyError::ConnectOverHttp2);
        }
        let vendors = &self.inner.vendors;
        let host = tunnel::connect_host(req.uri())?.to_ascii_lowercase();
        let tenant_id = route::tenant_id(req.headers())?.ok_or(ProxyError::TenantRequired)?;
        let tenant = self.tenant(tenant_id, log)?;
        let endpoint = match vendors.by_host(&host) {
            Some(index) => Endpoint::Vendor {
                index,
                via: Via::Host(&host),
            },
            None => Endpoint::Foreign(&host),
        };
        log.vendor = endpoint.vendor();
        // The same refusals as a request to `host` (e.g. a vendor the tenant lacks).
        route::upstream_host(&endpoint, &tenant, vendors)?;
        let Some(hold) = req.extensions_mut().remove::<listener::ConnectionHold>() else {
            return Err(ProxyError::bad_request(
                "CONNECT is not served on this connection",
            ));
        };
        let tls = leaves
            .server_config(&host)
            .map_err(|e| ProxyError::InterceptFailed(e.to_string()))?;
        let upgrade = hyper::upgrade::on(&mut req);
        let origin = TunnelOrigin::new(&host, tenant.id.clone())?;
        tokio::spawn(tunnel::serve(upgrade, tls, self.clone(), hold, origin));
        Ok(Response::new(Either::Right(Full::new(Bytes::new()))))
    }
}

/// The vendor's response as the app receives it: hop-by-hop headers removed, body streamed.
fn to_app(resp: Response<upstream::VendorBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, &[]);
    Response::from_parts(parts, Either::Left(body))
}

/// Request headers toward any vendor: no hop-by-hop headers, no tenant naming, no `Host`
/// (the client sets it from the URI: the vendor host), no `Expect` (sidekey already answered
/// the app's `100-continue` by reading the body).
fn prepare_headers(headers: &mut http::HeaderMap) {
    headers::strip_hop_by_hop(headers, &[HOST, EXPECT, TENANT_HEADER]);
}

/// `https://{host}{path_and_query}`, assembled from its parts (no formatting and re-parsing).
fn upstream_uri(host: &str, path_and_query: Bytes) -> Result<Uri, ProxyError> {
    let invalid = || ProxyError::bad_request("the request path is not a valid URI");
    let authority = host.parse().map_err(|_| invalid())?;
    let path_and_query =
        http::uri::PathAndQuery::from_maybe_shared(path_and_query).map_err(|_| invalid())?;
    upstream::https_uri(authority, path_and_query).map_err(|_| invalid())
}
