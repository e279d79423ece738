//! Which tenant, which vendor, which host: everything decided from the request line and the
//! tenant headers before any rule runs or any connection opens.
//!
//! Order of checks (the first failing one answers):
//! 1. `CONNECT` → 405 `connect_unsupported`.
//! 2. Request form. HTTP/1 absolute-form (`GET http://host/...`) is the forward-proxy form;
//!    anything else is origin-form, whose first segment must be a vendor prefix
//!    ([`Vendor::prefixes`]: `/miradore`, `/m3ter`, `/m3ter-ingest`, `/mailkit`) → else 404
//!    `unknown_route`.
//!    Over HTTP/2 every request carries an authority, so there the forward-proxy form is
//!    recognised by an authority that is a vendor host. An absolute-form URL to a loopback
//!    host (`http://127.0.0.1:8080/m3ter/...`, what a client with `HTTP_PROXY` set sends for
//!    sidekey's own prefix URLs) is read as the prefix form. An authority (absolute-form or
//!    h2 `:authority`) or `Host` header that is not `host[:port]` with a port in 1..=65535
//!    (userinfo, `:`, `:-1`, `:65536`), or a second `Host` → 400 `bad_request`. A path that
//!    is not canonical ([`CanonicalPath`]: no empty, dot or `;` segments, no needless or
//!    separator escapes) → 400 `bad_request`, so a path cannot name one site or organisation
//!    to sidekey and another to the vendor.
//! 3. Tenant named (`x-sidekey-tenant` or `Proxy-Authorization: Basic`) → else 407
//!    `tenant_required`; either header twice, or both present and naming different tenants
//!    → 400 `bad_request`.
//! 4. Tenant exists in the snapshot → else 403 `unknown_tenant`.
//! 5. Absolute-form host is a vendor host ([`Vendor::owns_host`]) → else 403
//!    `host_not_allowed`.
//! 6. The tenant has that vendor → else 403 `vendor_not_configured`.
//! 7. The host is one of the tenant's hosts for that vendor ([`Vendor::upstream_host`]; m3ter:
//!    its environment's api or ingest host) → else 403 `host_not_allowed`; a legacy Miradore
//!    host `<site>.online.miradore.com` naming another site → 403 `site_mismatch`.
//! 8. The vendor rule (site, organisation, body) → its own refusals.

use std::borrow::Cow;

use base64::Engine as _;
use http::header::{HOST, PROXY_AUTHORIZATION};
use http::{HeaderMap, Method, Request, Uri, Version};
use percent_encoding::percent_decode_str;

use super::TENANT_HEADER;
use super::error::ProxyError;
use crate::tenants::EffectiveTenant;
use crate::vendors::path::CanonicalPath;
use crate::vendors::{Registry, Vendor, Via};

/// The vendor endpoint a request names, before the tenant is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint<'a> {
    /// The vendor at `index` of the registry, and how the request named it.
    Vendor { index: usize, via: Via<'a> },
    /// An absolute-form host that belongs to no vendor.
    Foreign(&'a str),
}

impl Endpoint<'_> {
    /// The registry index of the vendor this endpoint belongs to; `None` for a foreign host.
    pub(crate) fn vendor(&self) -> Option<usize> {
        match self {
            Endpoint::Vendor { index, .. } => Some(*index),
            Endpoint::Foreign(_) => None,
        }
    }
}

/// The request line, classified.
#[derive(Debug)]
pub(crate) struct Target<'a> {
    pub endpoint: Endpoint<'a>,
    /// The path as the vendor will see it (prefix removed), canonical.
    pub path: CanonicalPath<'a>,
    pub query: Option<&'a str>,
}

/// Steps 1 and 2: the form and the vendor endpoint.
pub(crate) fn classify<'r, B>(
    req: &'r Request<B>,
    vendors: &Registry,
) -> Result<Target<'r>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectUnsupported);
    }
    let uri = req.uri();
    if let Some(authority) = uri.authority() {
        check_authority(authority.as_str())?;
    }
    check_host_header(req.headers())?;
    let (endpoint, path) = if is_forward_form(uri, req.version(), vendors) {
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(ProxyError::bad_request("only http:// URLs can be proxied")),
        }
        let host = uri
            .host()
            .ok_or_else(|| ProxyError::bad_request("absolute URL without a host"))?;
        let endpoint = match uri.port_u16() {
            None | Some(80) | Some(443) => endpoint_of_host(host, vendors),
            // Upstream is always port 443; a URL naming another port is not a vendor host.
            Some(_) => Endpoint::Foreign(host),
        };
        (endpoint, uri.path())
    } else {
        let path = uri.path();
        let (prefix, rest) = match path[1.min(path.len())..].find('/') {
            Some(i) => (&path[1..i + 1], &path[i + 1..]),
            None => (&path[1.min(path.len())..], "/"),
        };
        let endpoint = match vendors.by_prefix(prefix) {
            Some((index, prefix)) => Endpoint::Vendor {
                index,
                via: Via::Prefix(prefix),
            },
            None => {
                return Err(ProxyError::UnknownRoute(format!(
                    "the path must start with a vendor prefix: {} (or use sidekey as an HTTP \
                     proxy)",
                    vendors.prefix_list()
                )));
            }
        };
        (endpoint, rest)
    };
    Ok(Target {
        endpoint,
        path: CanonicalPath::new(path)?,
        query: uri.query(),
    })
}

/// `host[:port]` and nothing else: no userinfo (RFC 9110 §4.2.4), and a port that is a port,
/// since one that does not parse would otherwise read as no port at all.
fn check_authority(text: &str) -> Result<(), ProxyError> {
    if text.contains('@') {
        return Err(ProxyError::bad_request(
            "a URL with userinfo (user@host) is refused; name the tenant in a header",
        ));
    }
    // The port follows the last ':' outside an IPv6 literal's brackets.
    let after_host = match text.rfind(']') {
        Some(i) => &text[i + 1..],
        None => text,
    };
    if let Some((_, port)) = after_host.rsplit_once(':') {
        let valid = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(ProxyError::bad_request(
                "the port is not a number from 1 to 65535",
            ));
        }
    }
    Ok(())
}

/// At most one `Host`, and a valid one (RFC 9112 §3.2 asks for 400 otherwise); empty is
/// allowed, as for a target with no authority.
fn check_host_header(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut values = headers.get_all(HOST).iter();
    let Some(host) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(ProxyError::bad_request("more than one Host header"));
    }
    if host.is_empty() {
        return Ok(());
    }
    // Checked in place (no parse into an `Authority`, which would copy it): routing never
    // reads `Host`, so its shape is all that matters.
    let invalid = || ProxyError::bad_request("the Host header is not a valid host[:port]");
    let host = host.to_str().map_err(|_| invalid())?;
    if host
        .bytes()
        .any(|b| !b.is_ascii_graphic() || b"/?#\\".contains(&b))
    {
        return Err(invalid());
    }
    check_authority(host)
}

fn is_forward_form(uri: &Uri, version: Version, vendors: &Registry) -> bool {
    if version == Version::HTTP_2 {
        // h2 always carries :scheme and :authority; the authority of a prefix-form request is
        // sidekey itself, which is never a vendor host.
        uri.host().is_some_and(|h| vendors.by_host(h).is_some())
    } else {
        // An app with HTTP_PROXY set that calls sidekey's own prefix URLs sends them in
        // absolute-form to a loopback host: that is still the prefix form.
        uri.scheme().is_some() && !uri.host().is_some_and(is_loopback)
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The vendor owning an absolute-form `host` (borrowed as sent; vendors compare it
/// case-insensitively, as DNS does).
fn endpoint_of_host<'a>(host: &'a str, vendors: &Registry) -> Endpoint<'a> {
    match vendors.by_host(host) {
        Some(index) => Endpoint::Vendor {
            index,
            via: Via::Host(host),
        },
        None => Endpoint::Foreign(host),
    }
}

/// Step 3: the tenant id the app named, if any.
pub(crate) fn tenant_id(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, ProxyError> {
    // A repeated header has no single meaning (some readers take the first, some the last,
    // some join them): refuse it rather than pick one.
    for name in [&TENANT_HEADER, &PROXY_AUTHORIZATION] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(ProxyError::bad_request(format!(
                "{name} appears more than once; name one tenant"
            )));
        }
    }
    let from_header = match headers.get(TENANT_HEADER) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ProxyError::bad_request("x-sidekey-tenant is not valid text"))?
                .trim(),
        ),
        None => None,
    };
    let from_auth = match headers.get(PROXY_AUTHORIZATION) {
        Some(v) => basic_user(v.as_bytes())?,
        None => None,
    };
    match (from_header, from_auth) {
        (Some(h), Some(a)) if h != a => Err(ProxyError::bad_request(
            "x-sidekey-tenant and Proxy-Authorization name different tenants",
        )),
        (Some(h), _) if !h.is_empty() => Ok(Some(Cow::Borrowed(h))),
        (_, Some(a)) if !a.is_empty() => Ok(Some(Cow::Owned(a))),
        _ => Ok(None),
    }
}

/// The user part of `Basic base64(user:password)`; `None` for other schemes.
fn basic_user(value: &[u8]) -> Result<Option<String>, ProxyError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| ProxyError::bad_request("Proxy-Authorization is not valid text"))?;
    let mut parts = value.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or("");
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let bad = || ProxyError::bad_request("Proxy-Authorization: malformed Basic credentials");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(parts.next().unwrap_or("").trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = match text.split_once(':') {
        Some((user, _)) => user,
        None => text.as_str(),
    };
    // Clients percent-decode userinfo before encoding it; decode again for those that do not.
    Ok(Some(
        percent_decode_str(user).decode_utf8_lossy().into_owned(),
    ))
}

/// Steps 5 to 7: the vendor and the host to dial for this tenant, or the refusal.
pub(crate) fn upstream_host<'v, 't>(
    endpoint: &Endpoint<'_>,
    tenant: &'t EffectiveTenant,
    vendors: &'v Registry,
) -> Result<(&'v dyn Vendor, &'t str), ProxyError> {
    let (index, via) = match *endpoint {
        Endpoint::Vendor { index, via } => (index, via),
        Endpoint::Foreign(host) => return Err(ProxyError::HostNotAllowed(host.to_owned())),
    };
    let Some(vendor) = vendors.get(index) else {
        return Err(ProxyError::bad_request("unroutable request"));
    };
    if !vendor.configured(tenant) {
        return Err(ProxyError::VendorNotConfigured {
            tenant: tenant.id.to_string(),
            vendor: vendor.name(),
        });
    }
    Ok((vendor, vendor.upstream_host(via, tenant)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    fn classify<B>(req: &Request<B>) -> Result<Target<'_>, ProxyError> {
        static VENDORS: std::sync::LazyLock<Registry> =
            std::sync::LazyLock::new(Registry::for_tests);
        super::classify(req, &VENDORS)
    }

    /// An endpoint by its vendor's name: `("m3ter", Via::Prefix(1))`, or `("", Via::Host(h))`
    /// for a foreign host.
    fn ep(vendor: &str, via: Via<'static>) -> (String, Via<'static>) {
        (vendor.to_owned(), via)
    }

    fn named<'a>(e: Endpoint<'a>) -> (String, Via<'a>) {
        let vendors = Registry::for_tests();
        match e {
            Endpoint::Vendor { index, via } => (vendors.get(index).unwrap().name().to_owned(), via),
            Endpoint::Foreign(host) => (String::new(), Via::Host(host)),
        }
    }

    #[test]
    fn prefix_form() {
        let r = req("GET", "/m3ter-ingest/organizations/o/measurements?x=1");
        let t = classify(&r).unwrap();
        assert_eq!(named(t.endpoint), ep("m3ter", Via::Prefix(1)));
        assert_eq!(t.path.as_str(), "/organizations/o/measurements");
        assert_eq!(t.query, Some("x=1"));
        let r = req("GET", "/mailkit");
        assert_eq!(classify(&r).unwrap().path.as_str(), "/");
        let r = req("GET", "/other/x");
        assert_eq!(classify(&r).unwrap_err().code(), "unknown_route");
        let r = req("GET", "/");
        assert_eq!(classify(&r).unwrap_err().code(), "unknown_route");
    }

    #[test]
    fn absolute_form_hosts() {
        let cases = [
            (
                "http://online.miradore.com/a",
                ep("miradore", Via::Host("online.miradore.com")),
            ),
            (
                "http://Acme.online.miradore.com/a",
                ep("miradore", Via::Host("Acme.online.miradore.com")),
            ),
            (
                "http://api.m3ter.com/a",
                ep("m3ter", Via::Host("api.m3ter.com")),
            ),
            (
                "http://ingest.staging.m3ter.com/a",
                ep("m3ter", Via::Host("ingest.staging.m3ter.com")),
            ),
            (
                "http://api.mailkit.eu:80/a",
                ep("mailkit", Via::Host("api.mailkit.eu")),
            ),
            ("http://evil.example/a", ep("", Via::Host("evil.example"))),
            (
                "http://a.b.online.miradore.com/",
                ep("", Via::Host("a.b.online.miradore.com")),
            ),
            (
                "http://api.mailkit.eu:8443/a",
                ep("", Via::Host("api.mailkit.eu")),
            ),
            ("http://www.m3ter.com/a", ep("", Via::Host("www.m3ter.com"))),
        ];
        for (uri, want) in cases {
            let r = req("GET", uri);
            assert_eq!(named(classify(&r).unwrap().endpoint), want, "{uri}");
        }
    }

    #[test]
    fn absolute_form_to_loopback_is_prefix_form() {
        for uri in [
            "http://127.0.0.1:8080/m3ter/x",
            "http://localhost/m3ter/x",
            "http://[::1]:8080/m3ter/x",
        ] {
            let r = req("GET", uri);
            let t = classify(&r).unwrap();
            assert_eq!(named(t.endpoint), ep("m3ter", Via::Prefix(0)), "{uri}");
            assert_eq!(t.path.as_str(), "/x");
        }
    }

    #[test]
    fn connect_and_dot_segments() {
        let r = req("CONNECT", "api.m3ter.com:443");
        assert_eq!(classify(&r).unwrap_err().code(), "connect_unsupported");
        for p in [
            "/miradore/acme/API/../other/API/Device",
            "/m3ter/organizations/o/%2e%2E/x",
            "http://api.m3ter.com/./x",
            "/m3ter//organizations/o/x",
            "/m3ter-ingest/organizations/o/..;/p/measurements",
            "http://ingest.m3ter.com/%6Frganizations/o",
            "/mailkit/json.fcgi;x",
        ] {
            assert_eq!(
                classify(&req("GET", p)).unwrap_err().code(),
                "bad_request",
                "{p}"
            );
        }
    }

    #[test]
    fn invalid_ports_userinfo_and_hosts_are_refused() {
        // Issue 10, finding 6: a port that does not parse used to read as no port.
        for uri in [
            "http://api.m3ter.com:65536/x",
            "http://api.m3ter.com:99999/x",
            "http://api.m3ter.com:-1/x",
            "http://api.m3ter.com:/x",
            "http://api.m3ter.com:0/x",
            "http://api.m3ter.com:44x/x",
            "http://acme@api.m3ter.com/x",
            "http://127.0.0.1:99999/m3ter/x",
            "http://[::1]:/m3ter/x",
        ] {
            assert_eq!(
                classify(&req("GET", uri)).unwrap_err().code(),
                "bad_request",
                "{uri}"
            );
        }
        for (uri, want) in [
            (
                "http://api.m3ter.com:443/x",
                ep("m3ter", Via::Host("api.m3ter.com")),
            ),
            (
                "http://api.m3ter.com:8443/x",
                ep("", Via::Host("api.m3ter.com")),
            ),
            ("http://[::1]:8080/m3ter/x", ep("m3ter", Via::Prefix(0))),
        ] {
            let r = req("GET", uri);
            assert_eq!(named(classify(&r).unwrap().endpoint), want, "{uri}");
        }
        let with_hosts = |hosts: &[&str]| {
            let mut r = req("GET", "/m3ter/x");
            for h in hosts {
                r.headers_mut().append(HOST, h.parse().unwrap());
            }
            classify(&r)
                .map(|t| named(t.endpoint).0)
                .map_err(|e| e.code())
        };
        for ok in [
            &[][..],
            &[""],
            &["127.0.0.1:8080"],
            &["localhost"],
            &["[::1]:8080"],
        ] {
            assert_eq!(with_hosts(ok), Ok("m3ter".to_owned()), "{ok:?}");
        }
        for bad in [
            &["a", "b"][..],
            &["localhost", "localhost"],
            &["localhost:99999"],
            &["localhost:"],
            &["u@localhost"],
            &["local host"],
        ] {
            assert_eq!(with_hosts(bad), Err("bad_request"), "{bad:?}");
        }
    }

    #[test]
    fn a_repeated_tenant_header_is_refused() {
        // Issue 10, finding 6: the first of two used to win silently.
        for (name, a, b) in [
            (TENANT_HEADER, "acme", "other"),
            (TENANT_HEADER, "acme", "acme"),
            (PROXY_AUTHORIZATION, "Basic YWNtZTp4", "Basic b3RoZXI6eA=="),
            (PROXY_AUTHORIZATION, "Basic YWNtZTp4", "Bearer x"),
        ] {
            let mut h = HeaderMap::new();
            h.append(&name, a.parse().unwrap());
            assert!(tenant_id(&h).is_ok());
            h.append(&name, b.parse().unwrap());
            assert_eq!(
                tenant_id(&h).unwrap_err().code(),
                "bad_request",
                "{name}: {a}, {b}"
            );
        }
    }

    #[test]
    fn tenant_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(tenant_id(&h).unwrap(), None);
        h.insert(PROXY_AUTHORIZATION, "Basic YWNtZTp4".parse().unwrap()); // acme:x
        assert_eq!(tenant_id(&h).unwrap().as_deref(), Some("acme"));
        h.insert(TENANT_HEADER, "acme".parse().unwrap());
        assert_eq!(tenant_id(&h).unwrap().as_deref(), Some("acme"));
        h.insert(TENANT_HEADER, "other".parse().unwrap());
        assert_eq!(tenant_id(&h).unwrap_err().code(), "bad_request");
        h.remove(TENANT_HEADER);
        h.insert(PROXY_AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(tenant_id(&h).unwrap_err().code(), "bad_request");
        h.insert(PROXY_AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(tenant_id(&h).unwrap(), None);
    }
}
