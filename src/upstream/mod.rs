//! The upstream side: the pooled HTTPS client that dials vendors.
//!
//! Kept apart from the listener: this module knows TLS roots, ALPN, `--connect-to` and
//! timeouts toward vendors, nothing about tenants or the app's connection. Certificates are
//! always verified against the public web roots plus the operator's `--upstream-ca` files;
//! there is deliberately no switch to turn verification off.
//!
//! - `connect_to`: the TCP dialer under TLS (`--connect-to`, connect timeout).
//! - `pool`: idle HTTP/1.1 and shared HTTP/2 connections per vendor host.

mod connect_to;
mod pool;

use std::error::Error as StdError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tower::ServiceExt as _;

use connect_to::{ConnectTimeout, RedirectingConnector};
pub use connect_to::{ConnectTo, ConnectToParseError};
pub use pool::VendorBody;
use pool::{Conn, Pool, SendError, Slot};

/// A request body toward a vendor: the app's body streamed as received, or a buffered one
/// (rewritten by a rule, kept for replay, or built by sidekey itself).
pub type Body = Either<Incoming, Full<Bytes>>;

/// An empty request body.
pub fn empty_body() -> Body {
    Either::Right(Full::new(Bytes::new()))
}

/// A buffered request body.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(bytes.into()))
}

/// How to reach vendors. Built once from the `serve` flags.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// PEM files whose certificates are trusted in addition to the public web roots
    /// (`--upstream-ca`, repeatable). Default: none.
    pub extra_ca_files: Vec<PathBuf>,
    /// `--connect-to` rules, first match wins. Default: none.
    pub connect_to: Vec<ConnectTo>,
    /// Bound on the TCP connect to a vendor; past it the request fails with 504
    /// `upstream_timeout`. Default: 10 s.
    pub connect_timeout: Duration,
    /// Bound on the time from sending a request (including connect and TLS handshake) to
    /// receiving the response headers; past it 504 `upstream_timeout`. The response body is
    /// not bounded: it streams for as long as the vendor sends it. Default: 60 s.
    pub response_header_timeout: Duration,
    /// How long an idle pooled connection is kept. Default: 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per vendor host. Default: 1024, the app connections sidekey
    /// serves at once (`ProxyConfig::max_connections`): an HTTP/1.1 vendor connection carries
    /// one request at a time, so a steady load of any concurrency the proxy accepts finds
    /// its connections idle again rather than dialing the surplus over a lower cap anew (a
    /// TCP and TLS handshake per request). Those left over from a burst close after
    /// `pool_idle_timeout`.
    pub pool_max_idle_per_host: usize,
    /// HTTP/2: a PING is sent on a vendor connection after this long without a frame from
    /// the vendor, busy or idle. Default: 20 s.
    pub h2_keep_alive_interval: Duration,
    /// HTTP/2: a vendor that does not answer that PING within this long is taken for gone:
    /// the connection is closed, requests on it fail with 502 `upstream_unreachable`, and
    /// the next request dials a new one. Default: 10 s.
    pub h2_keep_alive_timeout: Duration,
    /// HTTP/2: streams in flight on one vendor connection before another connection to the
    /// same host is dialed. The common server limit (and RFC 9113's recommended minimum) is
    /// 100; past the vendor's own limit, requests would queue on the connection instead.
    /// Default: 100.
    pub h2_max_streams_per_connection: usize,
    /// TCP keep-alive on vendor sockets: probes start after this long idle, so a peer that
    /// vanished (no FIN, no RST) is noticed by the kernel even on an HTTP/1.1 connection.
    /// Default: 30 s.
    pub tcp_keep_alive: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            extra_ca_files: Vec::new(),
            connect_to: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            response_header_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 1024,
            h2_keep_alive_interval: Duration::from_secs(20),
            h2_keep_alive_timeout: Duration::from_secs(10),
            h2_max_streams_per_connection: 100,
            tcp_keep_alive: Duration::from_secs(30),
        }
    }
}

/// Building the client failed; the message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("cannot read upstream CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("upstream CA file {path} contains no certificate")]
    CaFileEmpty { path: PathBuf },
    #[error("upstream CA file {path} has an unusable certificate: {source}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a vendor call failed, by whose fault: the kinds map to the `kind` label of
/// `sidekey_upstream_errors_total` and to 502 `upstream_unreachable` or 504 `upstream_timeout`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to the vendor: {0}")]
    Connect(#[source] BoxError),
    #[error("TLS with the vendor failed: {0}")]
    Tls(#[source] BoxError),
    #[error("the vendor connection failed: {0}")]
    Protocol(#[source] BoxError),
    #[error("the vendor did not answer in time")]
    Timeout,
}

/// `sidekey_upstream_errors_total{vendor,kind}`: failures reaching a vendor, for its data
/// calls and (m3ter) its token exchanges alike.
pub const METRIC_ERRORS: &str = "sidekey_upstream_errors_total";

/// Registers the help text of [`METRIC_ERRORS`].
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_ERRORS,
        "Failures reaching a vendor (data calls and m3ter token exchanges), by vendor and kind \
         (connect, tls, timeout, protocol)"
    );
}

impl UpstreamError {
    /// Counts this failure reaching `vendor` in [`METRIC_ERRORS`], under its [`kind`].
    ///
    /// [`kind`]: UpstreamError::kind
    pub fn record(&self, vendor: &'static str) {
        metrics::counter!(METRIC_ERRORS, "vendor" => vendor, "kind" => self.kind()).increment(1);
    }

    /// `connect`, `tls`, `timeout` or `protocol`: the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Timeout => "timeout",
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout)
    }

    /// Dialing failed: TCP (or its timeout) or the TLS handshake.
    fn from_connect(err: BoxError) -> Self {
        let (tls, timeout) = Self::causes(err.as_ref());
        if timeout {
            UpstreamError::Timeout
        } else if tls {
            UpstreamError::Tls(err)
        } else {
            UpstreamError::Connect(err)
        }
    }

    /// The HTTP exchange on an established connection failed.
    fn from_hyper(err: hyper::Error) -> Self {
        if Self::causes(&err).0 {
            UpstreamError::Tls(Box::new(err))
        } else {
            UpstreamError::Protocol(Box::new(err))
        }
    }

    /// (a TLS error, a connect timeout) anywhere in the chain.
    fn causes(err: &(dyn StdError + 'static)) -> (bool, bool) {
        let mut tls = false;
        let mut timeout = false;
        walk_chain(err, &mut |e| {
            tls |= e.is::<rustls::Error>();
            timeout |= e.is::<ConnectTimeout>();
        });
        (tls, timeout)
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Visits every error in the chain, descending into `io::Error` payloads, whose `source()`
/// skips the wrapped error itself.
fn walk_chain(err: &(dyn StdError + 'static), visit: &mut dyn FnMut(&(dyn StdError + 'static))) {
    let mut current = Some(err);
    let mut depth = 0;
    while let Some(e) = current {
        depth += 1;
        if depth > 16 {
            return;
        }
        visit(e);
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            walk_chain(inner, visit);
        }
        current = e.source();
    }
}

/// The pooled HTTPS client toward vendors. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connector: HttpsConnector<RedirectingConnector>,
    pool: Pool,
    response_header_timeout: Duration,
    h2_keep_alive_interval: Duration,
    h2_keep_alive_timeout: Duration,
}

/// How many times a request that never left goes to another pooled connection (one the
/// vendor had closed) before a new connection is dialed for it.
const REUSE_ATTEMPTS: usize = 2;

impl Client {
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamConfigError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for path in &config.extra_ca_files {
            add_ca_file(&mut roots, path)?;
        }
        // The ring provider is passed explicitly: no process-wide default is installed or read.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(RedirectingConnector::new(
                config.connect_to,
                config.connect_timeout,
                config.tcp_keep_alive,
            ));
        Ok(Self {
            inner: Arc::new(ClientInner {
                connector,
                pool: Pool::new(
                    config.pool_max_idle_per_host,
                    config.pool_idle_timeout,
                    config.h2_max_streams_per_connection,
                ),
                response_header_timeout: config.response_header_timeout,
                h2_keep_alive_interval: config.h2_keep_alive_interval,
                h2_keep_alive_timeout: config.h2_keep_alive_timeout,
            }),
        })
    }

    /// Sends `req` (absolute `https://` URI) and returns once the response headers arrived;
    /// the body streams afterwards. Redirects are not followed.
    pub fn send(
        &self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<VendorBody>, UpstreamError>> + Send + '_ {
        self.send_by(req, None)
    }

    /// [`Self::send`], failing with [`UpstreamError::Timeout`] at `deadline` (the caller's
    /// own, e.g. the proxied request's) if that comes before the response header timeout.
    /// One timer bounds both: a request that waits on the vendor pays for one, not two.
    pub fn send_by(
        &self,
        req: Request<Body>,
        deadline: Option<tokio::time::Instant>,
    ) -> impl Future<Output = Result<Response<VendorBody>, UpstreamError>> + Send + '_ {
        let by = tokio::time::Instant::now() + self.inner.response_header_timeout;
        let by = deadline.map_or(by, |d| d.min(by));
        // Not an `async fn` nor an `async` block: either would hold the timed future twice
        // (once captured, once awaited), and every proxied request moves this future.
        let timed = tokio::time::timeout_at(by, self.send_pooled(req));
        timed.map(|outcome| outcome.unwrap_or(Err(UpstreamError::Timeout)))
    }

    async fn send_pooled(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<VendorBody>, UpstreamError> {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::Protocol("the request URI names no host".into()))?;
        let pool = &self.inner.pool;
        let checkout = |authority| {
            pool.checkout(authority)
                .map_err(|e| UpstreamError::Protocol(Box::new(e)))
        };
        let (slot, mut pooled) = checkout(&authority)?;
        let mut attempts = 0;
        loop {
            let (conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                // Boxed: dialing (TCP, TLS, HTTP/2 handshake) is a large state machine that
                // would otherwise be moved around inline with every pooled request.
                None => (Box::pin(self.connect(&authority, &slot)).await?, false),
            };
            match slot.send(conn, req).await {
                Ok(resp) => return Ok(resp),
                // A pooled connection the vendor closed while it was idle: the request never
                // left, so it may go on another one.
                Err(SendError::NotSent(back, error)) if reused => {
                    tracing::debug!(%error, "pooled vendor connection was closed; retrying");
                    req = *back;
                    // Back to absolute form without `Host`, so any connection can take it.
                    if let Some(path) = req.uri().path_and_query().cloned() {
                        *req.uri_mut() = https_uri(authority.clone(), path)
                            .map_err(|e| UpstreamError::Protocol(Box::new(e)))?;
                    }
                    req.headers_mut().remove(http::header::HOST);
                    attempts += 1;
                    pooled = if attempts < REUSE_ATTEMPTS {
                        checkout(&authority)?.1
                    } else {
                        None
                    };
                }
                Err(SendError::NotSent(_, e) | SendError::Failed(e)) => {
                    return Err(UpstreamError::from_hyper(e));
                }
            }
        }
    }

    /// Dials `authority` (TCP, then TLS with ALPN) and starts an HTTP/2 or HTTP/1.1
    /// connection on it, whichever the vendor chose.
    async fn connect(&self, authority: &Authority, slot: &Slot) -> Result<Conn, UpstreamError> {
        let uri = https_uri(authority.clone(), PathAndQuery::from_static("/"))
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        let io = self
            .inner
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(UpstreamError::from_connect)?;
        if io.connected().is_negotiated_h2() {
            // PINGs while idle too: a shared connection whose vendor went silent is dropped
            // before a request is sent on it, not after that request times out.
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(self.inner.h2_keep_alive_interval)
                .keep_alive_timeout(self.inner.h2_keep_alive_timeout)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(UpstreamError::from_hyper)?;
            drive(conn, "HTTP/2");
            Ok(slot.share_http2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(UpstreamError::from_hyper)?;
            drive(conn, "HTTP/1.1");
            Ok(Conn::Http1(sender))
        }
    }
}

/// `https://{authority}{path_and_query}`: every URI toward a vendor is put together here,
/// from parts already parsed (no formatting and parsing back).
pub(crate) fn https_uri(
    authority: Authority,
    path_and_query: PathAndQuery,
) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTPS);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts)
}

/// Runs a vendor connection in its own task until it closes; hyper's senders talk to it.
fn drive(conn: impl Future<Output = hyper::Result<()>> + Send + 'static, protocol: &'static str) {
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, protocol, "vendor connection ended with an error");
        }
    });
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), UpstreamConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| UpstreamConfigError::CaFile {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(UpstreamConfigError::CaFileEmpty {
            path: path.to_owned(),
        });
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|source| UpstreamConfigError::CaCert {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let cfg = UpstreamConfig {
            extra_ca_files: vec![missing.clone()],
            ..Default::default()
        };
        let err = Client::new(cfg).err().unwrap().to_string();
        assert!(err.contains("nope.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        let cfg = UpstreamConfig {
            extra_ca_files: vec![empty],
            ..Default::default()
        };
        let err = Client::new(cfg).err().unwrap().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }

    #[tokio::test]
    async fn default_client_builds() {
        assert!(Client::new(UpstreamConfig::default()).is_ok());
    }
}
