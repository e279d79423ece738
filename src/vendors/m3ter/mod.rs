//! m3ter: bearer tokens from the client-credentials exchange.
//!
//! The data plane asks a [`TokenSource`] for a token per request and tells it when m3ter
//! refused one; the token broker behind it caches, single-flights and refreshes.
//!
//! - [`broker`]: [`broker::TokenBroker`], the [`TokenSource`] with cache, refresh and backoff.
//! - [`exchange`]: the client-credentials exchange on the wire, behind [`exchange::Exchange`].
//! - [`client`]: the exchange's POST over the upstream client, and `TestTenant`.
//! - [`rule`]: the data plane's side: injection, organisation check, replay on refusal.

pub mod broker;
pub mod client;
pub mod exchange;
pub(crate) mod rule;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::request::Parts;
use http::{HeaderValue, Response};
use hyper::body::Incoming;
use zeroize::Zeroizing;

use super::{BodyRule, Plan, RuleError, RuleInput, SendContext, TestOutcome, Vendor, Via};
use crate::secret::Secret;
use crate::tenants::{EffectiveTenant, M3terCreds, VendorKind};
use crate::upstream;

/// The vendor's name: its `vendor` metrics label and log field.
pub const VENDOR: &str = "m3ter";

/// The formats of m3ter's credential fields, as the credential schema
/// (`crate::model::M3terConn`) checks them on every write. A leaf (it imports only
/// [`crate::syntax`]), so the model can name it without importing the data plane.
pub mod fields {
    use crate::syntax::{is_dns_label, is_uuid, problem};

    /// Longest accepted access key ID, in bytes.
    pub const MAX_ACCESS_KEY_ID_LEN: usize = 256;

    /// It is the user part of HTTP Basic credentials, where ':' ends it.
    pub fn access_key_id(s: &str) -> Result<(), String> {
        if s.len() <= MAX_ACCESS_KEY_ID_LEN && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        {
            Ok(())
        } else {
            Err(format!(
                "must be at most {MAX_ACCESS_KEY_ID_LEN} visible ASCII characters, without ':' or spaces"
            ))
        }
    }

    pub fn api_secret(_: &str) -> Result<(), String> {
        Ok(())
    }

    pub fn org_id(s: &str) -> Result<(), String> {
        problem(is_uuid(s), "must be a UUID (8-4-4-4-12 hex digits)")
    }

    /// It names the hosts `api.<env>.m3ter.com` and `ingest.<env>.m3ter.com`.
    pub fn environment(s: &str) -> Result<(), String> {
        problem(
            is_dns_label(s),
            "must be empty, \"prod\", or a DNS label (lower-case letters, digits, '-')",
        )
    }
}

/// m3ter as the proxy sees it: prefixes `/m3ter` (the tenant's API host) and `/m3ter-ingest`
/// (its ingest host), whose names depend on the tenant's environment; requests get a bearer
/// token from the [`TokenSource`] and are replayed once when m3ter refuses it.
pub struct M3ter {
    tokens: Arc<dyn TokenSource>,
}

impl M3ter {
    /// Indexes into [`Vendor::prefixes`].
    const API: usize = 0;
    const INGEST: usize = 1;

    pub fn new(tokens: Arc<dyn TokenSource>) -> Self {
        Self { tokens }
    }

    fn creds(tenant: &EffectiveTenant) -> Result<&M3terCreds, RuleError> {
        tenant.m3ter.as_ref().ok_or(RuleError::NotConfigured)
    }
}

impl Vendor for M3ter {
    fn name(&self) -> &'static str {
        VENDOR
    }

    fn kind(&self) -> Option<VendorKind> {
        Some(VendorKind::M3ter)
    }

    fn prefixes(&self) -> &'static [&'static str] {
        // Indexed by `M3ter::API` and `M3ter::INGEST`.
        &["m3ter", "m3ter-ingest"]
    }

    /// `api.….m3ter.com` and `ingest.….m3ter.com`: some environment's hosts; whether they
    /// are the tenant's is `upstream_host`'s question.
    fn owns_host(&self, host: &str) -> bool {
        const SUFFIX: &str = ".m3ter.com";
        if host.len() <= SUFFIX.len() {
            return false;
        }
        let (front, suffix) = host.split_at(host.len() - SUFFIX.len());
        let first = front.split('.').next().unwrap_or("");
        suffix.eq_ignore_ascii_case(SUFFIX)
            && (first.eq_ignore_ascii_case("api") || first.eq_ignore_ascii_case("ingest"))
    }

    fn dns_suffixes(&self) -> &'static [&'static str] {
        &["m3ter.com"]
    }

    fn upstream_host<'t>(
        &self,
        via: Via<'_>,
        tenant: &'t EffectiveTenant,
    ) -> Result<&'t str, RuleError> {
        let creds = Self::creds(tenant)?;
        match via {
            Via::Prefix(Self::API) => Ok(&creds.api_host),
            Via::Prefix(Self::INGEST) => Ok(&creds.ingest_host),
            Via::Prefix(_) => Err(RuleError::malformed("unroutable request")),
            Via::Host(host) if host.eq_ignore_ascii_case(&creds.api_host) => Ok(&creds.api_host),
            Via::Host(host) if host.eq_ignore_ascii_case(&creds.ingest_host) => {
                Ok(&creds.ingest_host)
            }
            Via::Host(host) => Err(RuleError::HostNotAllowed(host.to_owned())),
        }
    }

    fn plan(&self, req: RuleInput<'_>, tenant: &EffectiveTenant) -> Result<Plan, RuleError> {
        let body = match rule::check(req.method, req.path, Self::creds(tenant)?)? {
            rule::Action::LocalToken => BodyRule::Local(rule::placeholder_response()),
            rule::Action::Forward => BodyRule::Send,
        };
        Ok(Plan {
            path_and_query: None,
            body,
        })
    }

    fn send<'a>(
        &'a self,
        cx: SendContext<'a>,
        parts: Parts,
        body: Incoming,
    ) -> BoxFuture<'a, Result<Response<upstream::VendorBody>, RuleError>> {
        // Boxed: token exchange and replay make a large state machine that the other
        // vendors' requests need not carry.
        Box::pin(async move {
            let ctx = rule::Ctx {
                client: cx.client,
                tokens: self.tokens.as_ref(),
                creds: Self::creds(cx.tenant)?,
                host: cx.host,
                replay_limit: cx.replay_limit,
                budget: cx.budget,
                deadline: cx.deadline,
                trace: cx.trace,
            };
            rule::send(ctx, parts, body).await
        })
    }

    fn test<'a>(
        &'a self,
        client: &'a upstream::Client,
        tenant: &'a EffectiveTenant,
    ) -> BoxFuture<'a, TestOutcome> {
        Box::pin(async move {
            match &tenant.m3ter {
                Some(creds) => client::test(client, self.tokens.as_ref(), creds).await,
                None => TestOutcome::not_configured(VendorKind::M3ter),
            }
        })
    }
}

/// A bearer token as handed to requests. Compared by identity (`Arc::ptr_eq`) so that a
/// refusal drops only the token that was refused, not one a concurrent refresh put in its
/// place.
pub type BearerToken = Arc<Bearer>;

/// A bearer token m3ter issued, kept only as its `Authorization: Bearer …` value, made once
/// when the token is issued rather than formatted and checked on every request: each request
/// takes a reference to the same bytes, which are zeroed when the last request using them is
/// done.
pub struct Bearer {
    header: HeaderValue,
}

/// What precedes the token in the header's value.
const BEARER_PREFIX: &[u8] = b"Bearer ";

impl Bearer {
    /// `None` if the token cannot be carried in a header (m3ter's are JWTs, which can).
    pub fn new(token: Secret) -> Option<Self> {
        let token = token.expose().as_bytes();
        let mut value = Zeroizing::new(Vec::with_capacity(BEARER_PREFIX.len() + token.len()));
        value.extend_from_slice(BEARER_PREFIX);
        value.extend_from_slice(token);
        let mut header = HeaderValue::from_maybe_shared(Bytes::from_owner(value)).ok()?;
        header.set_sensitive(true);
        Some(Self { header })
    }

    /// The `Authorization` value, marked sensitive (never indexed by HPACK, redacted in
    /// `Debug`).
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The plain token, for tests to compare.
    #[cfg(test)]
    pub(crate) fn expose(&self) -> &str {
        std::str::from_utf8(&self.header.as_bytes()[BEARER_PREFIX.len()..]).unwrap()
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

/// Why no token could be had; the proxy answers 502 `token_exchange_failed` with `message`.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct TokenError {
    /// A human sentence naming m3ter's status when there was one; never a secret.
    pub message: String,
}

#[async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// A valid bearer token for `creds`, exchanging one if none is cached.
    async fn token(&self, creds: &M3terCreds) -> Result<BearerToken, TokenError>;

    /// m3ter answered 401 or 403 to a request carrying `token`: forget it, unless it was
    /// already replaced.
    fn refused(&self, creds: &M3terCreds, token: &BearerToken);
}

/// Production m3ter credentials for unit tests.
#[cfg(test)]
pub(crate) fn test_creds(access_key_id: &str, secret: &str) -> M3terCreds {
    M3terCreds::new(
        access_key_id.into(),
        Secret::new(secret),
        "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa".into(),
        String::new(),
    )
}
