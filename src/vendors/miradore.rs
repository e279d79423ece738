//! Miradore: where the API key goes, by API version and path shape.
//!
//! | app path | sent to `online.miradore.com` |
//! |---|---|
//! | `/<site>/API/...` (v1) | same path, query `auth=<key>` (percent-encoded) |
//! | `/API/...` (site-less v1) | `/<site>/API/...`, query `auth=<key>` |
//! | `/<site>/api/v2/...` | same path, header `X-API-Key` |
//! | `/api/v2/...` (site-less v2) | same path, headers `X-API-Key` and `X-Instance-Name: <site>` |
//!
//! The path is canonical (`vendors::path`: no empty, dot or `;` segments, no needless
//! escapes), so its segments are what Miradore reads. The `api`/`v2` segments are matched
//! case-insensitively (the server is); the site segment must be the tenant's site byte for
//! byte (site names are case-sensitive, and a canonical segment cannot spell it with
//! escapes), else `site_mismatch`. Any other path (no `API` segment in the first or second position) is
//! refused with 404 `unknown_route`: it is not an API call and there is nowhere to put the
//! key. A first segment `api` is always read as the site-less form, so a site literally
//! named `api` must use the site-less paths. App-sent `auth` parameters (compared after
//! decoding, so `%61uth` counts), `X-API-Key` and `X-Instance-Name` never reach Miradore.

use http::header::HeaderValue;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use futures_util::future::BoxFuture;
use http::request::Parts;

use super::error::RuleError;
use super::path::CanonicalPath;
use super::{BodyRule, Plan, RuleInput, TestOutcome, Vendor, Via};
use crate::tenants::{EffectiveTenant, MiradoreCreds, VendorKind};
use crate::upstream;

/// The formats of Miradore's credential fields, as the credential schema
/// (`crate::model::MiradoreConn`) checks them on every write. A leaf (it imports only
/// [`crate::syntax`]), so the model can name it without importing the data plane.
pub mod fields {
    use crate::syntax::problem;

    /// `[A-Za-z0-9-]{1,63}`, case kept: the site is a path segment and a host label here.
    pub fn is_site(s: &str) -> bool {
        (1..=63).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
    }

    pub fn site(s: &str) -> Result<(), String> {
        problem(
            is_site(s),
            "must be 1-63 letters, digits or '-' (case is kept)",
        )
    }

    /// The key travels in the X-API-Key header, which must be visible ASCII.
    pub fn api_key(s: &str) -> Result<(), String> {
        problem(
            s.bytes().all(|b| b.is_ascii_graphic()),
            "must be visible ASCII characters without spaces",
        )
    }
}

/// Miradore's API host; a legacy `<site>.online.miradore.com` is routed here too.
pub const HOST: &str = "online.miradore.com";
/// The legacy per-site hosts: `<site>.online.miradore.com`.
const LEGACY_SUFFIX: &str = ".online.miradore.com";

/// Miradore as the proxy sees it: prefix `/miradore`, host `online.miradore.com` (and the
/// legacy per-site hosts, which must name the tenant's site), the rule of this module.
pub struct Miradore;

impl Miradore {
    fn creds(tenant: &EffectiveTenant) -> Result<&MiradoreCreds, RuleError> {
        tenant.miradore.as_ref().ok_or(RuleError::NotConfigured)
    }
}

/// The site label of a legacy host `<label>.online.miradore.com` (one DNS label).
fn legacy_label(host: &str) -> Option<&str> {
    if host.len() <= LEGACY_SUFFIX.len() {
        return None;
    }
    let (label, suffix) = host.split_at(host.len() - LEGACY_SUFFIX.len());
    (suffix.eq_ignore_ascii_case(LEGACY_SUFFIX) && !label.contains('.')).then_some(label)
}

impl Vendor for Miradore {
    fn name(&self) -> &'static str {
        "miradore"
    }

    fn kind(&self) -> Option<VendorKind> {
        Some(VendorKind::Miradore)
    }

    fn prefixes(&self) -> &'static [&'static str] {
        &["miradore"]
    }

    fn owns_host(&self, host: &str) -> bool {
        host.eq_ignore_ascii_case(HOST) || legacy_label(host).is_some()
    }

    fn dns_suffixes(&self) -> &'static [&'static str] {
        &[HOST]
    }

    fn upstream_host<'t>(
        &self,
        via: Via<'_>,
        tenant: &'t EffectiveTenant,
    ) -> Result<&'t str, RuleError> {
        let creds = Self::creds(tenant)?;
        match via {
            Via::Host(host) if !host.eq_ignore_ascii_case(HOST) => match legacy_label(host) {
                // DNS names are case-insensitive, so the label is too; the canonical request
                // then carries the tenant's exact site.
                Some(label) if label.eq_ignore_ascii_case(&creds.site) => Ok(HOST),
                Some(label) => Err(RuleError::SiteMismatch(label.to_owned())),
                None => Err(RuleError::HostNotAllowed(host.to_owned())),
            },
            _ => Ok(HOST),
        }
    }

    fn plan(&self, req: RuleInput<'_>, tenant: &EffectiveTenant) -> Result<Plan, RuleError> {
        let rw = rewrite(req.path, req.query, Self::creds(tenant)?)?;
        Ok(Plan {
            path_and_query: Some(rw.path_and_query),
            body: BodyRule::Stream,
        })
    }

    fn inject(&self, parts: &mut Parts, tenant: &EffectiveTenant) -> Result<(), RuleError> {
        let (key_header, instance_header) = credential_headers(parts.uri.path());
        let rw = Rewritten {
            path_and_query: String::new(),
            key_header,
            instance_header,
        };
        apply_headers(&mut parts.headers, &rw, Self::creds(tenant)?)
    }

    fn test<'a>(
        &'a self,
        client: &'a upstream::Client,
        tenant: &'a EffectiveTenant,
    ) -> BoxFuture<'a, TestOutcome> {
        Box::pin(async move {
            match &tenant.miradore {
                Some(creds) => test(client, creds).await,
                None => TestOutcome::not_configured(VendorKind::Miradore),
            }
        })
    }
}

pub const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");
pub const INSTANCE_HEADER: HeaderName = HeaderName::from_static("x-instance-name");

/// Everything except RFC 3986 unreserved characters is encoded, so keys with `{ } , ! +`
/// survive any query parser.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The request as Miradore must receive it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rewritten {
    /// Path and query to send.
    pub path_and_query: String,
    /// v2: the key goes in `X-API-Key`.
    pub key_header: bool,
    /// Site-less v2: the site goes in `X-Instance-Name`.
    pub instance_header: bool,
}

/// Applies the rule to an app's path and query.
pub(crate) fn rewrite(
    path: CanonicalPath<'_>,
    query: Option<&str>,
    creds: &MiradoreCreds,
) -> Result<Rewritten, RuleError> {
    let mut segs = path.segments();
    let first = segs.next().unwrap_or("");
    let second = segs.next();

    // (site present in path, is v2)
    let (site_in_path, v2) = if is_api(first) {
        (false, is_v2(second))
    } else if second.is_some_and(is_api) {
        let third = segs.next();
        if first != creds.site {
            return Err(RuleError::SiteMismatch(first.to_owned()));
        }
        (true, is_v2(third))
    } else {
        return Err(RuleError::UnknownRoute(
            "not a Miradore API path: expected /<site>/API/..., /<site>/api/v2/..., \
             /API/... or /api/v2/...",
        ));
    };

    let path = path.as_str();
    if v2 {
        let path_and_query = match query {
            Some(q) => {
                let q = strip_auth(q);
                if q.is_empty() {
                    path.to_owned()
                } else {
                    format!("{path}?{q}")
                }
            }
            None => path.to_owned(),
        };
        return Ok(Rewritten {
            path_and_query,
            key_header: true,
            instance_header: !site_in_path,
        });
    }

    let key = utf8_percent_encode(creds.api_key.expose(), QUERY_VALUE);
    let mut out = String::with_capacity(path.len() + creds.site.len() + 64);
    if !site_in_path {
        out.push('/');
        out.push_str(&creds.site);
    }
    out.push_str(path);
    out.push('?');
    if let Some(q) = query {
        let kept = strip_auth(q);
        if !kept.is_empty() {
            out.push_str(&kept);
            out.push('&');
        }
    }
    out.push_str("auth=");
    out.extend(key);
    Ok(Rewritten {
        path_and_query: out,
        key_header: false,
        instance_header: false,
    })
}

/// Which credential headers a request to `path` (as rewritten, so as Miradore reads it)
/// carries: `X-API-Key` on v2 paths, also `X-Instance-Name` on site-less v2 ones; v1 paths
/// carry the site in the path and the key in the query. The same reading of segments as
/// [`rewrite`], so `inject` agrees with the plan (checked by a test over every path shape).
fn credential_headers(path: &str) -> (bool, bool) {
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    let first = segs.next().unwrap_or("");
    let second = segs.next();
    if is_api(first) {
        let v2 = is_v2(second);
        (v2, v2)
    } else if second.is_some_and(is_api) {
        (is_v2(segs.next()), false)
    } else {
        (false, false)
    }
}

fn is_api(segment: &str) -> bool {
    segment.eq_ignore_ascii_case("api")
}

fn is_v2(segment: Option<&str>) -> bool {
    segment.is_some_and(|s| s.eq_ignore_ascii_case("v2"))
}

/// The query without any `auth` parameter; other parameters stay byte-identical and in order.
fn strip_auth(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split('&') {
        let name = pair.split('=').next().unwrap_or("");
        let decoded = percent_decode_str(name).collect::<Vec<u8>>();
        if decoded.eq_ignore_ascii_case(b"auth") || pair.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(pair);
    }
    out
}

/// Removes what the app must not send and adds the key (and site) headers the rule asks for.
pub(crate) fn apply_headers(
    headers: &mut HeaderMap,
    rw: &Rewritten,
    creds: &MiradoreCreds,
) -> Result<(), RuleError> {
    // `insert` replaces every value the app sent; the header not set is removed.
    if rw.key_header {
        headers.insert(API_KEY_HEADER, key_header(creds)?);
    } else {
        headers.remove(API_KEY_HEADER);
    }
    if rw.instance_header {
        let site = HeaderValue::from_str(&creds.site).map_err(|_| {
            RuleError::malformed("the tenant's Miradore site is not a valid header value")
        })?;
        headers.insert(INSTANCE_HEADER, site);
    } else {
        headers.remove(INSTANCE_HEADER);
    }
    Ok(())
}

fn key_header(creds: &MiradoreCreds) -> Result<HeaderValue, RuleError> {
    let mut v = HeaderValue::from_str(creds.api_key.expose()).map_err(|_| {
        RuleError::malformed("the tenant's Miradore API key cannot be sent as a header")
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// `TestTenant` for Miradore: `GET /api/v2/Device?limit=1` (a one-row read) with the key and
/// site headers. 2xx is success; anything else is the vendor's refusal.
pub async fn test(client: &upstream::Client, creds: &MiradoreCreds) -> TestOutcome {
    let req = (|| -> Result<_, RuleError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("https://{}/api/v2/Device?limit=1", HOST))
            .header(http::header::ACCEPT, "application/json")
            .body(upstream::empty_body())
            .map_err(|_| RuleError::malformed("cannot build the test request"))?;
        let rw = Rewritten {
            path_and_query: String::new(),
            key_header: true,
            instance_header: true,
        };
        apply_headers(req.headers_mut(), &rw, creds)?;
        Ok(req)
    })();
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            return TestOutcome {
                ok: false,
                http_status: 0,
                message: e.to_string(),
            };
        }
    };
    match client.send(req).await {
        Ok(resp) => {
            let status = resp.status();
            let message = if status.is_success() {
                "Miradore accepted the API key".to_owned()
            } else if status == StatusCode::UNAUTHORIZED {
                "Miradore refused the API key (401)".to_owned()
            } else {
                format!("Miradore answered {status} (a wrong-case site name gives 403 or 500)")
            };
            TestOutcome {
                ok: status.is_success(),
                http_status: status.as_u16(),
                message,
            }
        }
        Err(e) => TestOutcome {
            ok: false,
            http_status: 0,
            message: format!("could not reach Miradore: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::testing::RefusalCode as _;

    fn creds() -> MiradoreCreds {
        MiradoreCreds {
            site: "Acme1".into(),
            api_key: Secret::new("1_AaDf234sdf8!4{x},+ /&="),
        }
    }
    const ENC: &str = "1_AaDf234sdf8%214%7Bx%7D%2C%2B%20%2F%26%3D";

    #[test]
    fn inject_reads_the_headers_the_plan_decided() {
        // `inject` re-reads the rewritten path; it must agree with `rewrite` on every shape,
        // including sites that look like the API segments.
        for site in ["Acme1", "api", "API", "v2", "x"] {
            let c = MiradoreCreds {
                site: site.into(),
                api_key: Secret::new("k"),
            };
            for path in [
                "/API/Device".to_owned(),
                "/api/v2/Device".to_owned(),
                "/Api/V2".to_owned(),
                "/api".to_owned(),
                "/API/v2x/y".to_owned(),
                "/api/API/v2/x".to_owned(),
                format!("/{site}/API/Device"),
                format!("/{site}/api/v2/Device"),
                format!("/{site}/API"),
                format!("/{site}/api/v2"),
            ] {
                let Ok(rw) = super::rewrite(CanonicalPath::new(&path).unwrap(), Some("a=1"), &c)
                else {
                    continue;
                };
                let sent = rw.path_and_query.split('?').next().unwrap();
                assert_eq!(
                    credential_headers(sent),
                    (rw.key_header, rw.instance_header),
                    "site {site}, path {path}"
                );
            }
        }
    }

    #[test]
    fn hosts_and_legacy_sites() {
        let vendor = Miradore;
        for host in ["online.miradore.com", "Acme1.ONLINE.miradore.com"] {
            assert!(vendor.owns_host(host), "{host}");
        }
        for host in [
            "a.b.online.miradore.com",
            "miradore.com",
            ".online.miradore.com",
        ] {
            assert!(!vendor.owns_host(host), "{host}");
        }
        let tenant = EffectiveTenant {
            id: "t".into(),
            miradore: Some(creds()),
            m3ter: None,
            mailkit: None,
        };
        let host = |via| vendor.upstream_host(via, &tenant).map_err(|e| e.code());
        assert_eq!(host(Via::Prefix(0)), Ok(HOST));
        assert_eq!(host(Via::Host("online.miradore.com")), Ok(HOST));
        assert_eq!(host(Via::Host("acme1.online.miradore.com")), Ok(HOST));
        assert_eq!(
            host(Via::Host("other.online.miradore.com")),
            Err("site_mismatch")
        );
    }

    fn rewrite(
        path: &str,
        query: Option<&str>,
        creds: &MiradoreCreds,
    ) -> Result<Rewritten, RuleError> {
        super::rewrite(CanonicalPath::new(path)?, query, creds)
    }

    #[test]
    fn v1_with_site_sets_auth_and_keeps_other_params() {
        let rw = rewrite(
            "/Acme1/API/Device",
            Some("select=Name,ID&%61uth=app&auth=x&top=5"),
            &creds(),
        )
        .unwrap();
        assert_eq!(
            rw.path_and_query,
            format!("/Acme1/API/Device?select=Name,ID&top=5&auth={ENC}")
        );
        assert!(!rw.key_header && !rw.instance_header);
    }

    #[test]
    fn siteless_v1_gets_site_inserted() {
        let rw = rewrite("/API/Device/12", None, &creds()).unwrap();
        assert_eq!(
            rw.path_and_query,
            format!("/Acme1/API/Device/12?auth={ENC}")
        );
    }

    #[test]
    fn v2_forms() {
        let rw = rewrite("/Acme1/api/v2/Device", Some("limit=1&auth=x"), &creds()).unwrap();
        assert_eq!(rw.path_and_query, "/Acme1/api/v2/Device?limit=1");
        assert!(rw.key_header && !rw.instance_header);
        let rw = rewrite("/api/v2/Device", None, &creds()).unwrap();
        assert_eq!(rw.path_and_query, "/api/v2/Device");
        assert!(rw.key_header && rw.instance_header);
    }

    #[test]
    fn site_mismatch_is_case_sensitive_and_decoded() {
        for p in ["/acme1/API/Device", "/Other/api/v2/Device"] {
            assert_eq!(
                rewrite(p, None, &creds()).unwrap_err().code(),
                "site_mismatch",
                "{p}"
            );
        }
        assert!(rewrite("/Acme1/API/Device/", None, &creds()).is_ok());
    }

    #[test]
    fn site_check_cannot_be_climbed_out_of() {
        // Issue 10, finding 4: these named Acme1 to sidekey and another site to Miradore.
        for p in [
            "/Acme1/API/..;/..;/Other/API/Device",
            "/Acme1/API/..%2f..%2fOther/API/Device",
            "/Acme1/API/..%2F..%2FOther/API/Device",
            "/Acme1/API/%2e%2e/%2e%2e/Other/API/Device",
            "/Acme1;x/API/Device",
            "//Acme1/API/Device",
            "/%41cme1/API/Device",
            "/Acme1/%41PI/Device",
        ] {
            assert_eq!(
                rewrite(p, None, &creds()).unwrap_err().code(),
                "bad_request",
                "{p}"
            );
        }
    }

    #[test]
    fn other_paths_are_unknown_routes() {
        for p in ["/", "/Acme1", "/Acme1/Device", "/favicon.ico"] {
            assert_eq!(
                rewrite(p, None, &creds()).unwrap_err().code(),
                "unknown_route",
                "{p}"
            );
        }
    }

    #[test]
    fn headers_replace_app_values() {
        let mut h = HeaderMap::new();
        h.insert(API_KEY_HEADER, "app-key".parse().unwrap());
        h.insert(INSTANCE_HEADER, "Other".parse().unwrap());
        let rw = rewrite("/Acme1/API/Device", None, &creds()).unwrap();
        apply_headers(&mut h, &rw, &creds()).unwrap();
        assert!(h.get(API_KEY_HEADER).is_none() && h.get(INSTANCE_HEADER).is_none());
        let rw = rewrite("/api/v2/Device", None, &creds()).unwrap();
        apply_headers(&mut h, &rw, &creds()).unwrap();
        assert_eq!(h[API_KEY_HEADER], creds().api_key.expose());
        assert_eq!(h[INSTANCE_HEADER], "Acme1");
    }
}
