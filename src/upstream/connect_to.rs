//! `--connect-to HOST:PORT:ADDR:PORT`: dial another address for an upstream, keeping its name.
//!
//! Same meaning as curl's option: when the upstream is HOST:PORT, open the TCP connection to
//! ADDR:PORT instead. Only the dialed address changes: SNI, the certificate name check and the
//! `Host` header still use the original HOST, because the TLS layer above this connector reads
//! the name from the original URI. An empty HOST or PORT matches any; an empty ADDR or second
//! PORT keeps the original one. HOST may be `*.suffix` (matches any name ending in `.suffix`,
//! not `suffix` itself). IPv6 addresses go in brackets: `[::1]`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

/// One parsed `--connect-to` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectTo {
    host: HostPattern,
    port: Option<u16>,
    addr: Option<String>,
    to_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// Lower-cased exact name.
    Exact(String),
    /// Lower-cased suffix including its leading dot: `*.example.com` is `.example.com`.
    Suffix(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --connect-to {value:?}: {reason} (expected HOST:PORT:ADDR:PORT)")]
pub struct ConnectToParseError {
    value: String,
    reason: &'static str,
}

impl ConnectTo {
    /// The address to dial for `host:port`, or `None` when this rule does not apply.
    pub fn rewrite(&self, host: &str, port: u16) -> Option<(String, u16)> {
        if self.port.is_some_and(|p| p != port) {
            return None;
        }
        let host_lc = host.to_ascii_lowercase();
        let matches = match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => *h == host_lc,
            HostPattern::Suffix(s) => host_lc.len() > s.len() && host_lc.ends_with(s.as_str()),
        };
        if !matches {
            return None;
        }
        let addr = self.addr.clone().unwrap_or_else(|| host.to_owned());
        Some((addr, self.to_port.unwrap_or(port)))
    }
}

impl FromStr for ConnectTo {
    type Err = ConnectToParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| ConnectToParseError {
            value: value.to_owned(),
            reason,
        };
        let parts = split_fields(value).ok_or_else(|| err("unbalanced brackets"))?;
        let [host, port, addr, to_port] = parts.as_slice() else {
            return Err(err("needs exactly four colon-separated fields"));
        };
        let port_of = |s: &str| -> Result<Option<u16>, ConnectToParseError> {
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .map(Some)
                    .ok_or_else(|| err("a port is not a number in 1..=65535"))
            }
        };
        let host = if host.is_empty() {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(err("HOST wildcard must be *.suffix"));
            }
            HostPattern::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        } else if host.contains('*') {
            return Err(err("HOST wildcard must be *.suffix"));
        } else {
            HostPattern::Exact(unbracket(host).to_ascii_lowercase())
        };
        Ok(Self {
            host,
            port: port_of(port)?,
            addr: (!addr.is_empty()).then(|| addr.to_string()),
            to_port: port_of(to_port)?,
        })
    }
}

impl fmt::Display for ConnectTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Any => {}
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Suffix(s) => write!(f, "*{s}")?,
        }
        let port = |p: Option<u16>| p.map(|p| p.to_string()).unwrap_or_default();
        write!(
            f,
            ":{}:{}:{}",
            port(self.port),
            self.addr.as_deref().unwrap_or(""),
            port(self.to_port)
        )
    }
}

/// Splits on `:` outside `[...]`; `None` when brackets do not balance.
fn split_fields(value: &str) -> Option<Vec<&str>> {
    let mut out = Vec::with_capacity(4);
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1)?,
            ':' if depth == 0 => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return None;
    }
    out.push(&value[start..]);
    Some(out)
}

fn unbracket(s: &str) -> &str {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s)
}

/// The TCP connect did not finish within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("TCP connect timed out")]
pub(crate) struct ConnectTimeout;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The inner (TCP) connector under the TLS layer: applies the first matching `--connect-to`
/// rule to the address dialed, bounds the TCP connect with a timeout, and turns TCP
/// keep-alive on.
#[derive(Clone)]
pub(crate) struct RedirectingConnector {
    http: HttpConnector,
    rules: Arc<[ConnectTo]>,
    connect_timeout: Duration,
}

impl RedirectingConnector {
    pub(crate) fn new(
        rules: Vec<ConnectTo>,
        connect_timeout: Duration,
        tcp_keep_alive: Duration,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(tcp_keep_alive));
        // The TLS layer above hands us `https://` URIs; we only dial TCP.
        http.enforce_http(false);
        http.set_nodelay(true);
        Self {
            http,
            rules: rules.into(),
            connect_timeout,
        }
    }

    fn target(&self, dst: Uri) -> Uri {
        let Some(host) = dst.host() else { return dst };
        let port = dst.port_u16().unwrap_or(443);
        let host = unbracket(host);
        for rule in self.rules.iter() {
            if let Some((addr, port)) = rule.rewrite(host, port) {
                let addr = if addr.contains(':') && !addr.starts_with('[') {
                    format!("[{addr}]")
                } else {
                    addr
                };
                // HttpConnector only reads host and port from this URI.
                if let Ok(uri) = format!("http://{addr}:{port}/").parse() {
                    return uri;
                }
            }
        }
        dst
    }
}

impl Service<Uri> for RedirectingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let target = self.target(dst);
        let connecting = self.http.call(target);
        let timeout = self.connect_timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> ConnectTo {
        s.parse().unwrap()
    }

    #[test]
    fn exact_host_rule() {
        let r = rule("api.m3ter.com:443:127.0.0.1:8443");
        assert_eq!(
            r.rewrite("api.m3ter.com", 443),
            Some(("127.0.0.1".into(), 8443))
        );
        assert_eq!(
            r.rewrite("API.M3TER.com", 443),
            Some(("127.0.0.1".into(), 8443))
        );
        assert_eq!(r.rewrite("api.m3ter.com", 80), None);
        assert_eq!(r.rewrite("ingest.m3ter.com", 443), None);
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let r = rule("*.miradore.com:443:127.0.0.1:1");
        assert!(r.rewrite("online.miradore.com", 443).is_some());
        assert!(r.rewrite("acme.online.miradore.com", 443).is_some());
        assert!(r.rewrite("miradore.com", 443).is_none());
        assert!(r.rewrite("evilmiradore.com", 443).is_none());
    }

    #[test]
    fn empty_fields_mean_any_or_keep() {
        let r = rule("::10.0.0.1:");
        assert_eq!(r.rewrite("x.example", 443), Some(("10.0.0.1".into(), 443)));
        let r = rule("api.mailkit.eu:443::8443");
        assert_eq!(
            r.rewrite("api.mailkit.eu", 443),
            Some(("api.mailkit.eu".into(), 8443))
        );
    }

    #[test]
    fn ipv6_in_brackets() {
        let r = rule("api.mailkit.eu:443:[::1]:9000");
        assert_eq!(
            r.rewrite("api.mailkit.eu", 443),
            Some(("[::1]".into(), 9000))
        );
        assert_eq!(r.to_string(), "api.mailkit.eu:443:[::1]:9000");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "a:443:b",
            "a:443:b:1:2",
            "a:x:b:1",
            "a:443:b:70000",
            "a:0:b:1",
            "*:443:b:1",
            "foo.*.com:443:b:1",
            "a:443:[::1:1",
        ] {
            assert!(bad.parse::<ConnectTo>().is_err(), "{bad:?} should fail");
        }
        let e = "a:x:b:1".parse::<ConnectTo>().unwrap_err().to_string();
        assert!(e.contains("a:x:b:1") && e.contains("port"), "{e}");
    }

    #[tokio::test]
    async fn vendor_sockets_have_tcp_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut c = RedirectingConnector::new(
            vec![rule(&format!("api.m3ter.com:443:127.0.0.1:{port}"))],
            Duration::from_secs(5),
            Duration::from_secs(42),
        );
        let io = c
            .call("https://api.m3ter.com/".parse().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(io.inner());
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(42)
        );
    }

    #[test]
    fn connector_rewrites_only_the_dialed_address() {
        let c = RedirectingConnector::new(
            vec![rule("*.m3ter.com:443:127.0.0.1:9999")],
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let t = c.target("https://api.m3ter.com/x".parse().unwrap());
        assert_eq!(t.host(), Some("127.0.0.1"));
        assert_eq!(t.port_u16(), Some(9999));
        let t = c.target("https://api.mailkit.eu/x".parse().unwrap());
        assert_eq!(t.host(), Some("api.mailkit.eu"));
    }
}
