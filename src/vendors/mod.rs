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
