//! One module per vendor's injection rule. Each knows its hosts, its paths and where its
//! credential goes on the wire; none knows about listeners or connection pools.

pub mod m3ter;
pub mod mailkit;
pub mod miradore;

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

/// A tester for builds without upstream access wired in.
pub struct UnavailableTester;

#[async_trait::async_trait]
impl VendorTester for UnavailableTester {
    async fn test(
        &self,
        _tenant: &crate::tenants::EffectiveTenant,
        vendor: crate::tenants::VendorKind,
    ) -> TestOutcome {
        TestOutcome {
            ok: false,
            http_status: 0,
            message: format!("testing {} is not available", vendor.as_str()),
        }
    }
}
