//! `sidekey health`: asks a running sidekey's `/readyz` whether it is ready, for health
//! checks in images with no shell or HTTP client (the distroless image's `HEALTHCHECK`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Deadline on the whole check (connect, request, answer): `/readyz` answers at once, so a
/// sidekey slower than this is not healthy, and the check ends well inside a health-check
/// runner's own timeout (Docker's default is 30 s).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest `/readyz` body read: it is a few lines.
const MAX_BODY_BYTES: usize = 4096;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The admin listener to ask, as `serve --admin-listen` takes it; an unspecified address
    /// (0.0.0.0, [::]) is asked on loopback. Default: the admin listener's default, or
    /// SIDEKEY_ADMIN_LISTEN as `serve` reads it in the same container.
    #[arg(long, value_name = "ADDR", env = "SIDEKEY_ADMIN_LISTEN", default_value = "127.0.0.1:9090", value_parser = crate::listen_addr::parse)]
    pub admin: SocketAddr,
}

/// `Ok` with a one-line report when `/readyz` answers 200, else `Err` with why not.
pub async fn run(args: HealthArgs) -> Result<String, String> {
    let addr = dialable(args.admin);
    match tokio::time::timeout(HEALTH_TIMEOUT, readyz(addr)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "not healthy: {addr} did not answer GET /readyz within {}s",
            HEALTH_TIMEOUT.as_secs()
        )),
    }
}

/// The address to dial for a listen address: a wildcard listener is reached on loopback.
fn dialable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

async fn readyz(addr: SocketAddr) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        format!(
            "not healthy: cannot reach the admin listener at {addr}: {e} (is sidekey serve \
             running, with this --admin-listen?)"
        )
    })?;
    let broken = |e: &dyn std::fmt::Display| format!("not healthy: {addr} /readyz: {e}");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| broken(&e))?;
    tokio::spawn(conn);
    let request = Request::get("/readyz")
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| broken(&e))?;
    let response = sender.send_request(request).await.map_err(|e| broken(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| broken(&e))?
        .to_bytes();
    // The first line says why; the rest (the store's line) is detail.
    let first_line = String::from_utf8_lossy(&body)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if status == StatusCode::OK {
        Ok(format!("ready ({addr})"))
    } else if first_line.is_empty() {
        Err(format!(
            "not healthy: {addr} /readyz answered HTTP {status}"
        ))
    } else {
        Err(format!(
            "not healthy: {addr} /readyz answered HTTP {}: {first_line}",
            status.as_u16()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        let d = |s: &str| dialable(s.parse().unwrap()).to_string();
        assert_eq!(d("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(d("[::]:9090"), "[::1]:9090");
        assert_eq!(d("10.0.0.7:9091"), "10.0.0.7:9091");
    }
}
