//! The m3ter client-credentials exchange: what goes on the wire and how the answer is read.
//!
//! The broker depends only on the [`Exchange`] trait so it can be tested with a fake. The real
//! exchange is [`HttpExchange`], a thin wrapper that builds the request with
//! [`token_request`], hands it to a [`TokenPost`] (implemented by the data plane's upstream
//! client, so `--connect-to`, TLS roots and timeouts are the same as for data calls) and reads
//! the answer with [`parse_token_response`]. Both functions are pure and tested here.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::Bearer;
use crate::secret::Secret;
use crate::tenants::M3terCreds;

/// Path of the token endpoint on the tenant's m3ter API host.
pub const TOKEN_PATH: &str = "/oauth/token";

/// The request body. JSON, as the official SDKs send it (the form-encoded variant of the docs'
/// curl example is accepted too, but JSON is what m3ter's own clients exercise).
pub const TOKEN_REQUEST_BODY: &str = r#"{"grant_type":"client_credentials"}"#;

/// Largest token response [`TokenPost`] implementations should read: 64 KiB. A real answer
/// is a JWT of about 1 KiB; anything far larger is not a token response and is cut off
/// rather than buffered.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A token as m3ter issued it.
#[derive(Debug)]
pub struct IssuedToken {
    /// The bearer token (a JWT); redacted in `Debug`.
    pub token: Bearer,
    /// Lifetime m3ter announced, counted from when it answered (m3ter: 18,000 s, 5 hours).
    pub expires_in: Duration,
}

/// Why an exchange produced no token. `Display` is the sentence the proxy shows in its 502
/// `token_exchange_failed` answer: it names m3ter's status when there was one and never
/// contains the API secret, the Basic credential or anything from the response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeFailure {
    /// m3ter answered with a non-2xx status (401/403: wrong access key or secret; 429:
    /// throttled).
    #[error("m3ter refused the token exchange with HTTP {status}")]
    Refused {
        status: u16,
        /// m3ter's `Retry-After` in seconds, when it sent one; the broker backs off at least
        /// this long (still bounded by its maximum backoff).
        retry_after: Option<Duration>,
    },
    /// m3ter answered 2xx but not with a usable bearer token.
    #[error("m3ter answered the token exchange with an unusable response: {reason}")]
    Malformed { reason: &'static str },
    /// Connect, TLS or protocol failure toward m3ter; `reason` comes from the transport and
    /// must not contain request headers.
    #[error("could not reach m3ter for the token exchange: {reason}")]
    Transport { reason: String },
    /// The credentials cannot be put into a request (for example an access key ID with a
    /// `:`, which Basic authentication cannot carry).
    #[error("the m3ter credentials cannot be sent: {reason}")]
    InvalidCredentials { reason: &'static str },
    /// The exchange did not finish within the broker's exchange timeout.
    #[error("m3ter did not answer the token exchange within {}s", after.as_secs())]
    TimedOut { after: Duration },
    /// The exchange task stopped without an answer (it panicked or was cancelled).
    #[error("the token exchange with m3ter stopped without an answer")]
    Abandoned,
}

/// Exchanges a tenant's access key ID and API secret for a bearer token.
#[async_trait]
pub trait Exchange: Send + Sync + 'static {
    async fn exchange(&self, creds: &M3terCreds) -> Result<IssuedToken, ExchangeFailure>;
}

/// Sends one request to m3ter and returns its response with the body read (at most
/// [`MAX_RESPONSE_BYTES`]). Implemented over the data plane's upstream client after merge.
#[async_trait]
pub trait TokenPost: Send + Sync + 'static {
    /// Failures to connect or to read the answer are [`ExchangeFailure::Transport`]; any HTTP
    /// status, 2xx or not, is a response.
    async fn post(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ExchangeFailure>;
}

/// The real exchange: [`token_request`], one POST, [`parse_token_response`].
pub struct HttpExchange<P> {
    post: P,
}

impl<P: TokenPost> HttpExchange<P> {
    pub fn new(post: P) -> Self {
        Self { post }
    }
}

#[async_trait]
impl<P: TokenPost> Exchange for HttpExchange<P> {
    async fn exchange(&self, creds: &M3terCreds) -> Result<IssuedToken, ExchangeFailure> {
        let request = token_request(creds)?;
        let response = self.post.post(request).await?;
        parse_token_response(response.status(), response.headers(), response.body())
    }
}

/// `POST https://<api_host>/oauth/token` with `Authorization: Basic base64(id:secret)` and
/// the JSON client-credentials body.
///
/// The `Authorization` value is marked sensitive so HTTP/2 never puts it in the HPACK table
/// and `http`'s `Debug` prints `Sensitive` instead of it.
pub fn token_request(creds: &M3terCreds) -> Result<Request<Bytes>, ExchangeFailure> {
    if creds.access_key_id.contains(':') {
        // RFC 7617: the user-id cannot contain a colon; m3ter would split it wrongly and
        // answer 401, which would be harder to diagnose than this.
        return Err(ExchangeFailure::InvalidCredentials {
            reason: "the access key ID contains ':'",
        });
    }
    // Zeroizing buffers: the plain pair and its encoding are as sensitive as the secret.
    let mut pair = Zeroizing::new(String::with_capacity(
        creds.access_key_id.len() + 1 + creds.api_secret.expose().len(),
    ));
    pair.push_str(&creds.access_key_id);
    pair.push(':');
    pair.push_str(creds.api_secret.expose());
    let mut basic = Zeroizing::new(String::from("Basic "));
    BASE64.encode_string(pair.as_bytes(), &mut basic);
    let mut authorization =
        HeaderValue::from_str(&basic).map_err(|_| ExchangeFailure::InvalidCredentials {
            reason: "the Basic credential is not a valid header value",
        })?;
    authorization.set_sensitive(true);

    let uri = format!("https://{}{TOKEN_PATH}", creds.api_host);
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(AUTHORIZATION, authorization)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .body(Bytes::from_static(TOKEN_REQUEST_BODY.as_bytes()))
        .map_err(|_| ExchangeFailure::InvalidCredentials {
            reason: "the m3ter API host is not a valid URI authority",
        })
}

/// The fields of a token response we read; others (`scope`, ...) are ignored.
#[derive(Deserialize)]
struct TokenResponse {
    token_type: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Reads m3ter's answer: `{"token_type":"Bearer","access_token":"…","expires_in":18000}`.
///
/// Non-2xx is [`ExchangeFailure::Refused`] with its status (and `Retry-After` in seconds if
/// present; the HTTP-date form is ignored). Parse errors are reported by fixed sentences, never
/// by echoing serde's message, which can quote parts of the body.
pub fn parse_token_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<IssuedToken, ExchangeFailure> {
    if !status.is_success() {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(ExchangeFailure::Refused {
            status: status.as_u16(),
            retry_after,
        });
    }
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|_| ExchangeFailure::Malformed {
            reason: "the body is not a JSON token object",
        })?;
    // RFC 6749 §5.1: token_type is case-insensitive. Absent is tolerated (we send it as
    // Bearer regardless); anything else means this is not a token we know how to use.
    if let Some(kind) = &parsed.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(ExchangeFailure::Malformed {
            reason: "token_type is not Bearer",
        });
    }
    let token = match parsed.access_token {
        Some(t) if !t.is_empty() => Secret::new(t),
        _ => {
            return Err(ExchangeFailure::Malformed {
                reason: "access_token is missing or empty",
            });
        }
    };
    // Checked here, once: a token no header can carry is an exchange that failed (and
    // backs off), not a token cached to fail every request.
    let token = Bearer::new(token).ok_or(ExchangeFailure::Malformed {
        reason: "access_token is not a valid header value",
    })?;
    // Without a lifetime we could only guess; m3ter always sends one, so its absence means
    // something else answered.
    let expires_in = match parsed.expires_in {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => {
            return Err(ExchangeFailure::Malformed {
                reason: "expires_in is missing or zero",
            });
        }
    };
    Ok(IssuedToken { token, expires_in })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vendors::m3ter::test_creds as creds;

    #[test]
    fn request_matches_the_wire_format() {
        let req = token_request(&creds("key-id", "s3cr3t")).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().to_string(), "https://api.m3ter.com/oauth/token");
        // base64("key-id:s3cr3t")
        assert_eq!(
            req.headers()[AUTHORIZATION].to_str().unwrap(),
            "Basic a2V5LWlkOnMzY3IzdA=="
        );
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(req.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"grant_type": "client_credentials"})
        );
        // Neither the secret nor its encoding shows in the request's Debug.
        let debug = format!("{req:?}");
        assert!(!debug.contains("s3cr3t") && !debug.contains("a2V5LWlkOnMzY3IzdA"));
    }

    #[test]
    fn request_uses_the_environment_host() {
        let mut c = creds("k", "s");
        c.api_host = "api.staging.m3ter.com".into();
        let req = token_request(&c).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.staging.m3ter.com/oauth/token"
        );
    }

    #[test]
    fn request_refuses_what_basic_auth_cannot_carry() {
        let err = token_request(&creds("a:b", "s")).unwrap_err();
        assert!(matches!(err, ExchangeFailure::InvalidCredentials { .. }));
        let mut c = creds("k", "s");
        c.api_host = "bad host/".into();
        assert!(token_request(&c).is_err());
    }

    #[test]
    fn parses_m3ters_answer() {
        let body = br#"{"token_type":"Bearer","access_token":"eyJ.abc.def","expires_in":18000,"scope":null}"#;
        let t = parse_token_response(StatusCode::OK, &HeaderMap::new(), body).unwrap();
        assert_eq!(t.token.expose(), "eyJ.abc.def");
        assert_eq!(t.token.header(), "Bearer eyJ.abc.def");
        assert!(t.token.header().is_sensitive());
        assert!(!format!("{:?} {t:?}", t.token.header()).contains("eyJ"));
        assert_eq!(t.expires_in, Duration::from_secs(18000));
        // token_type is case-insensitive and may be absent.
        let body = br#"{"token_type":"bearer","access_token":"x","expires_in":60}"#;
        assert!(parse_token_response(StatusCode::OK, &HeaderMap::new(), body).is_ok());
        let body = br#"{"access_token":"x","expires_in":60}"#;
        assert!(parse_token_response(StatusCode::OK, &HeaderMap::new(), body).is_ok());
    }

    #[test]
    fn non_2xx_names_the_status_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let err = parse_token_response(StatusCode::TOO_MANY_REQUESTS, &headers, b"{}").unwrap_err();
        assert_eq!(
            err,
            ExchangeFailure::Refused {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let err =
            parse_token_response(StatusCode::UNAUTHORIZED, &HeaderMap::new(), b"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m3ter refused the token exchange with HTTP 401"
        );
    }

    #[test]
    fn malformed_answers_do_not_echo_the_body() {
        for body in [
            &br#"not json "leaky-token""#[..],
            br#"{"token_type":"MAC","access_token":"leaky-token","expires_in":60}"#,
            br#"{"token_type":"Bearer","access_token":"","expires_in":60}"#,
            br#"{"token_type":"Bearer","access_token":"leaky-token"}"#,
            br#"{"token_type":"Bearer","access_token":"leaky-token","expires_in":0}"#,
            br#"{"token_type":"Bearer","access_token":"leaky-token","expires_in":"soon"}"#,
            br#"{"token_type":"Bearer","access_token":["leaky-token"],"expires_in":60}"#,
            // No header can carry it: refused here, not cached to fail every request.
            br#"{"token_type":"Bearer","access_token":"leaky\r\ntoken","expires_in":60}"#,
        ] {
            let err = parse_token_response(StatusCode::OK, &HeaderMap::new(), body).unwrap_err();
            assert!(matches!(err, ExchangeFailure::Malformed { .. }), "{err:?}");
            assert!(!err.to_string().contains("leaky"));
            assert!(!format!("{err:?}").contains("leaky"));
        }
    }

    struct FakePost;

    #[async_trait]
    impl TokenPost for FakePost {
        async fn post(&self, request: Request<Bytes>) -> Result<Response<Bytes>, ExchangeFailure> {
            assert_eq!(request.uri().path(), TOKEN_PATH);
            Ok(Response::new(Bytes::from_static(
                br#"{"token_type":"Bearer","access_token":"tok","expires_in":18000}"#,
            )))
        }
    }

    #[tokio::test]
    async fn http_exchange_is_build_post_parse() {
        let issued = HttpExchange::new(FakePost)
            .exchange(&creds("k", "s"))
            .await
            .unwrap();
        assert_eq!(issued.token.expose(), "tok");
        assert_eq!(issued.expires_in, Duration::from_secs(18000));
    }
}
