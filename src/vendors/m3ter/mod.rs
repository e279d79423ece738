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

use crate::secret::Secret;
use crate::tenants::M3terCreds;

/// A bearer token as handed to requests. Compared by identity (`Arc::ptr_eq`) so that a
/// refusal drops only the token that was refused, not one a concurrent refresh put in its
/// place.
pub type BearerToken = Arc<Secret>;

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
    let (api_host, ingest_host) = crate::tenants::effective::m3ter_hosts("");
    M3terCreds {
        access_key_id: access_key_id.into(),
        api_secret: Secret::new(secret),
        org_id: "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa".into(),
        environment: String::new(),
        api_host,
        ingest_host,
    }
}
