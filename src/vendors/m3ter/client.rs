//! m3ter over the upstream client: the token POST behind [`HttpExchange`], and `TestTenant`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};

use super::exchange::{ExchangeFailure, MAX_RESPONSE_BYTES, TokenPost};
use super::{TokenSource, broker};
use crate::tenants::M3terCreds;
use crate::upstream;
use crate::vendors::TestOutcome;

#[async_trait::async_trait]
impl TokenPost for upstream::Client {
    async fn post(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ExchangeFailure> {
        let response = self
            .send(request.map(upstream::full_body))
            .await
            .map_err(|e| {
                // Counted like a data call's failure, with the same `kind`.
                e.record(super::VENDOR);
                ExchangeFailure::Transport {
                    reason: e.to_string(),
                }
            })?;
        let (parts, body) = response.into_parts();
        // A token response is small; anything past the bound is not one.
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ExchangeFailure::Transport {
                reason: format!("reading the token response failed: {e}"),
            })?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// `TestTenant` for m3ter: a token from `tokens` (a real exchange unless one is cached),
/// then one read of the organisation's configuration.
pub async fn test(
    client: &upstream::Client,
    tokens: &dyn TokenSource,
    creds: &M3terCreds,
) -> TestOutcome {
    let fail = |status: u16, message: String| TestOutcome {
        ok: false,
        http_status: status,
        message,
    };
    let token = match tokens.token(creds).await {
        Ok(t) => t,
        Err(e) => return fail(0, e.message),
    };
    let req = Request::get(format!(
        "https://{}/organizations/{}/organizationconfig",
        creds.api_host, creds.org_id
    ))
    .header(http::header::AUTHORIZATION, token.header().clone())
    .body(upstream::empty_body());
    let req = match req {
        Ok(r) => r,
        Err(_) => return fail(0, "cannot build the test request".into()),
    };
    match client.send(req).await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                TestOutcome {
                    ok: true,
                    http_status: status.as_u16(),
                    message: "m3ter issued a token and the organisation answered".into(),
                }
            } else {
                if matches!(status.as_u16(), 401 | 403) {
                    tokens.refused(creds, &token);
                }
                fail(
                    status.as_u16(),
                    format!(
                        "m3ter issued a token but refused reading organisation {} with HTTP {}",
                        creds.org_id,
                        status.as_u16()
                    ),
                )
            }
        }
        Err(e) => fail(0, format!("could not reach m3ter: {e}")),
    }
}

/// Registers the m3ter metrics' help texts.
pub fn describe_metrics() {
    broker::describe_metrics();
}
