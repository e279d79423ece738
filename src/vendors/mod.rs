//! One module per vendor's injection rule. Each knows its hosts, its paths and where its
//! credential goes on the wire; none knows about listeners or connection pools.

pub mod error;
pub mod m3ter;
pub mod mailkit;
pub mod miradore;
pub mod path;

pub use error::RuleError;

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

/// Makes `TestTenant`'s one harmless authenticated call per vendor.
#[async_trait::async_trait]
pub trait VendorTester: Send + Sync + 'static {
    async fn test(
        &self,
        tenant: &crate::tenants::EffectiveTenant,
        vendor: crate::tenants::VendorKind,
    ) -> TestOutcome;
}

/// The real tester: the vendors' own test calls over the upstream client.
pub struct Tester {
    pub client: crate::upstream::Client,
    pub tokens: std::sync::Arc<dyn m3ter::TokenSource>,
}

#[async_trait::async_trait]
impl VendorTester for Tester {
    async fn test(
        &self,
        tenant: &crate::tenants::EffectiveTenant,
        vendor: crate::tenants::VendorKind,
    ) -> TestOutcome {
        use crate::tenants::VendorKind;
        let not_configured = || TestOutcome {
            ok: false,
            http_status: 0,
            message: format!("the tenant has no {} connection", vendor.as_str()),
        };
        match vendor {
            VendorKind::Miradore => match &tenant.miradore {
                Some(c) => miradore::test(&self.client, c).await,
                None => not_configured(),
            },
            VendorKind::Mailkit => match &tenant.mailkit {
                Some(c) => mailkit::test(&self.client, c).await,
                None => not_configured(),
            },
            VendorKind::M3ter => match &tenant.m3ter {
                Some(c) => m3ter::client::test(&self.client, self.tokens.as_ref(), c).await,
                None => not_configured(),
            },
        }
    }
}
