//! The vendors sidekey injects credentials for. Each vendor is one module implementing
//! [`Vendor`]: its name, its origin-form prefixes, its hosts (including ones that depend on
//! the tenant's environment), the check and injection of its request rule, what it does
//! when the vendor refuses (m3ter's re-exchange and replay), and its `TestTenant` call. The
//! proxy asks the [`Registry`] and never matches on a vendor; vendors know nothing of
//! listeners, connection pools or the proxy's error responses (they return [`RuleError`]).
//!
//! Adding a vendor: docs/adding-a-vendor.md.

pub mod error;
pub mod m3ter;
pub mod mailkit;
pub mod miradore;
pub mod path;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::request::Parts;
use http::{HeaderMap, Method, Response};
use http_body_util::Full;
use hyper::body::Incoming;

pub use error::RuleError;
use path::CanonicalPath;

use crate::budget::BodyBudget;
use crate::tenants::{EffectiveTenant, VendorKind};
use crate::upstream;

/// How a request names its vendor endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via<'a> {
    /// Origin-form: the prefix at this index of [`Vendor::prefixes`].
    Prefix(usize),
    /// Forward-proxy form: an absolute-form host the vendor claimed in [`Vendor::owns_host`],
    /// as the app wrote it.
    Host(&'a str),
}

/// The request as a rule checks it: the path the vendor will see (prefix removed).
#[derive(Clone, Copy, Debug)]
pub struct RuleInput<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub path: CanonicalPath<'a>,
    pub query: Option<&'a str>,
}

/// A rule's decision, made before the request is taken apart.
#[derive(Debug)]
pub struct Plan {
    /// The path and query to send instead of the app's, when the rule rewrites them.
    pub path_and_query: Option<String>,
    /// What happens to the body.
    pub body: BodyRule,
}

/// What the proxy does with a planned request.
#[derive(Debug)]
pub enum BodyRule {
    /// The credentials go in the URI or headers ([`Vendor::inject`]); the body streams.
    Stream,
    /// The body is read into memory within the body budget and rewritten by
    /// [`Vendor::rewrite_body`].
    Rewrite,
    /// The vendor sends the request itself ([`Vendor::send`]), e.g. to add a token it must
    /// first obtain and to replay the request when the token is refused.
    Send,
    /// sidekey answers with this response and calls no vendor.
    Local(Response<Full<Bytes>>),
}

/// What [`Vendor::send`] may use besides the request.
pub struct SendContext<'a> {
    pub client: &'a upstream::Client,
    pub tenant: &'a EffectiveTenant,
    /// The host the request is addressed to.
    pub host: &'a str,
    /// Largest body kept in memory for a replay (`ProxyConfig::replay_body_limit`).
    pub replay_limit: usize,
    /// Bodies kept for replay are held within this budget.
    pub budget: &'a BodyBudget,
    /// The proxied request's deadline: every wait of the send (token, body, vendor) ends by
    /// it, with `UpstreamError::Timeout` (504 `upstream_timeout`).
    pub deadline: tokio::time::Instant,
    /// The request's trace, when tracing is on: vendor calls and token waits become its
    /// child spans.
    pub trace: Option<&'a crate::telemetry::RequestTrace>,
}

/// The verdict of `TestTenant`: one harmless authenticated call to the vendor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// The vendor accepted the credentials.
    pub ok: bool,
    /// The vendor's HTTP status, 0 when none was received.
    pub http_status: u16,
    /// A human sentence; never contains a secret.
    pub message: String,
}

impl TestOutcome {
    /// The outcome for a tenant without a connection to `vendor`.
    pub fn not_configured(vendor: VendorKind) -> Self {
        TestOutcome {
            ok: false,
            http_status: 0,
            message: format!("the tenant has no {} connection", vendor.as_str()),
        }
    }
}

/// One vendor's knowledge. The data-plane methods are called in this order, each only when
/// the previous one succeeded: [`owns_host`](Vendor::owns_host) or a prefix match, then
/// (once the tenant is known to have this vendor) [`upstream_host`](Vendor::upstream_host),
/// [`plan`](Vendor::plan), and per [`Plan::body`] one of [`inject`](Vendor::inject),
/// [`rewrite_body`](Vendor::rewrite_body) or [`send`](Vendor::send).
pub trait Vendor: Send + Sync + 'static {
    /// The name in metrics labels, logs and refusals (`mailkit`).
    fn name(&self) -> &'static str;

    /// The vendor whose per-tenant credentials the control plane stores under this kind;
    /// `None` for a vendor that keeps none (a static header, say).
    fn kind(&self) -> Option<VendorKind> {
        None
    }

    /// Whether `tenant` may use this vendor (step 6 of the routing order): by default,
    /// whether it has credentials of [`Vendor::kind`].
    fn configured(&self, tenant: &EffectiveTenant) -> bool {
        self.kind().is_some_and(|kind| tenant.has(kind))
    }

    /// Origin-form path prefixes without slashes (`miradore` for `/miradore/...`).
    fn prefixes(&self) -> &'static [&'static str];

    /// Whether `host` (as sent in absolute-form on port 80 or 443) is one of this vendor's
    /// hosts for some tenant. Compared case-insensitively.
    fn owns_host(&self, host: &str) -> bool;

    /// The DNS names every host [`owns_host`](Vendor::owns_host) claims lives under (the name
    /// itself or a subdomain of it). `sidekey ca init` permits exactly these in the
    /// interception CA's name constraints, so a vendor with none cannot be intercepted with
    /// such a CA. Default: none.
    fn dns_suffixes(&self) -> &'static [&'static str] {
        &[]
    }

    /// The host to dial for `tenant`, which has this vendor: the canonical spelling of one of
    /// its hosts, or [`RuleError::HostNotAllowed`] / a vendor-specific refusal.
    fn upstream_host<'t>(
        &self,
        via: Via<'_>,
        tenant: &'t EffectiveTenant,
    ) -> Result<&'t str, RuleError>;

    /// Checks the request against `tenant`'s credentials and decides how it is sent.
    fn plan(&self, req: RuleInput<'_>, tenant: &EffectiveTenant) -> Result<Plan, RuleError>;

    /// [`BodyRule::Stream`]: puts the credentials in the headers; `parts.uri` is final and
    /// hop-by-hop headers are already gone.
    fn inject(&self, parts: &mut Parts, tenant: &EffectiveTenant) -> Result<(), RuleError> {
        let _ = (parts, tenant);
        Ok(())
    }

    /// [`BodyRule::Rewrite`]: the body to send in place of `body`.
    fn rewrite_body(
        &self,
        parts: &Parts,
        body: &[u8],
        tenant: &EffectiveTenant,
    ) -> Result<Vec<u8>, RuleError> {
        let _ = (parts, body, tenant);
        Err(RuleError::malformed(
            "this vendor's bodies are not rewritten",
        ))
    }

    /// [`BodyRule::Send`]: sends the request (URI final, hop-by-hop headers gone) and
    /// handles the vendor's refusals.
    fn send<'a>(
        &'a self,
        cx: SendContext<'a>,
        parts: Parts,
        body: Incoming,
    ) -> BoxFuture<'a, Result<Response<upstream::VendorBody>, RuleError>> {
        let _ = (cx, parts, body);
        Box::pin(async { Err(RuleError::malformed("this vendor sends no requests itself")) })
    }

    /// `TestTenant`: one harmless authenticated call with `tenant`'s credentials.
    fn test<'a>(
        &'a self,
        client: &'a upstream::Client,
        tenant: &'a EffectiveTenant,
    ) -> BoxFuture<'a, TestOutcome>;
}

/// Every vendor sidekey serves, in a fixed order (the metrics tables follow it).
///
/// A vendor that keeps no per-tenant credentials can be added to a registry from outside
/// ([`Registry::with_vendor`], then `proxy::Proxy::with_vendors`); tests/fourth_vendor.rs
/// does so end to end.
pub struct Registry {
    vendors: Box<[Box<dyn Vendor>]>,
}

impl Registry {
    /// The vendors of this build; m3ter gets its tokens from `tokens`.
    pub fn new(tokens: Arc<dyn m3ter::TokenSource>) -> Self {
        Self::with(vec![
            Box::new(miradore::Miradore),
            Box::new(m3ter::M3ter::new(tokens)),
            Box::new(mailkit::Mailkit),
        ])
    }

    /// This build's vendors, with an m3ter whose token exchange always fails.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        struct NoTokens;
        #[async_trait::async_trait]
        impl m3ter::TokenSource for NoTokens {
            async fn token(
                &self,
                _: &crate::tenants::M3terCreds,
            ) -> Result<m3ter::BearerToken, m3ter::TokenError> {
                Err(m3ter::TokenError {
                    message: "no tokens in this test".to_owned(),
                })
            }
            fn refused(&self, _: &crate::tenants::M3terCreds, _: &m3ter::BearerToken) {}
        }
        Self::new(Arc::new(NoTokens))
    }

    fn with(vendors: Vec<Box<dyn Vendor>>) -> Self {
        Self {
            vendors: vendors.into_boxed_slice(),
        }
    }

    /// This registry with `vendor` added after the others.
    pub fn with_vendor(self, vendor: Box<dyn Vendor>) -> Self {
        let mut vendors = self.vendors.into_vec();
        vendors.push(vendor);
        Self::with(vendors)
    }

    /// The vendors, by index.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Vendor> {
        self.vendors.iter().map(|v| v.as_ref())
    }

    /// The vendor at `index`.
    pub fn get(&self, index: usize) -> Option<&dyn Vendor> {
        self.vendors.get(index).map(|v| v.as_ref())
    }

    /// The vendor of `kind`.
    pub fn by_kind(&self, kind: VendorKind) -> Option<&dyn Vendor> {
        self.iter().find(|v| v.kind() == Some(kind))
    }

    /// The vendor whose origin-form prefix is `prefix`, with the prefix's index.
    pub fn by_prefix(&self, prefix: &str) -> Option<(usize, usize)> {
        self.vendors.iter().enumerate().find_map(|(i, v)| {
            v.prefixes()
                .iter()
                .position(|p| *p == prefix)
                .map(|p| (i, p))
        })
    }

    /// The vendor that owns the absolute-form `host`.
    pub fn by_host(&self, host: &str) -> Option<usize> {
        self.vendors.iter().position(|v| v.owns_host(host))
    }

    /// The DNS suffixes of every vendor ([`Vendor::dns_suffixes`]), in registry order.
    pub fn dns_suffixes(&self) -> Vec<&'static str> {
        self.iter()
            .flat_map(|v| v.dns_suffixes().iter().copied())
            .collect()
    }

    /// Every prefix, as `/p/` listed for a refusal message.
    pub fn prefix_list(&self) -> String {
        let all: Vec<String> = self
            .iter()
            .flat_map(|v| v.prefixes().iter().map(|p| format!("/{p}/")))
            .collect();
        match all.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            Some((last, _)) => last.clone(),
            None => String::new(),
        }
    }
}

/// Makes `TestTenant`'s one harmless authenticated call per vendor.
#[async_trait::async_trait]
pub trait VendorTester: Send + Sync + 'static {
    async fn test(&self, tenant: &EffectiveTenant, vendor: VendorKind) -> TestOutcome;
}

/// The real tester: each vendor's own test call over the upstream client.
pub struct Tester {
    pub client: upstream::Client,
    pub tokens: Arc<dyn m3ter::TokenSource>,
}

#[async_trait::async_trait]
impl VendorTester for Tester {
    async fn test(&self, tenant: &EffectiveTenant, vendor: VendorKind) -> TestOutcome {
        if !tenant.has(vendor) {
            return TestOutcome::not_configured(vendor);
        }
        let registry = Registry::new(self.tokens.clone());
        match registry.by_kind(vendor) {
            Some(v) => v.test(&self.client, tenant).await,
            None => TestOutcome::not_configured(vendor),
        }
    }
}
