//! HTTPS interception (issue 14): `CONNECT` to a tenant's vendor host, TLS terminated with a
//! leaf from the local CA, and every request inside served like the plain forms. Real
//! sockets: reqwest through the proxy with the interception CA as its only root, a raw
//! CONNECT client for the refusals, and tokio-rustls for handshake-level checks.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Version;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use sidekey::intercept::{CaError, InterceptCa, Leaves};
use sidekey::proxy::{ConnectionSlots, Proxy, ProxyConfig};
use sidekey::tenants::SnapshotReader;
use sidekey::upstream::{self, ConnectTo, UpstreamConfig};
use support::tenants::{
    M3TER_ORG, M3TER_SECRET, MAILKIT_ID, MAILKIT_MD5, MIRADORE_KEY, MIRADORE_KEY_ENCODED,
    MIRADORE_SITE, acme, bare,
};
use support::{MockVendor, TestCa, tokens};

/// The interception CA, made as `sidekey ca init` makes it.
struct LocalCa {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl LocalCa {
    fn new() -> Self {
        Self::permitting(&sidekey::cli::ca::permitted_domains())
    }
    /// A CA whose name constraints permit `domains` only (an older sidekey's, say).
    fn permitting(domains: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = sidekey::intercept::ca::init(&dir.path().join("ca"), domains).unwrap();
        Self {
            _dir: dir,
            cert,
            key,
        }
    }
    fn der(&self) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject as _;
        CertificateDer::from_pem_file(&self.cert).unwrap()
    }
    fn leaves(&self) -> Arc<Leaves> {
        Arc::new(Leaves::new(
            InterceptCa::load(&self.cert, &self.key, false).unwrap(),
        ))
    }
}

/// The proxy with interception on, every vendor host (and `*.example`) routed to `mock`.
struct Intercepting {
    addr: SocketAddr,
    slots: ConnectionSlots,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Intercepting {
    /// Stops the listener; whether `serve` returned (every connection closed) within `bound`.
    async fn shutdown_within(self, bound: Duration) -> bool {
        let _ = self.stop.send(());
        tokio::time::timeout(bound, self.served).await.is_ok()
    }
}

async fn start(
    ca: &TestCa,
    mock: &MockVendor,
    local: &LocalCa,
    f: impl FnOnce(&mut ProxyConfig),
) -> Intercepting {
    let mut connect_to: Vec<ConnectTo> = Vec::new();
    for host in [
        "*.miradore.com",
        "*.m3ter.com",
        "api.mailkit.eu",
        "*.example",
    ] {
        connect_to.push(
            format!("{host}:443:127.0.0.1:{}", mock.port())
                .parse()
                .unwrap(),
        );
    }
    let client = upstream::Client::new(UpstreamConfig {
        extra_ca_files: vec![ca.pem_file()],
        connect_to,
        ..Default::default()
    })
    .unwrap();
    let mut config = ProxyConfig {
        intercept: Some(local.leaves()),
        ..ProxyConfig::default()
    };
    f(&mut config);
    let proxy = Proxy::new(
        SnapshotReader::fixed(vec![acme(), bare()]),
        client,
        Arc::new(tokens::Fixed("test-token")),
        config,
    );
    let slots = proxy.connection_slots();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(sidekey::proxy::serve(listener, proxy, async move {
        let _ = rx.await;
    }));
    Intercepting {
        addr,
        slots,
        stop: tx,
        served,
    }
}

fn tls_client_config(root: CertificateDer<'static>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// What `HTTPS_PROXY=http://tenant:x@sidekey` with the CA as the only trusted root gives.
fn https_client(p: &Intercepting, local: &LocalCa, tenant: &str, alpn: &[u8]) -> reqwest::Client {
    let proxy = reqwest::Proxy::https(format!("http://{tenant}:x@{}", p.addr)).unwrap();
    reqwest::Client::builder()
        .proxy(proxy)
        .use_preconfigured_tls(tls_client_config(local.der(), alpn))
        .build()
        .unwrap()
}

/// Sends `CONNECT target` and reads the response head (and body, by Content-Length).
async fn raw_connect(
    addr: SocketAddr,
    target: &str,
    tenant: Option<&str>,
) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = tenant.map_or(String::new(), |t| {
        use base64::Engine as _;
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{t}:x"))
        )
    });
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8(head.clone()).unwrap();
        let len = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        format!("{text}{}", String::from_utf8(body).unwrap())
    };
    let out = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("CONNECT answer within 10 s");
    let status = out[9..12].parse().unwrap();
    (s, status, out)
}

// ---------------------------------------------------------------------------------------
// Requests inside the tunnel

#[tokio::test]
async fn every_vendor_rule_applies_inside_the_tunnel_over_http1_and_h2() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    let mut seen = 0;
    for (alpn, version) in [
        (&b"http/1.1"[..], Version::HTTP_11),
        (&b"h2"[..], Version::HTTP_2),
    ] {
        let c = https_client(&p, &local, "acme", alpn);
        let mailkit_body =
            r#"{"function":"mailkit.mailinglist.list","id":"placeholder","md5":"placeholder"}"#;
        let responses = [
            c.get("https://online.miradore.com/api/v2/Device")
                .send()
                .await,
            c.get("https://acme1.online.miradore.com/API/Device")
                .send()
                .await,
            c.get(format!(
                "https://api.m3ter.com/organizations/{M3TER_ORG}/meters"
            ))
            .header("authorization", "Bearer sidekey-placeholder")
            .send()
            .await,
            c.post(format!(
                "https://ingest.m3ter.com/organizations/{M3TER_ORG}/measurements"
            ))
            .body("{\"measurements\":[]}")
            .send()
            .await,
            c.post("https://api.mailkit.eu/json.fcgi")
                .header("content-type", "application/json")
                .body(mailkit_body)
                .send()
                .await,
        ];
        for r in responses {
            let r = r.unwrap();
            assert_eq!(r.status(), 200, "{alpn:?}");
            assert_eq!(r.version(), version);
        }
        let reqs = mock.requests();
        let reqs = &reqs[seen..];
        seen += reqs.len();
        assert_eq!(reqs.len(), 5);
        assert_eq!(reqs[0].host(), Some("online.miradore.com"));
        assert_eq!(reqs[0].header("x-instance-name"), Some(MIRADORE_SITE));
        assert_eq!(reqs[1].host(), Some("online.miradore.com"));
        assert_eq!(
            reqs[1].path_and_query(),
            format!("/Acme1/API/Device?auth={MIRADORE_KEY_ENCODED}")
        );
        assert_eq!(reqs[2].host(), Some("api.m3ter.com"));
        assert_eq!(reqs[2].header("authorization"), Some("Bearer test-token"));
        assert_eq!(reqs[3].host(), Some("ingest.m3ter.com"));
        assert_eq!(reqs[3].header("authorization"), Some("Bearer test-token"));
        assert_eq!(reqs[4].host(), Some("api.mailkit.eu"));
        assert!(
            reqs[4]
                .body_str()
                .contains(&format!("\"id\":\"{MAILKIT_ID}\""))
        );
        assert!(
            reqs[4]
                .body_str()
                .contains(&format!("\"md5\":\"{MAILKIT_MD5}\""))
        );
        for r in reqs {
            assert!(r.header("x-sidekey-tenant").is_none());
            assert!(r.header("proxy-authorization").is_none());
        }
    }
}

#[tokio::test]
async fn refusals_inside_the_tunnel_are_the_proxys() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let c = https_client(&p, &local, "acme", alpn);
        // A tenant header inside naming another tenant.
        let r = c
            .get("https://api.mailkit.eu/json.fcgi")
            .header("x-sidekey-tenant", "bare")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-sidekey-error"], "bad_request");
        // The vendor rule's own refusal: another Miradore site in the path.
        let r = c
            .get("https://online.miradore.com/Other/API/Device")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{alpn:?}");
        assert_eq!(r.headers()["x-sidekey-error"], "site_mismatch");
        // Naming the same tenant is fine.
        let r = c
            .get("https://online.miradore.com/api/v2/Device")
            .header("x-sidekey-tenant", "acme")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn a_request_inside_naming_another_host_is_refused() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    let (s, status, _) = raw_connect(p.addr, "api.mailkit.eu:443", Some("acme")).await;
    assert_eq!(status, 200);
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(local.der(), b"http/1.1")));
    let mut tls = tls
        .connect(ServerName::try_from("api.mailkit.eu").unwrap(), s)
        .await
        .unwrap();
    tls.write_all(b"GET /x HTTP/1.1\r\nHost: api.m3ter.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-sidekey-error: bad_request"), "{out}");
    assert_eq!(mock.connections(), 0);
}

// ---------------------------------------------------------------------------------------
// Refusals before the tunnel

#[tokio::test]
async fn connects_to_anything_but_the_tenants_vendor_hosts_are_refused_and_dial_nothing() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        ("evil.example:443", Some("acme"), 403, "host_not_allowed"),
        (
            "online.miradore.com.evil.example:443",
            Some("acme"),
            403,
            "host_not_allowed",
        ),
        ("127.0.0.1:443", Some("acme"), 403, "host_not_allowed"),
        ("[::1]:443", Some("acme"), 403, "host_not_allowed"),
        ("api.m3ter.com:8443", Some("acme"), 403, "host_not_allowed"),
        ("api.m3ter.com:80", Some("acme"), 403, "host_not_allowed"),
        (
            "api.staging.m3ter.com:443",
            Some("acme"),
            403,
            "host_not_allowed",
        ),
        ("www.m3ter.com:443", Some("acme"), 403, "host_not_allowed"),
        (
            "other.online.miradore.com:443",
            Some("acme"),
            403,
            "site_mismatch",
        ),
        (
            "api.m3ter.com:443",
            Some("bare"),
            403,
            "vendor_not_configured",
        ),
        (
            "api.mailkit.eu:443",
            Some("bare"),
            403,
            "vendor_not_configured",
        ),
        ("api.m3ter.com:443", Some("ghost"), 403, "unknown_tenant"),
        ("api.m3ter.com:443", None, 407, "tenant_required"),
    ];
    for (target, tenant, status, code) in cases {
        let (_s, got, out) = raw_connect(p.addr, target, *tenant).await;
        assert_eq!(got, *status, "{target} {tenant:?}: {out}");
        let lc = out.to_ascii_lowercase();
        assert!(lc.contains(&format!("x-sidekey-error: {code}")), "{out}");
        assert!(out.contains(&format!("\"code\":\"{code}\"")), "{out}");
        for secret in [MIRADORE_KEY, M3TER_SECRET, MAILKIT_MD5] {
            assert!(!out.contains(secret));
        }
    }
    assert_eq!(mock.connections(), 0, "a refused CONNECT dialled out");
}

#[tokio::test]
async fn without_interception_connect_says_how_to_proceed() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |c| c.intercept = None).await;
    let (_s, status, out) = raw_connect(p.addr, "api.m3ter.com:443", Some("acme")).await;
    assert_eq!(status, 405, "{out}");
    assert!(out.starts_with("HTTP/1.1 405 CONNECT Not Enabled"), "{out}");
    assert!(out.contains("connect_unsupported"), "{out}");
    assert!(out.contains("http:// URL"), "{out}");
    assert!(out.contains("--intercept-ca-cert"), "{out}");
    assert_eq!(mock.connections(), 0);
}

/// `CONNECT` sent as an HTTP/2 stream (h2c prior knowledge to the proxy port) is refused with
/// 405 `connect_unsupported` saying HTTP/1.1 is required: no tunnel, nothing dialled.
#[tokio::test]
async fn connect_over_http2_is_refused_with_a_clear_error() {
    use base64::Engine as _;
    use http_body_util::BodyExt as _;
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("acme:x")
    );
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("api.m3ter.com:443")
        .header("proxy-authorization", auth)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["x-sidekey-error"], "connect_unsupported");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "connect_unsupported");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP/2"), "{message}");
    assert!(message.contains("HTTP/1.1 CONNECT"), "{message}");
    assert_eq!(mock.connections(), 0);
    // The connection still serves plain requests.
    let plain = http::Request::builder()
        .uri("http://online.miradore.com/api/v2/Device")
        .header("x-sidekey-tenant", "acme")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(plain))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------------------------------
// Certificates

#[tokio::test]
async fn the_leaf_is_served_only_for_the_connect_host() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    // SNI naming another vendor host (one the tenant may reach, even) fails the handshake,
    // even for a client that would accept any certificate: none is served.
    let mut trusting = tls_client_config(local.der(), b"http/1.1");
    trusting
        .dangerous()
        .set_certificate_verifier(Arc::new(AcceptAnything::default()));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(trusting));
    for sni in ["api.mailkit.eu", "ingest.m3ter.com", "evil.example"] {
        let (s, status, _) = raw_connect(p.addr, "api.m3ter.com:443", Some("acme")).await;
        assert_eq!(status, 200);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            connector.connect(ServerName::try_from(sni).unwrap(), s),
        )
        .await
        .unwrap();
        assert!(r.is_err(), "{sni}: a leaf was served for another name");
    }
    // No SNI at all: no leaf either.
    let mut no_sni = tls_client_config(local.der(), b"http/1.1");
    no_sni
        .dangerous()
        .set_certificate_verifier(Arc::new(AcceptAnything::default()));
    no_sni.enable_sni = false;
    let (s, _, _) = raw_connect(p.addr, "api.m3ter.com:443", Some("acme")).await;
    let r = tokio_rustls::TlsConnector::from(Arc::new(no_sni))
        .connect(ServerName::try_from("api.m3ter.com").unwrap(), s)
        .await;
    assert!(r.is_err(), "a leaf was served without SNI");
    // The CONNECT host itself, in any case, is served (to a verifying client).
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(local.der(), b"http/1.1")));
    let (s, _, _) = raw_connect(p.addr, "API.M3TER.com:443", Some("acme")).await;
    let tls = connector
        .connect(ServerName::try_from("api.m3ter.com").unwrap(), s)
        .await
        .unwrap();
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let names: Vec<String> = x509
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["DNSName(api.m3ter.com)"]);
    let validity = x509.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!(lifetime <= 25 * 3600, "leaf valid for {lifetime} s");
    assert_eq!(mock.connections(), 0);
}

/// A client certificate verifier that accepts any server certificate, so that a failed
/// handshake can only be the server's refusal.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl Default for AcceptAnything {
    fn default() -> Self {
        Self(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn the_ca_is_name_constrained_to_the_vendor_domains() {
    let local = LocalCa::new();
    let der = local.der();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let nc = x509.name_constraints().unwrap().expect("name constraints");
    assert!(nc.critical, "name constraints must be critical");
    let permitted: Vec<String> = nc
        .value
        .permitted_subtrees
        .as_ref()
        .unwrap()
        .iter()
        .map(|s| s.base.to_string())
        .collect();
    assert_eq!(
        permitted,
        [
            "DNSName(online.miradore.com)",
            "DNSName(m3ter.com)",
            "DNSName(api.mailkit.eu)"
        ]
    );

    // A leaf minted with the CA's key for a domain outside them fails webpki verification;
    // one inside passes.
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&local.key).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&der, key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    use rustls::client::danger::ServerCertVerifier as _;
    for (name, ok) in [
        ("evil.example", false),
        ("m3ter.com.evil.example", false),
        ("www.google.com", false),
        ("api.m3ter.com", true),
        ("acme1.online.miradore.com", true),
    ] {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let verdict = verifier.verify_server_cert(
            leaf.der(),
            &[],
            &ServerName::try_from(name).unwrap(),
            &[],
            UnixTime::now(),
        );
        assert_eq!(verdict.is_ok(), ok, "{name}: {verdict:?}");
    }
}

/// A CA whose name constraints omit a vendor domain (one made before that vendor host was
/// added): `CONNECT` to such a host is refused with 500 `intercept_failed` saying why and
/// how to fix it, rather than served a leaf the client rejects with an opaque TLS error;
/// hosts the CA covers still work.
#[tokio::test]
async fn connect_to_a_host_outside_the_cas_name_constraints_is_refused() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::permitting(&["online.miradore.com", "api.mailkit.eu"]);
    let p = start(&ca, &mock, &local, |_| {}).await;
    let key_text = std::fs::read_to_string(&local.key).unwrap();
    for target in ["api.m3ter.com:443", "ingest.m3ter.com:443"] {
        let (_s, status, out) = raw_connect(p.addr, target, Some("acme")).await;
        assert_eq!(status, 500, "{out}");
        let lc = out.to_ascii_lowercase();
        assert!(lc.contains("x-sidekey-error: intercept_failed"), "{out}");
        assert!(lc.contains("content-type: application/json"), "{out}");
        let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "intercept_failed", "{body}");
        let message = v["error"]["message"].as_str().unwrap();
        let host = target.trim_end_matches(":443");
        assert!(message.contains(host), "{message}");
        assert!(message.contains("name constraints"), "{message}");
        assert!(message.contains("sidekey ca init"), "{message}");
        for secret in [MIRADORE_KEY, M3TER_SECRET, MAILKIT_MD5] {
            assert!(!out.contains(secret), "{out}");
        }
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!out.contains(line), "CA key material in {out}");
        }
    }
    assert_eq!(mock.connections(), 0, "a refused CONNECT dialled out");
    let c = https_client(&p, &local, "acme", b"h2");
    let r = c
        .get("https://online.miradore.com/api/v2/Device")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// At start-up, a CA whose name constraints omit a vendor domain is named in one warning
/// per domain, with the fix; covered domains are not.
#[tokio::test]
async fn start_up_warns_of_vendor_domains_outside_the_cas_name_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCa::permitting(&["online.miradore.com", "api.mailkit.eu"]);
    let mut config = sidekey::config::ServeConfig::ephemeral(dir.path().join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "0000000000000000000000000000000000000000000000000000000000000000",
    ));
    config.intercept_ca = Some(sidekey::config::InterceptCaFiles {
        cert: local.cert.clone(),
        key: local.key.clone(),
        allow_unconstrained: false,
    });
    let buf = LogBuffer::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("sidekey=warn"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let running = {
        let _guard = tracing::subscriber::set_default(subscriber);
        sidekey::server::start(config).await.unwrap()
    };
    running.shutdown().await;
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("name constraints do not permit"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(warnings[0].contains("m3ter.com"), "{log}");
    assert!(warnings[0].contains("sidekey ca init"), "{log}");
    let key_text = std::fs::read_to_string(&local.key).unwrap();
    for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(line), "CA key material in the log");
    }
}

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

#[test]
fn ca_init_writes_a_private_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
            .args(["ca", "init", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert!(stdout.contains("--intercept-ca-cert"), "{stdout}");
    let key_text = std::fs::read_to_string(out.join("ca.key")).unwrap();
    assert!(!stdout.contains(key_text.lines().nth(1).unwrap()));
    let mode = std::fs::metadata(out.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem_before = std::fs::read(out.join("ca.pem")).unwrap();
    let second = run();
    assert!(!second.status.success());
    let stderr = String::from_utf8(second.stderr).unwrap();
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), pem_before);
    assert_eq!(
        std::fs::read_to_string(out.join("ca.key")).unwrap(),
        key_text
    );
}

/// An unconstrained CA, as `openssl req -x509` or a test CA would make it.
fn unconstrained_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("open.pem"), dir.join("open.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A CA whose name constraints permit an IP range only: nothing limits its DNS names.
fn ip_constrained_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4(
            [10, 0, 0, 0],
            [255, 0, 0, 0],
        ))],
        excluded_subtrees: Vec::new(),
    });
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("ip.pem"), dir.join("ip.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn bad_ca_files_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalCa::new();
    let b = LocalCa::new();
    let key_text = std::fs::read_to_string(&a.key).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem").unwrap();
    let missing = dir.path().join("missing.pem");
    let (open_cert, open_key) = unconstrained_ca(dir.path());
    let (ip_only_cert, ip_only_key) = ip_constrained_ca(dir.path());
    let leaf_only = dir.path().join("leaf.pem");
    {
        let key = rcgen::KeyPair::from_pem(&key_text).unwrap();
        let params = rcgen::CertificateParams::new(vec!["api.m3ter.com".to_owned()]).unwrap();
        std::fs::write(&leaf_only, params.self_signed(&key).unwrap().pem()).unwrap();
    }
    let cases: Vec<(&Path, &Path, &str)> = vec![
        (&missing, &a.key, "cannot read --intercept-ca-cert"),
        (&a.cert, &missing, "cannot read --intercept-ca-key"),
        (&garbage, &a.key, "not a PEM certificate"),
        (&a.cert, &garbage, "not a PEM PKCS#8 private key"),
        (&a.cert, &b.key, "does not belong to the certificate"),
        (&leaf_only, &a.key, "not a CA certificate"),
        (&open_cert, &open_key, "no X.509 name constraints"),
        // Constraints on IP addresses only leave every DNS name open.
        (&ip_only_cert, &ip_only_key, "no X.509 name constraints"),
    ];
    for (cert, key, want) in cases {
        let err: CaError = InterceptCa::load(cert, key, false).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!msg.contains(line), "key material in {msg:?}");
        }
    }
    // The explicit flag accepts the unconstrained CA, and only that.
    let ca = InterceptCa::load(&open_cert, &open_key, true).unwrap();
    assert!(!ca.is_constrained());
    assert!(InterceptCa::load(&a.cert, &b.key, true).is_err());
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}

#[tokio::test]
async fn start_up_refuses_a_mismatched_ca() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalCa::new();
    let b = LocalCa::new();
    let mut config = sidekey::config::ServeConfig::ephemeral(dir.path().join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "0000000000000000000000000000000000000000000000000000000000000000",
    ));
    config.intercept_ca = Some(sidekey::config::InterceptCaFiles {
        cert: a.cert.clone(),
        key: b.key.clone(),
        allow_unconstrained: false,
    });
    let err = match sidekey::server::start(config).await {
        Ok(_) => panic!("started with a mismatched CA"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("HTTPS interception"), "{err}");
    assert!(err.contains("does not belong"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Connection cap

#[tokio::test]
async fn a_tunnel_holds_its_connections_slot_until_it_closes() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |c| c.max_connections = 4).await;
    let (s, status, _) = raw_connect(p.addr, "api.mailkit.eu:443", Some("acme")).await;
    assert_eq!(status, 200);
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(local.der(), b"http/1.1")));
    let mut tls = connector
        .connect(ServerName::try_from("api.mailkit.eu").unwrap(), s)
        .await
        .unwrap();
    // A request through the tunnel: by its answer the CONNECT's own HTTP connection is over.
    tls.write_all(b"POST /json.fcgi HTTP/1.1\r\nHost: api.mailkit.eu\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // One slot for the tunnel, one the accept loop holds while it waits for the next
    // connection.
    assert_eq!(p.slots.in_use(), 2, "the tunnel does not hold a slot");
    drop(tls);
    wait_for_slots(&p.slots, 1).await;
}

/// Polls until `n` slots are in use; panics after 10 s.
async fn wait_for_slots(slots: &ConnectionSlots, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while slots.in_use() != n {
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_tunnel_without_a_tls_handshake_is_closed_at_the_deadline() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |c| {
        c.header_read_timeout = Duration::from_millis(300)
    })
    .await;
    let (mut s, status, _) = raw_connect(p.addr, "api.mailkit.eu:443", Some("acme")).await;
    assert_eq!(status, 200);
    // Send nothing: the tunnel must close by itself, well within the bound below.
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    wait_for_slots(&p.slots, 1).await;
}

/// A stopping listener drops a tunnel still in its TLS handshake at once, as it drops a plain
/// connection still in protocol detection, and closes tunnels with no request in flight: the
/// shutdown does not wait for the handshake deadline (here an hour).
#[tokio::test]
async fn shutdown_closes_tunnels_in_their_handshake_and_idle_ones_at_once() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |c| {
        c.header_read_timeout = Duration::from_secs(3600)
    })
    .await;
    // A tunnel whose client never starts its handshake, and one that stops half-way
    // through its ClientHello.
    let (silent, status, _) = raw_connect(p.addr, "api.mailkit.eu:443", Some("acme")).await;
    assert_eq!(status, 200);
    let (mut partial, status, _) = raw_connect(p.addr, "api.m3ter.com:443", Some("acme")).await;
    assert_eq!(status, 200);
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    // Tunnels whose handshake is done, idle after one request: HTTP/1.1 and h2.
    let mut idle = Vec::new();
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let c = https_client(&p, &local, "acme", alpn);
        let r = c
            .get("https://online.miradore.com/api/v2/Device")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        idle.push(c);
    }
    // Each tunnel holds a slot, plus the one the accept loop holds while it waits.
    wait_for_slots(&p.slots, 5).await;
    assert!(
        p.shutdown_within(Duration::from_secs(10)).await,
        "shutdown waited for tunnels with nothing in flight"
    );
    for mut s in [silent, partial] {
        let mut b = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
}

/// The `CONNECT` answer (200 and refusals) and every answer inside the tunnel (forwarded or
/// refused) carry their own `x-sidekey-request-id`.
#[tokio::test]
async fn tunnel_answers_carry_request_ids() {
    let ca = TestCa::new("vendor CA");
    let mock = MockVendor::builder(&ca).start().await;
    let local = LocalCa::new();
    let p = start(&ca, &mock, &local, |_| {}).await;
    let id_in = |head: &str| {
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-sidekey-request-id: ")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no request id in {head}"))
    };
    let (_s, status, opened) = raw_connect(p.addr, "api.mailkit.eu:443", Some("acme")).await;
    assert_eq!(status, 200, "{opened}");
    let (_s, status, refused) = raw_connect(p.addr, "evil.example:443", Some("acme")).await;
    assert_eq!(status, 403, "{refused}");
    let mut ids = vec![id_in(&opened), id_in(&refused)];
    let c = https_client(&p, &local, "acme", b"h2");
    for (url, status) in [
        ("https://online.miradore.com/api/v2/Device", 200),
        ("https://online.miradore.com/Other/API/Device", 403),
    ] {
        let r = c.get(url).send().await.unwrap();
        assert_eq!(r.status(), status);
        ids.push(
            r.headers()["x-sidekey-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    assert!(ids.iter().all(|id| id.len() == 32), "{ids:?}");
}
