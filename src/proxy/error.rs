//! The refusals sidekey itself answers, and the one place they become HTTP responses.
//!
//! Causes arrive typed from elsewhere ([`RuleError`] from the vendor rules, [`BudgetError`]
//! from the body budget, [`NotCanonical`] from the path check, [`UpstreamError`] from the
//! client); the `From` impls below are the only mapping from a cause to a row of the table
//! (the "rescue" of linkerd2-proxy's server stack).
//!
//! Each variant is one row of the error table in docs/proxy.md ("Errors sidekey itself
//! returns"): its code, status and when. Messages are written for app developers and never
//! contain a secret: variants carry only names (hosts, sites, org ids, tenant ids) that the
//! app itself sent or that are not credentials.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, PROXY_AUTHENTICATE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::budget::BudgetError;
use crate::upstream::UpstreamError;
use crate::vendors::RuleError;
use crate::vendors::path::NotCanonical;

/// A refusal, by the contract's error code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Malformed request or unparsable body the rule must rewrite.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnknownRoute(String),
    #[error(
        "CONNECT is not enabled: sidekey can inject credentials only into TLS it terminates. \
         Call the vendor with an http:// URL (sidekey supplies the TLS), or enable HTTPS \
         interception with sidekey serve --intercept-ca-cert/--intercept-ca-key (see \
         docs/interception.md)"
    )]
    ConnectUnsupported,
    /// A `CONNECT` sent as an HTTP/2 stream: tunnels are opened over HTTP/1.1 only. Same code
    /// as [`ProxyError::ConnectUnsupported`].
    #[error(
        "CONNECT over HTTP/2 is not supported: open the tunnel with an HTTP/1.1 CONNECT (what \
         proxy clients send by default; do not use HTTP/2 prior knowledge towards the proxy)"
    )]
    ConnectOverHttp2,
    #[error(
        "no tenant named: send the x-sidekey-tenant header or proxy credentials \
         (http://<tenant>:x@host:port)"
    )]
    TenantRequired,
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("tenant {tenant:?} has no {vendor} connection")]
    VendorNotConfigured {
        tenant: String,
        vendor: &'static str,
    },
    #[error("host {0:?} is not one of this tenant's vendor hosts")]
    HostNotAllowed(String),
    #[error("the request names Miradore site {0:?}, which is not this tenant's site")]
    SiteMismatch(String),
    #[error("the request names m3ter organisation {0:?}, which is not this tenant's organisation")]
    OrgMismatch(String),
    #[error("the request body exceeds the {limit}-byte limit for bodies sidekey must rewrite")]
    BodyTooLarge { limit: usize },
    #[error("m3ter token exchange failed: {0}")]
    TokenExchangeFailed(String),
    #[error("could not reach {host}: {source}")]
    UpstreamUnreachable {
        host: String,
        #[source]
        source: UpstreamError,
    },
    #[error("{host} did not answer in time")]
    UpstreamTimeout { host: String },
    /// Bodies held in memory for rewrite or replay already fill `--body-memory-budget`.
    #[error(
        "sidekey is holding as many request bodies in memory as its budget allows; \
         retry shortly"
    )]
    BodyBudgetExhausted,
    /// Interception is on but no leaf certificate could be minted for the tunnel's host.
    #[error("{0}")]
    InterceptFailed(String),
}

/// The reason phrase of a `connect_unsupported` answer, which HTTP/1 clients show as-is
/// (curl: "CONNECT tunnel failed, response 405").
pub const CONNECT_UNSUPPORTED_REASON: &str =
    "CONNECT Not Enabled (use http:// URLs or interception)";

/// `Retry-After` of a `body_budget_exhausted` refusal, in seconds: bodies in flight are
/// usually sent on within that.
pub const BODY_BUDGET_RETRY_AFTER_SECS: u32 = 1;

impl ProxyError {
    /// The contract's error code, also used as the `error` metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::UnknownRoute(_) => "unknown_route",
            ProxyError::ConnectUnsupported | ProxyError::ConnectOverHttp2 => "connect_unsupported",
            ProxyError::TenantRequired => "tenant_required",
            ProxyError::UnknownTenant(_) => "unknown_tenant",
            ProxyError::VendorNotConfigured { .. } => "vendor_not_configured",
            ProxyError::HostNotAllowed(_) => "host_not_allowed",
            ProxyError::SiteMismatch(_) => "site_mismatch",
            ProxyError::OrgMismatch(_) => "org_mismatch",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::TokenExchangeFailed(_) => "token_exchange_failed",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::BodyBudgetExhausted => "body_budget_exhausted",
            ProxyError::InterceptFailed(_) => "intercept_failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::ConnectUnsupported | ProxyError::ConnectOverHttp2 => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ProxyError::TenantRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::UnknownTenant(_)
            | ProxyError::VendorNotConfigured { .. }
            | ProxyError::HostNotAllowed(_)
            | ProxyError::SiteMismatch(_)
            | ProxyError::OrgMismatch(_) => StatusCode::FORBIDDEN,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::TokenExchangeFailed(_) | ProxyError::UpstreamUnreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyBudgetExhausted => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::InterceptFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps a failed vendor call (timeouts to 504, everything else to 502) and counts it in
    /// `sidekey_upstream_errors_total{vendor,kind}`.
    pub fn upstream(vendor: &'static str, host: &str, err: UpstreamError) -> Self {
        err.record(vendor);
        tracing::debug!(vendor, host, error = %err, "upstream call failed");
        if err.is_timeout() {
            ProxyError::UpstreamTimeout {
                host: host.to_owned(),
            }
        } else {
            ProxyError::UpstreamUnreachable {
                host: host.to_owned(),
                source: err,
            }
        }
    }

    pub(crate) fn bad_request(msg: impl Into<String>) -> Self {
        ProxyError::BadRequest(msg.into())
    }

    /// The response the app sees: JSON body, `x-sidekey-error`, and for 407 the
    /// `Proxy-Authenticate` challenge.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let bytes = Bytes::from(body.to_string());
        let len = bytes.len();
        let mut resp = Response::new(Full::new(bytes));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(super::ERROR_HEADER, HeaderValue::from_static(self.code()));
        if matches!(self, ProxyError::TenantRequired) {
            h.insert(
                PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sidekey\""),
            );
        }
        if matches!(self, ProxyError::BodyBudgetExhausted) {
            h.insert(RETRY_AFTER, HeaderValue::from(BODY_BUDGET_RETRY_AFTER_SECS));
        }
        if matches!(self, ProxyError::ConnectUnsupported) {
            resp.extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(
                    CONNECT_UNSUPPORTED_REASON.as_bytes(),
                ));
        }
        resp
    }
}

impl From<RuleError> for ProxyError {
    fn from(err: RuleError) -> Self {
        match err {
            RuleError::Malformed(msg) => ProxyError::BadRequest(msg.into_owned()),
            RuleError::UnknownRoute(msg) => ProxyError::UnknownRoute(msg.to_owned()),
            RuleError::HostNotAllowed(host) => ProxyError::HostNotAllowed(host),
            RuleError::NotConfigured => {
                ProxyError::bad_request("the tenant has no connection for this vendor")
            }
            RuleError::SiteMismatch(site) => ProxyError::SiteMismatch(site),
            RuleError::OrgMismatch(org) => ProxyError::OrgMismatch(org),
            RuleError::TokenExchange(why) => ProxyError::TokenExchangeFailed(why),
            RuleError::Upstream {
                vendor,
                host,
                source,
            } => ProxyError::upstream(vendor, &host, source),
            RuleError::Body(err) => err.into(),
            RuleError::Path(err) => err.into(),
        }
    }
}

impl From<BudgetError> for ProxyError {
    fn from(err: BudgetError) -> Self {
        match err {
            BudgetError::TooLarge { limit } => ProxyError::BodyTooLarge { limit },
            BudgetError::Exhausted => ProxyError::BodyBudgetExhausted,
            BudgetError::Read => ProxyError::bad_request("reading the request body failed"),
        }
    }
}

impl From<NotCanonical> for ProxyError {
    fn from(err: NotCanonical) -> Self {
        ProxyError::BadRequest(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn response_shape() {
        let resp = ProxyError::TenantRequired.to_response();
        assert_eq!(resp.status(), 407);
        assert_eq!(resp.headers()["x-sidekey-error"], "tenant_required");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(
            resp.headers()["proxy-authenticate"],
            "Basic realm=\"sidekey\""
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "tenant_required");
        assert!(v["error"]["message"].as_str().unwrap().contains("tenant"));
    }

    #[test]
    fn budget_refusal_says_when_to_retry() {
        let resp = ProxyError::BodyBudgetExhausted.to_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["x-sidekey-error"], "body_budget_exhausted");
    }

    #[test]
    fn every_code_has_its_status() {
        let cases = [
            (ProxyError::bad_request("x"), 400, "bad_request"),
            (ProxyError::UnknownRoute("x".into()), 404, "unknown_route"),
            (ProxyError::ConnectUnsupported, 405, "connect_unsupported"),
            (ProxyError::ConnectOverHttp2, 405, "connect_unsupported"),
            (ProxyError::UnknownTenant("t".into()), 403, "unknown_tenant"),
            (
                ProxyError::HostNotAllowed("h".into()),
                403,
                "host_not_allowed",
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (
                ProxyError::UpstreamTimeout { host: "h".into() },
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::BodyBudgetExhausted,
                503,
                "body_budget_exhausted",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn every_cause_maps_to_its_code() {
        let not_canonical = crate::vendors::path::CanonicalPath::new("/a/../b").unwrap_err();
        let cases: [(ProxyError, &str); 12] = [
            (RuleError::malformed("x").into(), "bad_request"),
            (RuleError::UnknownRoute("x").into(), "unknown_route"),
            (
                RuleError::HostNotAllowed("h".into()).into(),
                "host_not_allowed",
            ),
            (RuleError::NotConfigured.into(), "bad_request"),
            (RuleError::SiteMismatch("s".into()).into(), "site_mismatch"),
            (RuleError::OrgMismatch("o".into()).into(), "org_mismatch"),
            (
                RuleError::TokenExchange("t".into()).into(),
                "token_exchange_failed",
            ),
            (
                RuleError::Body(BudgetError::Exhausted).into(),
                "body_budget_exhausted",
            ),
            (BudgetError::TooLarge { limit: 1 }.into(), "body_too_large"),
            (BudgetError::Read.into(), "bad_request"),
            (not_canonical.into(), "bad_request"),
            (RuleError::Path(not_canonical).into(), "bad_request"),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
        let e = ProxyError::from(RuleError::TokenExchange("m3ter said no".into()));
        assert_eq!(e.to_string(), "m3ter token exchange failed: m3ter said no");
    }
}
