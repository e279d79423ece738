//! Tenant and partner-default records as the operator wrote them.
//!
//! A blank field (empty string, or `None` for a secret) means "inherit from the partner
//! defaults"; a connection that is `None` means the tenant does not use that vendor.

use std::time::SystemTime;

use crate::secret::Secret;

/// The three vendors sidekey serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VendorKind {
    Miradore,
    M3ter,
    Mailkit,
}

impl VendorKind {
    pub const ALL: [VendorKind; 3] = [VendorKind::Miradore, VendorKind::M3ter, VendorKind::Mailkit];

    /// The lower-case name used in field paths, metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            VendorKind::Miradore => "miradore",
            VendorKind::M3ter => "m3ter",
            VendorKind::Mailkit => "mailkit",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MiradoreConn {
    pub site: String,
    pub api_key: Option<Secret>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct M3terConn {
    pub access_key_id: String,
    pub api_secret: Option<Secret>,
    pub org_id: String,
    pub environment: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailkitConn {
    pub client_id: String,
    pub client_md5: Option<Secret>,
}

/// One optional connection per vendor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    pub miradore: Option<MiradoreConn>,
    pub m3ter: Option<M3terConn>,
    pub mailkit: Option<MailkitConn>,
}

/// A tenant as stored. `revision` is the store-wide revision of its last write (its etag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub id: String,
    pub display_name: String,
    pub connections: Connections,
    pub revision: u64,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

/// The partner defaults singleton. `revision` 0 and no `update_time` until first written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartnerRecord {
    pub connections: Connections,
    pub revision: u64,
    pub update_time: Option<SystemTime>,
}
