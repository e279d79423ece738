//! `CONNECT` to a vendor host, when interception is on (`--intercept-ca-cert`): the target
//! and tenant are checked like an absolute-form request's, nothing is dialled, the app gets
//! `200`, and the tunnel's TLS is terminated with a leaf for exactly that host
//! ([`crate::intercept::Leaves`]). Each request inside is then served by the same
//! [`Proxy::handle`](super::Proxy::handle) as a plain one, in forward-proxy form for the
//! tunnel's host, with the tunnel's tenant.
//!
//! Refusals before the tunnel (the first failing one answers): a `CONNECT` over HTTP/2 → 405
//! `connect_unsupported`; the target is not `host:443` (other port, no port) → 403
//! `host_not_allowed`; no tenant → 407 `tenant_required`; unknown tenant → 403
//! `unknown_tenant`; then steps 5 to 7 of the routing order ([`super::route`]) for that host
//! (so an IP literal, which is no vendor's host, → 403 `host_not_allowed`); last, a host the
//! CA's name constraints do not permit → 500 `intercept_failed`.
//!
//! A tunnel still in its TLS handshake when the listener stops is dropped at once, like a
//! plain connection still in protocol detection.

use std::sync::Arc;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::Proxy;
use super::error::ProxyError;
use super::listener::{ConnectionHold, serve_http};

/// The only port a tunnel may name: vendors are dialled on 443.
const TUNNEL_PORT: u16 = 443;

/// What a request that arrived inside a tunnel carries: the host and tenant the `CONNECT`
/// named. Made once per tunnel; cloned per request without allocating.
#[derive(Clone, Debug)]
pub(crate) struct TunnelOrigin {
    pub host: Arc<str>,
    pub tenant: Arc<str>,
    /// `host` as the requests' URI authority.
    authority: Authority,
}

impl TunnelOrigin {
    /// `host` must be a host a `CONNECT` was accepted for ([`connect_host`]).
    pub(crate) fn new(host: &str, tenant: Arc<str>) -> Result<Self, ProxyError> {
        let authority = Authority::try_from(host)
            .map_err(|_| ProxyError::bad_request("the CONNECT host is not a valid host"))?;
        Ok(Self {
            host: host.into(),
            tenant,
            authority,
        })
    }
}

/// The host of a `CONNECT` target, which must be `dns-name:443`.
pub(crate) fn connect_host(uri: &Uri) -> Result<&str, ProxyError> {
    let Some(authority) = uri.authority() else {
        return Err(ProxyError::bad_request("CONNECT needs a host:port target"));
    };
    let host = authority.host();
    let refused = || ProxyError::HostNotAllowed(authority.as_str().to_owned());
    if authority.as_str().contains('@') {
        return Err(ProxyError::bad_request(
            "a CONNECT target with userinfo (user@host) is refused",
        ));
    }
    if authority.port_u16() != Some(TUNNEL_PORT) {
        return Err(refused());
    }
    // An IP literal is no vendor's host: the registry refuses it with the rest.
    Ok(host)
}

/// Rewrites a request that arrived inside the tunnel to `origin` into the forward-proxy form
/// for its host (`https://host/path`), refusing one that names another host.
pub(crate) fn into_forward_form<B>(
    req: &mut Request<B>,
    origin: &TunnelOrigin,
) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::bad_request(
            "CONNECT inside a tunnel is refused",
        ));
    }
    let named = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => match req.headers().get(HOST) {
            Some(h) => Some(
                h.to_str()
                    .map_err(|_| ProxyError::bad_request("the Host header is not valid text"))?,
            ),
            None => None,
        },
    };
    if let Some(named) = named
        && !names_host(named, &origin.host)
    {
        return Err(ProxyError::bad_request(format!(
            "this tunnel is to {}; the request names {named}",
            origin.host
        )));
    }
    // The request's own path, moved (not copied) into the absolute form.
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTPS);
    parts.authority = Some(origin.authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| ProxyError::bad_request("the request path is not a valid URI"))?;
    Ok(())
}

/// Whether `named` (a URI authority or `Host`) is the tunnel's `host`, alone or with port
/// 443, compared as text: a vendor host is a DNS name, so anything else (another port,
/// userinfo, another name, a port that is not plain digits) is not it.
fn names_host(named: &str, host: &str) -> bool {
    let (name, port) = match named.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (named, None),
    };
    // Digits only: `u16`'s parser would also take `+443`.
    let is_tunnel_port =
        |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse() == Ok(TUNNEL_PORT);
    name.eq_ignore_ascii_case(host) && port.is_none_or(is_tunnel_port)
}

/// Once the app has the `200`: terminates TLS on the tunnel (within the header read timeout,
/// and only until the listener stops) and serves the requests inside like any app connection,
/// holding the slot of the connection it rides on.
pub(crate) async fn serve(
    upgrade: OnUpgrade,
    tls: Arc<ServerConfig>,
    proxy: Proxy,
    hold: ConnectionHold,
    origin: TunnelOrigin,
) {
    let deadline = proxy.config().header_read_timeout;
    let peer = hold.peer;
    let handshake = async {
        let upgraded = upgrade.await.map_err(|e| e.to_string())?;
        TlsAcceptor::from(tls)
            .accept(TokioIo::new(upgraded))
            .await
            .map_err(|e| e.to_string())
    };
    // Like a plain connection still in protocol detection, a tunnel that has not finished
    // its handshake has no request in flight: it is dropped at once when the listener stops,
    // rather than holding the shutdown until its deadline.
    let mut stopping = hold.stopping();
    let stream = tokio::select! {
        done = tokio::time::timeout(deadline, handshake) => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, host = %origin.host, %error, "tunnel closed before its TLS handshake completed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, host = %origin.host, "tunnel TLS handshake timed out");
                return;
            }
        },
        _ = stopping.wait_for(|s| *s) => {
            tracing::debug!(%peer, host = %origin.host, "tunnel closed in its TLS handshake: the listener is stopping");
            return;
        }
    };
    let is_http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    serve_http(stream, is_http2, proxy, hold, Some(origin)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(target: &str) -> Result<String, &'static str> {
        let uri: Uri = target.parse().unwrap();
        connect_host(&uri).map(str::to_owned).map_err(|e| e.code())
    }

    #[test]
    fn a_tunnel_target_is_a_dns_name_on_port_443() {
        assert_eq!(connect("api.m3ter.com:443"), Ok("api.m3ter.com".to_owned()));
        for refused in ["api.m3ter.com:80", "api.m3ter.com:8443", "127.0.0.1:80"] {
            assert_eq!(connect(refused), Err("host_not_allowed"), "{refused}");
        }
        assert_eq!(connect("u@api.m3ter.com:443"), Err("bad_request"));
    }

    fn inside(uri: &str, host: Option<&str>) -> Result<String, &'static str> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        let mut req = b.body(()).unwrap();
        let origin = TunnelOrigin::new("api.m3ter.com", "acme".into()).unwrap();
        into_forward_form(&mut req, &origin)
            .map(|()| req.uri().to_string())
            .map_err(|e| e.code())
    }

    #[test]
    fn requests_inside_must_name_the_tunnels_host() {
        let want = Ok("https://api.m3ter.com/x?y=1".to_owned());
        assert_eq!(inside("/x?y=1", None), want);
        assert_eq!(inside("/x?y=1", Some("API.m3ter.com")), want);
        assert_eq!(inside("/x?y=1", Some("api.m3ter.com:443")), want);
        assert_eq!(inside("https://api.m3ter.com/x?y=1", None), want);
        for (uri, host) in [
            ("/x", Some("ingest.m3ter.com")),
            ("/x", Some("api.m3ter.com:8443")),
            ("/x", Some("u@api.m3ter.com")),
            ("/x", Some("api.m3ter.com:")),
            ("/x", Some("api.m3ter.com:+443")),
            ("/x", Some("api.m3ter.com: 443")),
            ("/x", Some("api.m3ter.com:443:443")),
            ("/x", Some("api.m3ter.com.")),
            ("/x", Some(":443")),
            ("https://evil.example/x", None),
        ] {
            assert_eq!(inside(uri, host), Err("bad_request"), "{uri} {host:?}");
        }
    }
}
