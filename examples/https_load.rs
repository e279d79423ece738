//! HTTPS load client for `bench/run.sh` (wrk cannot `CONNECT`): keeps `--connections` TLS
//! connections busy with HTTP/1.1 GETs for `--duration` seconds and prints one line in the
//! format of bench/wrk.lua's `done()` (`BENCH requests=... p50=... ...`, microseconds).
//!
//! With `--connect HOST`, each connection first sends `CONNECT HOST:443` (with
//! `Proxy-Authorization` for `--tenant`) to `--addr`, then speaks TLS to HOST inside the
//! tunnel: an unmodified `https://` client through sidekey's interception. Without it, TLS
//! goes to `--addr` directly with SNI `--sni` (nginx terminating TLS). The server certificate
//! is verified against `--ca` only. A benchmark tool, never installed.
//!
//! ```text
//! https_load --addr 127.0.0.1:8080 --connect online.miradore.com --tenant acme \
//!     --ca ca.pem --path /api/v2/Device --connections 64 --duration 10
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "HTTPS load client (CONNECT or direct TLS) for bench/run.sh")]
struct Args {
    /// Where to connect: sidekey's proxy port, or nginx's TLS port.
    #[arg(long)]
    addr: SocketAddr,
    /// Tunnel to this host (port 443) with CONNECT first.
    #[arg(long)]
    connect: Option<String>,
    /// Tenant named in the CONNECT's Proxy-Authorization.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// TLS server name when not tunnelling (default: the --connect host).
    #[arg(long)]
    sni: Option<String>,
    /// PEM CA certificate, the only root trusted.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    path: String,
    /// Extra request header, NAME:VALUE (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    bytes: u64,
    connect_errors: u64,
    read_errors: u64,
    non_2xx: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args = Arc::new(Args::parse());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&args.ca)?)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        tasks.spawn(connection(args.clone(), connector.clone(), end));
    }
    let mut all = Tally::default();
    while let Some(t) = tasks.join_next().await {
        let t = t?;
        all.latencies_us.extend(t.latencies_us);
        all.bytes += t.bytes;
        all.connect_errors += t.connect_errors;
        all.read_errors += t.read_errors;
        all.non_2xx += t.non_2xx;
    }
    let elapsed = start.elapsed();
    let mut l = all.latencies_us;
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (l.len() - 1) as f64).round() as usize;
        f64::from(l[i.min(l.len() - 1)])
    };
    let mean = if l.is_empty() {
        0.0
    } else {
        l.iter().map(|&x| f64::from(x)).sum::<f64>() / l.len() as f64
    };
    println!(
        "BENCH requests={} duration_us={} bytes={} connect={} read={} write=0 status={} \
         timeout=0 p50={:.0} p75={:.0} p90={:.0} p99={:.0} p999={:.0} max={:.0} mean={:.1}",
        l.len(),
        elapsed.as_micros(),
        all.bytes,
        all.connect_errors,
        all.read_errors,
        all.non_2xx,
        pct(50.0),
        pct(75.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        l.last().copied().map_or(0.0, f64::from),
        mean
    );
    Ok(())
}

/// One connection: open (CONNECT, TLS), then requests back to back until `end`.
async fn connection(args: Arc<Args>, connector: tokio_rustls::TlsConnector, end: Instant) -> Tally {
    let mut t = Tally::default();
    let mut sender = match open(&args, &connector).await {
        Ok(s) => s,
        Err(_) => {
            t.connect_errors += 1;
            return t;
        }
    };
    let host = args
        .connect
        .clone()
        .or_else(|| args.sni.clone())
        .unwrap_or_default();
    while Instant::now() < end {
        let mut req = http::Request::get(args.path.as_str()).header("host", host.as_str());
        for h in &args.headers {
            if let Some((k, v)) = h.split_once(':') {
                req = req.header(k.trim(), v.trim());
            }
        }
        let Ok(req) = req.body(Empty::<bytes::Bytes>::new()) else {
            t.read_errors += 1;
            return t;
        };
        let sent = Instant::now();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                t.read_errors += 1;
                return t;
            }
        };
        let ok = resp.status().is_success();
        match resp.into_body().collect().await {
            Ok(b) => t.bytes += b.to_bytes().len() as u64,
            Err(_) => {
                t.read_errors += 1;
                return t;
            }
        }
        t.latencies_us
            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        if !ok {
            t.non_2xx += 1;
        }
    }
    t
}

async fn open(
    args: &Args,
    connector: &tokio_rustls::TlsConnector,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>, BoxError> {
    let mut tcp = TcpStream::connect(args.addr).await?;
    tcp.set_nodelay(true)?;
    let name = match &args.connect {
        Some(host) => {
            let auth =
                base64::engine::general_purpose::STANDARD.encode(format!("{}:x", args.tenant));
            let req = format!(
                "CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\
                 Proxy-Authorization: Basic {auth}\r\n\r\n"
            );
            tcp.write_all(req.as_bytes()).await?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tcp.read(&mut byte).await? == 0 || head.len() > 8192 {
                    return Err("CONNECT: no answer".into());
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)).into());
            }
            host.clone()
        }
        None => args.sni.clone().ok_or("--sni or --connect is required")?,
    };
    let tls = connector.connect(ServerName::try_from(name)?, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
