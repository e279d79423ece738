//! The data plane: accepts an app's plain-HTTP request, names the tenant, applies the vendor's
//! rule and forwards it over TLS through [`crate::upstream`].
//!
//! - [`listener`]: the accept loop, connection limits and graceful shutdown.
//! - `connection`: deadlines on an app connection's first bytes and on its writes.
//! - [`budget`]: the byte budget of request bodies held in memory.
//! - [`route`]: request form, tenant, vendor and host, in the documented order of checks.
//! - [`canonical`]: the one path form forwarded, so rules check what vendors read.
//! - [`error`]: the refusals sidekey answers itself.
//! - the rules themselves live in [`crate::vendors`].
//!
//! Wiring (from `sidekey serve`):
//! ```ignore
//! let client = sidekey::upstream::Client::new(upstream_config)?;
//! let proxy = sidekey::proxy::Proxy::new(snapshot_reader, client, token_source, ProxyConfig::default());
//! let listener = tokio::net::TcpListener::bind(proxy_listen).await?;
//! sidekey::proxy::serve(listener, proxy, shutdown_signal).await;
//! ```

pub mod budget;
pub(crate) mod canonical;
pub(crate) mod connection;
pub mod error;
mod headers;
pub mod listener;
pub(crate) mod route;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

pub use budget::BodyBudget;
pub use error::ProxyError;
pub use listener::{ConnectionSlots, serve};

use crate::tenants::{EffectiveTenant, SnapshotReader, VendorKind};
use crate::upstream;
use crate::vendors::m3ter::TokenSource;
use crate::vendors::m3ter::rule as m3ter_rule;
use crate::vendors::{mailkit, miradore};

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
    tokens: Arc<dyn TokenSource>,
    config: ProxyConfig,
    slots: ConnectionSlots,
    budget: BodyBudget,
    next_id: AtomicU64,
    /// Tenants with their own label, when per-tenant metrics are on.
    tenant_labels: Option<Mutex<HashSet<Arc<str>>>>,
    metrics: HotMetrics,
}

/// The request metrics of the common outcomes, registered once: looking a labelled metric
/// up in the recorder's registry on every request (hashing its name and labels) costs
/// measurable CPU at tens of thousands of requests per second. Rare outcomes (sidekey's own
/// error codes) are still looked up when they happen.
struct HotMetrics {
    /// Indexed like [`HotMetrics::VENDORS`].
    vendors: [VendorMetrics; 4],
}

struct VendorMetrics {
    status_class: [metrics::Counter; 3],
    duration: metrics::Histogram,
}

impl HotMetrics {
    /// Label values, indexed like [`HotMetrics::vendor_index`] and the status classes.
    const VENDORS: [&'static str; 4] = ["miradore", "m3ter", "mailkit", "none"];
    const CLASSES: [&'static str; 3] = ["2xx", "4xx", "5xx"];

    fn new() -> Self {
        Self {
            vendors: Self::VENDORS.map(|vendor| VendorMetrics {
                status_class: Self::CLASSES.map(|outcome| {
                    metrics::counter!("sidekey_proxy_requests_total",
                        "vendor" => vendor, "outcome" => outcome)
                }),
                duration: metrics::histogram!("sidekey_proxy_request_duration_seconds",
                    "vendor" => vendor),
            }),
        }
    }

    fn vendor_index(vendor: Option<VendorKind>) -> usize {
        match vendor {
            Some(VendorKind::Miradore) => 0,
            Some(VendorKind::M3ter) => 1,
            Some(VendorKind::Mailkit) => 2,
            None => 3,
        }
    }

    /// Counts a request under `outcome`: a class for the vendor's answers, sidekey's error
    /// code for its own.
    fn record(&self, vendor: Option<VendorKind>, outcome: Outcome, seconds: f64) {
        let v = Self::vendor_index(vendor);
        let m = &self.vendors[v];
        let hot = match outcome {
            Outcome::Class(2) => Some(0),
            Outcome::Class(4) => Some(1),
            Outcome::Class(5) => Some(2),
            _ => None,
        };
        match hot {
            Some(c) => m.status_class[c].increment(1),
            None => metrics::counter!("sidekey_proxy_requests_total",
                "vendor" => Self::VENDORS[v], "outcome" => outcome.label())
            .increment(1),
        }
        m.duration.record(seconds);
    }
}

/// The `outcome` label of a request.
#[derive(Clone, Copy)]
enum Outcome {
    /// The first digit of the status the vendor answered.
    Class(u8),
    /// The error code of a refusal sidekey answered itself.
    Refused(&'static str),
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Class(1) => "1xx",
            Outcome::Class(2) => "2xx",
            Outcome::Class(3) => "3xx",
            Outcome::Class(4) => "4xx",
            Outcome::Class(_) => "5xx",
            Outcome::Refused(code) => code,
        }
    }
}

/// What one request's log line and metrics say, filled in as the request is understood.
struct RequestLog {
    tenant: Option<Arc<str>>,
    vendor: Option<VendorKind>,
    host: Option<Box<str>>,
}

impl Proxy {
    pub fn new(
        snapshot: SnapshotReader,
        client: upstream::Client,
        tokens: Arc<dyn TokenSource>,
        config: ProxyConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                snapshot,
                client,
                tokens,
                tenant_labels: config.tenant_metrics.then(Default::default),
                metrics: HotMetrics::new(),
                slots: ConnectionSlots::new(config.max_connections),
                budget: BodyBudget::new(config.body_memory_budget),
                config,
                next_id: AtomicU64::new(1),
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

    /// Serves one request: never fails, refusals become sidekey's error responses.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let start = Instant::now();
        let request_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // The log line's request fields, copied only when the line will be written.
        let logged = tracing::enabled!(tracing::Level::INFO)
            .then(|| (req.method().clone(), Box::<str>::from(req.uri().path())));
        let mut log = RequestLog {
            tenant: None,
            vendor: None,
            host: None,
        };
        // Boxed: the routing future holds the whole upstream exchange, and wrapping it inline
        // in the timeout would copy that large state machine on every request.
        let route = Box::pin(self.route(req, &mut log));
        let outcome = tokio::time::timeout(self.inner.config.request_timeout, route).await;
        let (resp, code) = match outcome {
            Ok(Ok(resp)) => (resp, None),
            Ok(Err(e)) => (e.to_response().map(Either::Right), Some(e.code())),
            Err(_) => {
                let e = ProxyError::UpstreamTimeout {
                    host: log.host.as_deref().unwrap_or("the vendor").to_owned(),
                };
                (e.to_response().map(Either::Right), Some(e.code()))
            }
        };
        let elapsed = start.elapsed();
        let status = resp.status();
        let outcome = match code {
            Some(code) => Outcome::Refused(code),
            None => Outcome::Class(u8::try_from(status.as_u16() / 100).unwrap_or(5)),
        };
        self.inner
            .metrics
            .record(log.vendor, outcome, elapsed.as_secs_f64());
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
            metrics::counter!("sidekey_proxy_requests_by_tenant_total",
                "tenant" => label, "vendor" => vendor_label(log.vendor))
            .increment(1);
        }
        if let Some((method, path)) = logged {
            // Path without query: Miradore v1 keys travel in the query.
            tracing::info!(
                request_id,
                tenant = log.tenant.as_deref().unwrap_or("-"),
                vendor = vendor_label(log.vendor),
                method = %method,
                path = %path,
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                error = code.unwrap_or(""),
                "proxied request"
            );
        }
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        log: &mut RequestLog,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let target = route::classify(&req)?;
        let tenant_id = route::tenant_id(req.headers())?.ok_or(ProxyError::TenantRequired)?;
        let snapshot = self.inner.snapshot.load();
        let Some(tenant) = snapshot.tenant(&tenant_id).cloned() else {
            log.tenant = Some(Arc::from(tenant_id.as_ref()));
            return Err(ProxyError::UnknownTenant(tenant_id.into_owned()));
        };
        drop(snapshot);
        log.tenant = Some(tenant.id.clone());
        log.vendor = target.endpoint.vendor();
        let host = route::upstream_host(&target.endpoint, &tenant)?;
        log.host = Some(host.into());
        let mut plan = plan(&req, &target, &tenant)?;
        let path_and_query = match &mut plan {
            Plan::Miradore(rw) => Bytes::from(std::mem::take(&mut rw.path_and_query)),
            _ => match target.query {
                Some(q) => Bytes::from(format!("{}?{q}", target.path.as_str())),
                None => Bytes::copy_from_slice(target.path.as_str().as_bytes()),
            },
        };
        let uri = upstream_uri(host, path_and_query)?;

        if matches!(plan, Plan::M3ter(m3ter_rule::Action::LocalToken)) {
            return Ok(m3ter_rule::placeholder_response().map(Either::Right));
        }

        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        // The upstream client picks HTTP/2 or HTTP/1.1 by ALPN; it wants an HTTP/1.1 request.
        parts.version = Version::HTTP_11;
        prepare_headers(&mut parts.headers);

        let req = match plan {
            Plan::Miradore(rw) => {
                let creds = tenant.miradore.as_ref().ok_or_else(not_configured)?;
                miradore::apply_headers(&mut parts.headers, &rw, creds)?;
                Request::from_parts(parts, Either::Left(body))
            }
            Plan::Mailkit(endpoint) => {
                let creds = tenant.mailkit.as_ref().ok_or_else(not_configured)?;
                if parts
                    .headers
                    .get(CONTENT_ENCODING)
                    .is_some_and(|v| v.as_bytes() != b"identity")
                {
                    return Err(ProxyError::bad_request(
                        "a compressed Mailkit body cannot be rewritten; send it uncompressed",
                    ));
                }
                // Boxed: a body read is a state machine the header-only rules need not carry.
                let limit = self.inner.config.rewrite_body_limit;
                let (raw, mut held) = Box::pin(self.inner.budget.read(body, limit)).await?;
                let rewritten = mailkit::rewrite(endpoint, &raw, creds)?;
                // The rewritten body replaces the raw one in the reservation; it is longer by
                // the credentials spliced in.
                let grown = rewritten.len().saturating_sub(raw.len());
                drop(raw);
                self.inner.budget.grow(&mut held, grown)?;
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                let req = Request::from_parts(parts, upstream::full_body(rewritten));
                let resp = self
                    .inner
                    .client
                    .send(req)
                    .await
                    .map_err(|e| ProxyError::upstream(vendor_label(log.vendor), host, e))?;
                // The body has been sent by the time the vendor answers.
                drop(held);
                return Ok(to_app(resp));
            }
            Plan::M3ter(_) => {
                let creds = tenant.m3ter.as_ref().ok_or_else(not_configured)?;
                let ctx = m3ter_rule::Ctx {
                    client: &self.inner.client,
                    tokens: self.inner.tokens.as_ref(),
                    creds,
                    host,
                    replay_limit: self.inner.config.replay_body_limit,
                    budget: &self.inner.budget,
                };
                // Boxed for the same reason: token exchange and replay.
                let resp = Box::pin(m3ter_rule::send(ctx, parts, body)).await?;
                return Ok(to_app(resp));
            }
        };
        let resp = self
            .inner
            .client
            .send(req)
            .await
            .map_err(|e| ProxyError::upstream(vendor_label(log.vendor), host, e))?;
        Ok(to_app(resp))
    }
}

/// The vendor's response as the app receives it: hop-by-hop headers removed, body streamed.
fn to_app(resp: Response<upstream::VendorBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, &[]);
    Response::from_parts(parts, Either::Left(body))
}

/// The rule's decision, made before the request is taken apart.
enum Plan {
    Miradore(miradore::Rewritten),
    M3ter(m3ter_rule::Action),
    Mailkit(mailkit::Endpoint),
}

fn plan<B>(
    req: &Request<B>,
    target: &route::Target<'_>,
    tenant: &EffectiveTenant,
) -> Result<Plan, ProxyError> {
    match (
        target.endpoint.vendor(),
        &tenant.miradore,
        &tenant.m3ter,
        &tenant.mailkit,
    ) {
        (Some(VendorKind::Miradore), Some(c), _, _) => Ok(Plan::Miradore(miradore::rewrite(
            target.path,
            target.query,
            c,
        )?)),
        (Some(VendorKind::M3ter), _, Some(c), _) => Ok(Plan::M3ter(m3ter_rule::check(
            req.method(),
            target.path,
            c,
        )?)),
        (Some(VendorKind::Mailkit), _, _, Some(_)) => Ok(Plan::Mailkit(mailkit::endpoint(
            req.method(),
            target.path.as_str(),
        )?)),
        _ => Err(not_configured()),
    }
}

// `route::upstream_host` has already refused vendors the tenant lacks; this is the same answer
// should the two ever disagree, rather than a panic.
fn not_configured() -> ProxyError {
    ProxyError::bad_request("the tenant has no connection for this vendor")
}

/// The `vendor` label and log field: the vendor's name, or `none` before one is known.
fn vendor_label(vendor: Option<VendorKind>) -> &'static str {
    vendor.map_or("none", VendorKind::as_str)
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
