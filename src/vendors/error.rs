//! Why a vendor rule did not forward a request, as causes. The rules never build the proxy's
//! response: `proxy::error` maps each cause once to the documented status, code and message.
//! Like every refusal, these carry only names the app sent or that are not credentials.

use std::borrow::Cow;

use super::path::NotCanonical;
use crate::budget::BudgetError;
use crate::upstream::UpstreamError;

/// A vendor rule's refusal or failure.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The request or its body is not something the vendor's API accepts as written.
    #[error("{0}")]
    Malformed(Cow<'static, str>),
    /// A path this vendor does not serve.
    #[error("{0}")]
    UnknownRoute(&'static str),
    /// The host named in absolute-form is not one of the tenant's hosts for this vendor.
    #[error("host {0:?} is not one of this tenant's vendor hosts")]
    HostNotAllowed(String),
    /// The tenant has no credentials for this vendor (the proxy checks this first, so only
    /// a rule and the proxy disagreeing can produce it).
    #[error("the tenant has no connection for this vendor")]
    NotConfigured,
    /// The request names a Miradore site other than the tenant's.
    #[error("the request names Miradore site {0:?}, which is not this tenant's site")]
    SiteMismatch(String),
    /// The request names an m3ter organisation other than the tenant's.
    #[error("the request names m3ter organisation {0:?}, which is not this tenant's organisation")]
    OrgMismatch(String),
    /// No usable access token could be had for the tenant's credentials.
    #[error("token exchange failed: {0}")]
    TokenExchange(String),
    /// The call to the vendor itself failed.
    #[error("could not reach {host}: {source}")]
    Upstream {
        vendor: &'static str,
        host: String,
        #[source]
        source: UpstreamError,
    },
    /// The body could not be taken into memory.
    #[error(transparent)]
    Body(#[from] BudgetError),
    /// The path is not canonical.
    #[error(transparent)]
    Path(#[from] NotCanonical),
}

impl RuleError {
    pub(crate) fn malformed(msg: impl Into<Cow<'static, str>>) -> Self {
        RuleError::Malformed(msg.into())
    }
}
