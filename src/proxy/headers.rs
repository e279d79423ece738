//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so they are removed in
//! both directions and never forwarded.

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

/// The fixed hop-by-hop set; `Connection` first (see [`strip_hop_by_hop`]).
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

/// Removes `Connection`, every header it names, the fixed hop-by-hop set and the names in
/// `also` (at most 23).
///
/// A message usually carries few of these, so the map is walked once and only the names
/// present are removed: each `HeaderMap::remove` hashes and probes, and removing the whole
/// set blindly was a measurable share of a proxied request's CPU.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    debug_assert!(HOP_BY_HOP.len() + also.len() <= 32);
    let mut present = 0u32;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().chain(also).position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().chain(also).enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_fixed_and_named() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Foo"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-keep", "yes"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn removes_also_and_every_value_of_a_repeated_header() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "localhost"),
            ("x-sidekey-tenant", "acme"),
            ("te", "trailers"),
            ("te", "gzip"),
            ("accept", "*/*"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let tenant = HeaderName::from_static("x-sidekey-tenant");
        strip_hop_by_hop(&mut h, &[http::header::HOST, tenant]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn leaves_other_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(http::header::ACCEPT, "*/*".parse().unwrap());
        h.insert(
            HeaderName::from_static("x-connection"),
            "1".parse().unwrap(),
        );
        let before = h.clone();
        strip_hop_by_hop(&mut h, &[http::header::HOST]);
        assert_eq!(h, before);
    }
}
