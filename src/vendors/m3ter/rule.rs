//! m3ter's injection rule: bearer token from the [`TokenSource`], organisation check, the
//! local `/oauth/token` answer, and one replay after m3ter refuses a token.
//!
//! Replay: m3ter answers 403 (sometimes 401) when a token expired or was revoked. The token
//! is then reported with [`TokenSource::refused`], and the request is sent once more with a
//! fresh token, provided its body was kept: bodies whose length is declared and at most
//! `replay_limit` bytes (default 1 MiB, `ProxyConfig::replay_body_limit`) are read into memory
//! before the first attempt (bodiless requests trivially qualify). Bigger bodies, and bodies
//! of unknown length (chunked), stream straight through and are not replayed: the refusal
//! goes to the app, and the next request gets a fresh token. When the broker keeps the
//! refused token (it already dropped one for this credential within the last 30 s, see
//! `broker::DEFAULT_REFUSAL_INTERVAL`), the refusal goes to the app unreplayed. A second
//! refusal goes to the app
//! unchanged.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use super::{BearerToken, TokenSource};
use crate::tenants::M3terCreds;
use crate::upstream::{self, full_body};
use crate::vendors::error::RuleError;
use crate::vendors::path::CanonicalPath;

/// What sidekey does with an m3ter request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `POST /oauth/token`: answered locally with [`PLACEHOLDER_TOKEN`].
    LocalToken,
    /// Forwarded with a bearer token.
    Forward,
}

/// What the SDKs get from `POST /oauth/token`: a token they send back, which sidekey replaces.
pub const PLACEHOLDER_TOKEN: &str = r#"{"token_type":"Bearer","access_token":"sidekey-placeholder","expires_in":18000,"scope":null}"#;

/// The first segment of every organisation-scoped m3ter path.
const ORGANIZATIONS: &str = "organizations";

/// Checks the path against the tenant's organisation.
///
/// The path is canonical (`vendors::path`), so its segments are what m3ter reads. A first
/// segment `organizations` must be followed by the tenant's organisation (UUIDs compare
/// case-insensitively); `/organizations` alone names none and is refused too. m3ter paths
/// are case-sensitive, so `Organizations` in any other case is refused as non-canonical
/// rather than forwarded unchecked. Other paths are forwarded.
pub(crate) fn check(
    method: &Method,
    path: CanonicalPath<'_>,
    creds: &M3terCreds,
) -> Result<Action, RuleError> {
    if path.as_str() == "/oauth/token" && method == Method::POST {
        return Ok(Action::LocalToken);
    }
    let mut segments = path.segments();
    match segments.next() {
        Some(ORGANIZATIONS) => {
            let org = segments.next().unwrap_or("");
            if !org.eq_ignore_ascii_case(&creds.org_id) {
                return Err(RuleError::OrgMismatch(org.to_owned()));
            }
        }
        Some(first) if first.eq_ignore_ascii_case(ORGANIZATIONS) => {
            return Err(RuleError::malformed(
                "m3ter paths are case-sensitive: write /organizations/",
            ));
        }
        _ => {}
    }
    Ok(Action::Forward)
}

/// The local answer to `POST /oauth/token`.
pub(crate) fn placeholder_response() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(PLACEHOLDER_TOKEN.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

/// Everything `send` needs besides the request.
pub(crate) struct Ctx<'a> {
    pub client: &'a upstream::Client,
    pub tokens: &'a dyn TokenSource,
    pub creds: &'a M3terCreds,
    pub host: &'a str,
    pub replay_limit: usize,
    /// Bodies kept for replay are held within the proxy's byte budget.
    pub budget: &'a crate::budget::BodyBudget,
    /// Every wait here (token, body, m3ter) ends by the proxied request's deadline.
    pub deadline: tokio::time::Instant,
    pub trace: Option<&'a crate::telemetry::RequestTrace>,
}

/// Sends `parts` + `body` (URI and headers already prepared) with a bearer token, replaying
/// once on 401/403 when the body was kept.
pub(crate) async fn send(
    ctx: Ctx<'_>,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<Response<upstream::VendorBody>, RuleError> {
    let token = fetch_token(&ctx).await?;
    // A body is kept only when its length is known, within the replay limit, and within the
    // proxy's body budget; otherwise it streams.
    let held = body
        .size_hint()
        .exact()
        .filter(|n| *n <= ctx.replay_limit as u64)
        .and_then(|n| ctx.budget.reserve(n).ok());
    // `held` lives to the end of this function: the body may be replayed until then.
    let bytes: Bytes = match held {
        Some(_) => {
            let read = Limited::new(body, ctx.replay_limit).collect();
            tokio::time::timeout_at(ctx.deadline, read)
                .await
                .map_err(|_| upstream_failed(&ctx, upstream::UpstreamError::Timeout))?
                .map_err(|_| crate::budget::BudgetError::Read)?
                .to_bytes()
        }
        _ => {
            // Too big or of unknown length to keep: stream it, no replay.
            let req = with_token(parts, Either::Left(body), &token);
            let resp = forward(&ctx, req).await?;
            if refused(resp.status()) {
                ctx.tokens.refused(ctx.creds, &token);
            }
            return Ok(resp);
        }
    };
    let (method, uri, version, headers) = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.version,
        parts.headers.clone(),
    );
    let req = with_token(parts, full_body(bytes.clone()), &token);
    let resp = forward(&ctx, req).await?;
    if !refused(resp.status()) {
        return Ok(resp);
    }
    ctx.tokens.refused(ctx.creds, &token);
    let fresh = fetch_token(&ctx).await?;
    if Arc::ptr_eq(&fresh, &token) {
        // The broker kept the token (it dropped one for this credential moments ago, so
        // the refusal is likely not about the token): resending the same request would
        // only be refused again.
        return Ok(resp);
    }
    drop(resp);
    super::broker::record_replay();
    let mut retry = Request::new(full_body(bytes));
    *retry.method_mut() = method;
    *retry.uri_mut() = uri;
    *retry.version_mut() = version;
    *retry.headers_mut() = headers;
    let (parts, body) = retry.into_parts();
    let req = with_token(parts, body, &fresh);
    let resp = forward(&ctx, req).await?;
    if refused(resp.status()) {
        ctx.tokens.refused(ctx.creds, &fresh);
    }
    Ok(resp)
}

fn refused(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

async fn fetch_token(ctx: &Ctx<'_>) -> Result<BearerToken, RuleError> {
    let token = ctx.tokens.token(ctx.creds);
    // A cached token is ready at once: the deadline's timer is only armed for a wait.
    let token = match ctx.trace {
        None => tokio::time::timeout_at(ctx.deadline, token).await,
        Some(trace) => tokio::time::timeout_at(ctx.deadline, trace.token_exchange(token)).await,
    };
    token
        .map_err(|_| upstream_failed(ctx, upstream::UpstreamError::Timeout))?
        .map_err(|e| RuleError::TokenExchange(e.message))
}

/// Reaching m3ter failed, or the proxied request's deadline passed while waiting here.
fn upstream_failed(ctx: &Ctx<'_>, source: upstream::UpstreamError) -> RuleError {
    RuleError::Upstream {
        vendor: super::VENDOR,
        host: ctx.host.to_owned(),
        source,
    }
}

fn with_token(
    parts: http::request::Parts,
    body: upstream::Body,
    token: &BearerToken,
) -> Request<upstream::Body> {
    let mut req = Request::from_parts(parts, body);
    req.headers_mut()
        .insert(AUTHORIZATION, token.header().clone());
    req
}

async fn forward(
    ctx: &Ctx<'_>,
    req: Request<upstream::Body>,
) -> Result<Response<upstream::VendorBody>, RuleError> {
    crate::telemetry::send(ctx.client, ctx.trace, super::VENDOR, req, ctx.deadline)
        .await
        .map_err(|source| upstream_failed(ctx, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RefusalCode as _;

    fn creds() -> M3terCreds {
        crate::vendors::m3ter::test_creds("k", "s")
    }

    fn check(method: &Method, path: &str, creds: &M3terCreds) -> Result<Action, RuleError> {
        super::check(method, CanonicalPath::new(path)?, creds)
    }

    #[test]
    fn org_check() {
        let c = creds();
        assert_eq!(
            check(
                &Method::GET,
                "/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters",
                &c
            )
            .unwrap(),
            Action::Forward
        );
        assert_eq!(
            check(
                &Method::GET,
                "/organizations/0C2A1D53-5A44-4C1A-9F7E-3F7CC1D7E0AA",
                &c
            )
            .unwrap(),
            Action::Forward
        );
        assert_eq!(
            check(&Method::GET, "/organizations/other/meters", &c)
                .unwrap_err()
                .code(),
            "org_mismatch"
        );
        for p in ["/organizations", "/organizations/"] {
            assert_eq!(
                check(&Method::GET, p, &c).unwrap_err().code(),
                "org_mismatch"
            );
        }
        assert_eq!(
            check(&Method::POST, "/oauth/token", &c).unwrap(),
            Action::LocalToken
        );
        assert_eq!(
            check(&Method::GET, "/oauth/token", &c).unwrap(),
            Action::Forward
        );
    }

    #[test]
    fn org_check_cannot_be_bypassed() {
        // Issue 10, finding 4: each of these was forwarded with the tenant's token although
        // m3ter reads another organisation (or may) in it.
        let other = "11111111-2222-3333-4444-555555555555";
        let own = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
        for p in [
            format!("//organizations/{other}/meters"),
            format!("/organizations;x=1/{other}/meters"),
            format!("/organizations/{own};/../{other}/meters"),
            format!("/organizations/{own}/..;/..;/organizations/{other}/meters"),
            format!("/organizations/{own}/..%2f..%2forganizations/{other}/meters"),
            format!("/%6Frganizations/{other}/meters"),
            format!("/Organizations/{other}/meters"),
            format!("/ORGANIZATIONS/{own}/meters"),
            "/organizations/%30c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters".to_owned(),
        ] {
            assert_eq!(
                check(&Method::GET, &p, &creds()).unwrap_err().code(),
                "bad_request",
                "{p}"
            );
        }
    }
}
