//! Tenants: what an operator configures, what the proxy injects, and the one place writes go
//! through.
//!
//! - [`model`] (re-exported from [`crate::model`], which the store also uses): the records as
//!   stored (connections with blank fields that inherit).
//! - [`validate`]: format rules for every field, as field violations.
//! - [`effective`]: a tenant's connections resolved against the partner defaults.
//! - [`snapshot`]: the immutable map of effective tenants that the data plane reads.
//! - [`catalog`]: applies writes to the store and publishes a new snapshot after each commit.

pub mod catalog;
pub use crate::model;
pub mod effective;
pub mod snapshot;
pub mod validate;

pub use catalog::{ApplyReport, Catalog, CatalogError, Declared, DeclaredTenant};
pub use effective::{EffectiveTenant, M3terCreds, MailkitCreds, MiradoreCreds};
pub use model::{
    Connections, M3terConn, MailkitConn, MiradoreConn, PartnerRecord, TenantRecord, VendorKind,
};
pub use snapshot::{Snapshot, SnapshotReader};
pub use validate::FieldViolation;
