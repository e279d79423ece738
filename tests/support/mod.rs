//! Shared test harness: a test CA, a builder-style mock vendor over real TLS, and the proxy
//! started on `127.0.0.1:0` pointed at it. No fixed ports, no sleeps for synchronisation.
//!
//! ```ignore
//! let ca = TestCa::new("sidekey test CA");
//! let mock = MockVendor::builder(&ca).respond(|_| MockResponse::ok("{}")).start().await;
//! let proxy = TestProxy::builder().tenant(tenants::acme()).trust(&ca).route_to(&mock).start().await;
//! ```
#![allow(dead_code)]

/// A real etcd and a cuttable relay to it, for the fleet tests.
pub mod etcd;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

use sidekey::proxy::{Proxy, ProxyConfig};
use sidekey::tenants::{EffectiveTenant, SnapshotReader};
use sidekey::upstream::{self, ConnectTo, UpstreamConfig};
use sidekey::vendors::m3ter::TokenSource;

/// Every vendor host sidekey may dial, as certificate names for the mock.
pub const VENDOR_NAMES: &[&str] = &[
    "online.miradore.com",
    "*.online.miradore.com",
    "api.m3ter.com",
    "ingest.m3ter.com",
    "api.staging.m3ter.com",
    "ingest.staging.m3ter.com",
    "api.mailkit.eu",
];

// ---------------------------------------------------------------------------------------
// Test CA

/// A throwaway CA that signs server certificates for mocks.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA cert");
        let pem = cert.pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA certificate written to a PEM file (what `--upstream-ca` takes).
    pub fn pem_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write CA pem");
        path
    }

    /// A server certificate chain and key for `names`, signed by this CA.
    pub fn server_cert(
        &self,
        names: &[&str],
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("server key");
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("server params");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server cert");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Mock vendor

/// One request as the mock vendor received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body arrived to its end (not cut off by a reset or a closed connection).
    pub body_complete: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
    /// The host the request was for: `Host` over HTTP/1.1, `:authority` over HTTP/2.
    pub fn host(&self) -> Option<&str> {
        self.header("host").or_else(|| self.uri.host())
    }
    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("")
    }
}

/// What the mock answers.
pub struct MockResponse {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: MockBody,
    delay: Option<Duration>,
}

enum MockBody {
    Bytes(Bytes),
    /// `first`, then (after `gate` is notified) `rest_len` more bytes in 64 KiB chunks.
    Gated {
        first: Bytes,
        rest_len: usize,
        gate: Arc<Notify>,
    },
    /// Never answers.
    Never,
    /// `body`, with the response head sent only once `gate` is notified.
    HeadGated {
        body: Bytes,
        gate: Arc<Notify>,
    },
}

impl MockResponse {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self::status(200).body(body)
    }
    pub fn status(status: u16) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("status"),
            headers: Vec::new(),
            body: MockBody::Bytes(Bytes::new()),
            delay: None,
        }
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = MockBody::Bytes(body.into());
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// A body of `first` followed by `rest_len` bytes that are only sent once `gate` is
    /// notified: lets a test prove the proxy streams without timing.
    pub fn gated(first: impl Into<Bytes>, rest_len: usize, gate: Arc<Notify>) -> Self {
        let mut r = Self::status(200);
        r.body = MockBody::Gated {
            first: first.into(),
            rest_len,
            gate,
        };
        r
    }
    /// `200 body`, answered only once `gate` is notified (one `notify_one` per request):
    /// holds a request at the vendor for as long as a test needs, without timing.
    pub fn held_until(gate: Arc<Notify>, body: impl Into<Bytes>) -> Self {
        let mut r = Self::status(200);
        r.body = MockBody::HeadGated {
            body: body.into(),
            gate,
        };
        r
    }
    /// The response head never comes.
    pub fn never() -> Self {
        let mut r = Self::status(200);
        r.body = MockBody::Never;
        r
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> MockResponse + Send + Sync>;

pub struct MockVendorBuilder<'a> {
    ca: &'a TestCa,
    names: Vec<String>,
    responder: Responder,
    http1_only: bool,
    close_idle_after: Option<Duration>,
}

impl MockVendorBuilder<'_> {
    /// Offer only `http/1.1` in ALPN (default: `h2` and `http/1.1`).
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }
    /// Close an HTTP/1.1 connection, without a word, once it has been idle for `idle`:
    /// what a vendor's load balancer does to keep-alive connections.
    pub fn close_idle_after(mut self, idle: Duration) -> Self {
        self.close_idle_after = Some(idle);
        self
    }
    /// Certificate names (default: every vendor host in [`VENDOR_NAMES`]).
    pub fn names(mut self, names: &[&str]) -> Self {
        self.names = names.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn respond(
        mut self,
        f: impl Fn(&Recorded) -> MockResponse + Send + Sync + 'static,
    ) -> Self {
        self.responder = Arc::new(f);
        self
    }
    /// Answers with `responses` in order, repeating the last one.
    pub fn respond_seq(self, responses: Vec<fn() -> MockResponse>) -> Self {
        let n = AtomicUsize::new(0);
        self.respond(move |_| {
            let i = n.fetch_add(1, Ordering::SeqCst).min(responses.len() - 1);
            responses[i]()
        })
    }

    pub async fn start(self) -> MockVendor {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let (chain, key) = self.ca.server_cert(&names);
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
        tls.alpn_protocols = if self.http1_only {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        let state = Arc::new(MockState {
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            silent_before: Arc::new(AtomicUsize::new(0)),
            closed: tokio::sync::watch::channel(0).0,
            responder: self.responder,
        });
        let close_idle_after = self.close_idle_after;
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let id = st.connections.fetch_add(1, Ordering::SeqCst);
                let tcp = Silenceable {
                    tcp,
                    id,
                    silent_before: st.silent_before.clone(),
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        st.closed.send_modify(|n| *n += 1);
                        return;
                    };
                    let served = st.clone();
                    let svc = service_fn(move |req| {
                        let st = served.clone();
                        async move { Ok::<_, Infallible>(st.answer(req).await) }
                    });
                    let mut server = auto::Builder::new(TokioExecutor::new());
                    if let Some(idle) = close_idle_after {
                        // hyper's head timeout runs from the moment the connection waits for
                        // the next request, so it is the keep-alive idle timeout too.
                        server
                            .http1()
                            .timer(TokioTimer::new())
                            .header_read_timeout(idle);
                    }
                    let _ = server.serve_connection(TokioIo::new(tls), svc).await;
                    st.closed.send_modify(|n| *n += 1);
                });
            }
        });
        MockVendor {
            addr,
            state,
            _stop: stop_tx,
        }
    }
}

struct MockState {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    /// Connections accepted before this count are black holes (see `MockVendor::go_silent`).
    silent_before: Arc<AtomicUsize>,
    /// Connections that have ended (closed by either side).
    closed: tokio::sync::watch::Sender<usize>,
    responder: Responder,
}

impl MockState {
    async fn answer(&self, req: Request<Incoming>) -> Response<MockBodyStream> {
        let (parts, body) = req.into_parts();
        let collected = body.collect().await.map(|c| c.to_bytes());
        let body_complete = collected.is_ok();
        let rec = Recorded {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body: collected.unwrap_or_default(),
            body_complete,
        };
        let resp = (self.responder)(&rec);
        self.requests.lock().unwrap().push(rec);
        if let Some(d) = resp.delay {
            tokio::time::sleep(d).await;
        }
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        match resp.body {
            MockBody::Never => std::future::pending::<()>().await,
            MockBody::HeadGated { body, gate } => {
                gate.notified().await;
                if !body.is_empty() {
                    let _ = tx.try_send(body);
                }
            }
            MockBody::Bytes(b) => {
                if !b.is_empty() {
                    let _ = tx.try_send(b);
                }
            }
            MockBody::Gated {
                first,
                rest_len,
                gate,
            } => {
                tokio::spawn(async move {
                    if tx.send(first).await.is_err() {
                        return;
                    }
                    gate.notified().await;
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let mut left = rest_len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if tx.send(chunk.slice(..n)).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                });
            }
        }
        let mut out = Response::new(MockBodyStream(rx));
        *out.status_mut() = resp.status;
        for (k, v) in resp.headers {
            out.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        out
    }
}

/// A mock's TCP connection, which [`MockVendor::go_silent`] turns into a black hole.
struct Silenceable {
    tcp: tokio::net::TcpStream,
    id: usize,
    silent_before: Arc<AtomicUsize>,
}

impl Silenceable {
    fn silent(&self) -> bool {
        self.id < self.silent_before.load(Ordering::SeqCst)
    }
}

impl tokio::io::AsyncRead for Silenceable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.silent() {
            // Never woken: nothing will ever be read.
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Silenceable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.silent() {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.silent() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.silent() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A response body fed by a channel; ends when the sender is dropped.
struct MockBodyStream(mpsc::Receiver<Bytes>);

impl http_body::Body for MockBodyStream {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A mock vendor: TLS on `127.0.0.1:<port>` with a certificate from a [`TestCa`].
pub struct MockVendor {
    addr: SocketAddr,
    state: Arc<MockState>,
    _stop: oneshot::Sender<()>,
}

impl MockVendor {
    pub fn builder(ca: &TestCa) -> MockVendorBuilder<'_> {
        MockVendorBuilder {
            ca,
            names: VENDOR_NAMES.iter().map(|s| s.to_string()).collect(),
            responder: Arc::new(|_| MockResponse::ok("{}")),
            http1_only: false,
            close_idle_after: None,
        }
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
    /// The only request received; panics unless exactly one arrived.
    pub fn single(&self) -> Recorded {
        let r = self.requests();
        assert_eq!(
            r.len(),
            1,
            "expected exactly one request at the mock, got {r:#?}"
        );
        r.into_iter().next().unwrap()
    }
    /// Every connection open now goes silent, as a vendor behind a dead network path: it
    /// stays open, reads nothing and answers nothing (bytes sent to it vanish). Connections
    /// made afterwards behave normally.
    pub fn go_silent(&self) {
        let accepted = self.state.connections.load(Ordering::SeqCst);
        self.state.silent_before.store(accepted, Ordering::SeqCst);
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
    /// Waits until `n` connections have ended; panics after 10 s.
    pub async fn wait_closed(&self, n: usize) {
        let mut rx = self.state.closed.subscribe();
        let ended = rx.wait_for(|closed| *closed >= n);
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .unwrap_or_else(|_| panic!("{n} mock connections did not end within 10 s"))
            .expect("mock state alive");
    }
}

// ---------------------------------------------------------------------------------------
// Upstream configuration

/// `--connect-to` rules sending every vendor host to `127.0.0.1:port`.
pub fn connect_to_rules(port: u16) -> Vec<ConnectTo> {
    ["*.miradore.com", "*.m3ter.com", "api.mailkit.eu"]
        .iter()
        .map(|host| {
            format!("{host}:443:127.0.0.1:{port}")
                .parse()
                .expect("rule")
        })
        .collect()
}

/// An upstream client that trusts `ca` and dials `mock` for every vendor host (what
/// `TestTenant` and other direct vendor calls use in tests).
pub fn upstream_client(ca: &TestCa, mock: &MockVendor) -> upstream::Client {
    upstream::Client::new(UpstreamConfig {
        extra_ca_files: vec![ca.pem_file()],
        connect_to: connect_to_rules(mock.port()),
        ..Default::default()
    })
    .expect("upstream client")
}

// ---------------------------------------------------------------------------------------
// Proxy under test

pub struct TestProxyBuilder {
    tenants: Vec<EffectiveTenant>,
    upstream: UpstreamConfig,
    config: ProxyConfig,
    tokens: Option<Arc<dyn TokenSource>>,
}

impl TestProxyBuilder {
    pub fn tenant(mut self, t: EffectiveTenant) -> Self {
        self.tenants.push(t);
        self
    }
    /// Trusts `ca` for upstream TLS (as `--upstream-ca`).
    pub fn trust(mut self, ca: &TestCa) -> Self {
        self.upstream.extra_ca_files.push(ca.pem_file());
        self
    }
    /// Adds `--connect-to` rules sending every vendor host to `port` on 127.0.0.1.
    pub fn route_to_port(mut self, port: u16) -> Self {
        for host in ["*.miradore.com", "*.m3ter.com", "api.mailkit.eu"] {
            let rule: ConnectTo = format!("{host}:443:127.0.0.1:{port}")
                .parse()
                .expect("rule");
            self.upstream.connect_to.push(rule);
        }
        self
    }
    pub fn route_to(self, mock: &MockVendor) -> Self {
        self.route_to_port(mock.port())
    }
    pub fn upstream(mut self, f: impl FnOnce(&mut UpstreamConfig)) -> Self {
        f(&mut self.upstream);
        self
    }
    pub fn config(mut self, f: impl FnOnce(&mut ProxyConfig)) -> Self {
        f(&mut self.config);
        self
    }
    pub fn tokens(mut self, tokens: Arc<dyn TokenSource>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    pub async fn start(self) -> TestProxy {
        let client = upstream::Client::new(self.upstream).expect("upstream client");
        let tokens = self
            .tokens
            .unwrap_or_else(|| Arc::new(tokens::Fixed("test-token")));
        let proxy = Proxy::new(
            SnapshotReader::fixed(self.tenants),
            client,
            tokens,
            self.config,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(sidekey::proxy::serve(listener, proxy, async move {
            let _ = rx.await;
        }));
        TestProxy {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

/// The proxy serving on `127.0.0.1:<port>`; stops when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub fn builder() -> TestProxyBuilder {
        TestProxyBuilder {
            tenants: Vec::new(),
            upstream: UpstreamConfig::default(),
            config: ProxyConfig::default(),
            tokens: None,
        }
    }
    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// A request to the proxy (prefix form) naming `tenant` in `x-sidekey-tenant`.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        tenant: &str,
    ) -> reqwest::RequestBuilder {
        self.client()
            .request(method, self.url(path))
            .header("x-sidekey-tenant", tenant)
    }
    /// A reqwest client that talks to the proxy directly (prefix form).
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }
    /// A reqwest client that uses the proxy as its HTTP proxy, naming `tenant` in userinfo.
    pub fn proxy_client(&self, tenant: &str) -> reqwest::Client {
        let proxy =
            reqwest::Proxy::http(format!("http://{tenant}:x@{}", self.addr)).expect("proxy");
        reqwest::Client::builder()
            .proxy(proxy)
            .build()
            .expect("client")
    }
    /// Stops accepting and waits for in-flight connections to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tenants and token sources

pub mod tenants {
    use sidekey::secret::Secret;
    use sidekey::tenants::{EffectiveTenant, M3terCreds, MailkitCreds, MiradoreCreds};

    pub const MIRADORE_SITE: &str = "Acme1";
    /// Has every character class Miradore keys are known to contain, plus URL delimiters.
    pub const MIRADORE_KEY: &str = "1_AaDf234sdf8!4{x},+/&=";
    pub const MIRADORE_KEY_ENCODED: &str = "1_AaDf234sdf8%214%7Bx%7D%2C%2B%2F%26%3D";
    pub const M3TER_ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
    pub const M3TER_SECRET: &str = "m3ter-api-secret-value";
    pub const MAILKIT_ID: &str = "12345";
    pub const MAILKIT_MD5: &str = "0123456789abcdef0123456789abcdef";

    pub fn miradore() -> MiradoreCreds {
        MiradoreCreds {
            site: MIRADORE_SITE.into(),
            api_key: Secret::new(MIRADORE_KEY),
        }
    }
    pub fn m3ter() -> M3terCreds {
        M3terCreds::new(
            "access-key-id".into(),
            Secret::new(M3TER_SECRET),
            M3TER_ORG.into(),
            String::new(),
        )
    }
    pub fn mailkit() -> MailkitCreds {
        MailkitCreds {
            client_id: MAILKIT_ID.into(),
            client_md5: Secret::new(MAILKIT_MD5),
        }
    }
    /// `acme`: all three vendors, production m3ter.
    pub fn acme() -> EffectiveTenant {
        EffectiveTenant {
            id: "acme".into(),
            miradore: Some(miradore()),
            m3ter: Some(m3ter()),
            mailkit: Some(mailkit()),
        }
    }
    /// `bare`: exists, uses no vendor.
    pub fn bare() -> EffectiveTenant {
        EffectiveTenant {
            id: "bare".into(),
            miradore: None,
            m3ter: None,
            mailkit: None,
        }
    }
}

pub mod tokens {
    use std::sync::Arc;

    use async_trait::async_trait;
    use sidekey::secret::Secret;
    use sidekey::tenants::M3terCreds;
    use sidekey::vendors::m3ter::{Bearer, BearerToken, TokenError, TokenSource};

    /// Always the same token.
    pub struct Fixed(pub &'static str);

    #[async_trait]
    impl TokenSource for Fixed {
        async fn token(&self, _: &M3terCreds) -> Result<BearerToken, TokenError> {
            Ok(Arc::new(
                Bearer::new(Secret::new(self.0)).expect("a header-safe token"),
            ))
        }
        fn refused(&self, _: &M3terCreds, _: &BearerToken) {}
    }
}
