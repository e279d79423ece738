//! A mock vendor upstream for `bench/run.sh` and `.ci/docs-examples`: HTTPS (rustls with ring) on `127.0.0.1:PORT`,
//! HTTP/1.1 with keep-alive, a certificate for every vendor host from a throwaway CA it
//! generates at start and writes to `--ca-dir` (so sidekey, nginx and curl can verify it).
//!
//! It answers every request at once with a fixed JSON body (Mailkit's `/rpc.fcgi` with an
//! XML-RPC one), `POST /oauth/token` with an m3ter token, and checks the credential each
//! proxy should have injected, answering 401 when it is missing or wrong: a broken injection
//! then shows up as non-2xx in the benchmark (or a failed docs example) instead of as a fast
//! run. It is a test tool, not part of sidekey: built with
//! `cargo build --release --example mock_vendor`, never installed.
//!
//! ```text
//! mock_vendor --port 0 --ca-dir /tmp/x --miradore-key K --mailkit-md5 M [--body-bytes N]
//! ```
//! On start it writes `ca.pem` and then `port` (the bound port; written last, so its
//! presence means "ready") into `--ca-dir`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// Names the server certificate carries: every vendor host sidekey dials in the benchmark,
/// plus loopback for clients that talk to the mock directly.
const CERT_NAMES: &[&str] = &[
    "online.miradore.com",
    "api.m3ter.com",
    "ingest.m3ter.com",
    "api.mailkit.eu",
    "localhost",
    "127.0.0.1",
];

/// The token `POST /oauth/token` hands out; m3ter requests must carry it.
const M3TER_TOKEN: &str = "bench-token";
const TOKEN_BODY: &str =
    r#"{"token_type":"Bearer","access_token":"bench-token","expires_in":18000}"#;
const XMLRPC_BODY: &str = r#"<?xml version="1.0"?><methodResponse><params><param><value><string>ok</string></value></param></params></methodResponse>"#;
const SMALL_BODY: &str = r#"{"data":[{"id":1,"name":"bench-device","online":true}]}"#;

#[derive(Parser, Debug)]
#[command(about = "Mock vendor upstream (HTTPS, HTTP/1.1) for bench/run.sh")]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port; the bound one is written to CA_DIR/port).
    #[arg(long, default_value_t = 0)]
    port: u16,

    /// Directory for ca.pem (the CA to trust) and port; created if absent.
    #[arg(long)]
    ca_dir: PathBuf,

    /// Response body size in bytes; 0 = a small JSON document (55 bytes).
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,

    /// Body size for requests whose query contains `size=large` (a large-body case over the
    /// same connections, without a second mock).
    #[arg(long, default_value_t = 64 * 1024)]
    large_body_bytes: usize,

    /// If given, requests for online.miradore.com must carry `X-API-Key: <this>`.
    #[arg(long)]
    miradore_key: Option<String>,

    /// If given, Mailkit requests (api.mailkit.eu) must have this MD5 in their body.
    #[arg(long)]
    mailkit_md5: Option<String>,

    /// Tokio worker threads; 1 = a current-thread runtime (the cheapest on a shared core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct State {
    body: Bytes,
    large_body: Bytes,
    token_body: Bytes,
    miradore_key: Option<String>,
    mailkit_md5: Option<String>,
}

/// A JSON document of exactly `n` bytes (at least the fixed part).
fn json_of_size(n: usize) -> Bytes {
    if n == 0 {
        return Bytes::from_static(SMALL_BODY.as_bytes());
    }
    let head = r#"{"pad":""#;
    let tail = r#""}"#;
    let pad = n.saturating_sub(head.len() + tail.len());
    let mut v = Vec::with_capacity(head.len() + pad + tail.len());
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(tail.as_bytes());
    Bytes::from(v)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn generate_tls(ca_dir: &Path) -> Result<rustls::ServerConfig, BoxError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sidekey bench mock CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::create_dir_all(ca_dir)
        .map_err(|e| format!("cannot create {}: {e}", ca_dir.display()))?;
    let ca_path = ca_dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem())
        .map_err(|e| format!("cannot write {}: {e}", ca_path.display()))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let params =
        CertificateParams::new(CERT_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    // HTTP/1.1 only: nginx speaks HTTP/1.1 upstream, so sidekey must too for a like-for-like
    // comparison (sidekey's client would pick h2 if offered).
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn unauthorized(what: &'static str) -> Response<Full<Bytes>> {
    respond(
        StatusCode::UNAUTHORIZED,
        Bytes::from(format!(r#"{{"error":"{what}"}}"#)),
    )
}

async fn answer(st: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Read the whole body (keep-alive needs it drained; Mailkit's is checked).
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return respond(StatusCode::BAD_REQUEST, Bytes::new()),
    };
    let host = parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let host = host.split(':').next().unwrap_or(host);

    if parts.method == hyper::Method::POST && parts.uri.path() == "/oauth/token" {
        return respond(StatusCode::OK, st.token_body.clone());
    }
    match host {
        "online.miradore.com" => {
            if let Some(key) = &st.miradore_key {
                let got = parts.headers.get("x-api-key").map(|v| v.as_bytes());
                if got != Some(key.as_bytes()) {
                    return unauthorized("missing or wrong X-API-Key");
                }
            }
        }
        "api.m3ter.com" | "ingest.m3ter.com" => {
            let got = parts
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if got != Some(M3TER_TOKEN) {
                return unauthorized("missing or wrong bearer token");
            }
        }
        "api.mailkit.eu" => {
            if let Some(md5) = &st.mailkit_md5 {
                let needle = md5.as_bytes();
                if !body.windows(needle.len()).any(|w| w == needle) {
                    return unauthorized("client MD5 not in the body");
                }
            }
        }
        _ => {}
    }
    // XML-RPC clients (Python's xmlrpc.client) read only an XML-RPC answer.
    if host == "api.mailkit.eu" && parts.uri.path() == "/rpc.fcgi" {
        let mut r = respond(StatusCode::OK, Bytes::from_static(XMLRPC_BODY.as_bytes()));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/xml"),
        );
        return r;
    }
    let large = parts.uri.query().is_some_and(|q| q.contains("size=large"));
    let out = if large { &st.large_body } else { &st.body };
    respond(StatusCode::OK, out.clone())
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, st: Arc<State>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(e) => {
                eprintln!("mock_vendor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let st = st.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(answer(st, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let tls = generate_tls(&args.ca_dir)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let state = Arc::new(State {
        body: json_of_size(args.body_bytes),
        large_body: json_of_size(args.large_body_bytes),
        token_body: Bytes::from_static(TOKEN_BODY.as_bytes()),
        miradore_key: args.miradore_key,
        mailkit_md5: args.mailkit_md5,
    });
    // Written after ca.pem and after binding: its presence tells the harness we are ready.
    let port_path = args.ca_dir.join("port");
    let tmp = args.ca_dir.join("port.tmp");
    std::fs::write(&tmp, bound.port().to_string())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &port_path)
        .map_err(|e| format!("cannot write {}: {e}", port_path.display()))?;
    println!("mock_vendor listening on https://{bound}");
    tokio::select! {
        _ = serve(listener, acceptor, state) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mock_vendor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock_vendor: {e}");
            ExitCode::FAILURE
        }
    }
}
