//! The vendor connections of a `sidekey.v1` message, as one value. `Tenant` and
//! `PartnerDefaults` carry one optional field per vendor (the wire format stays flat); the
//! conversions to the model (`control::convert`), the document format (`document`) and the
//! CLI's output (`cli::render`) take them whole through [`ProtoConnections`], so a new
//! vendor is a new field here, not a new argument in each of them.

use crate::proto;

/// The connections of one message, borrowed.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProtoConnections<'a> {
    pub miradore: Option<&'a proto::MiradoreConnection>,
    pub m3ter: Option<&'a proto::M3terConnection>,
    pub mailkit: Option<&'a proto::MailkitConnection>,
}

impl<'a> From<&'a proto::Tenant> for ProtoConnections<'a> {
    fn from(t: &'a proto::Tenant) -> Self {
        Self {
            miradore: t.miradore.as_ref(),
            m3ter: t.m3ter.as_ref(),
            mailkit: t.mailkit.as_ref(),
        }
    }
}

impl<'a> From<&'a proto::PartnerDefaults> for ProtoConnections<'a> {
    fn from(p: &'a proto::PartnerDefaults) -> Self {
        Self {
            miradore: p.miradore.as_ref(),
            m3ter: p.m3ter.as_ref(),
            mailkit: p.mailkit.as_ref(),
        }
    }
}

/// The connections of one message, owned: what the conversions from the model build before
/// they go into a `Tenant` or `PartnerDefaults`.
#[derive(Clone, Debug, Default)]
pub struct ProtoConnectionsOwned {
    pub miradore: Option<proto::MiradoreConnection>,
    pub m3ter: Option<proto::M3terConnection>,
    pub mailkit: Option<proto::MailkitConnection>,
}

impl ProtoConnectionsOwned {
    pub fn set_in_tenant(self, t: &mut proto::Tenant) {
        t.miradore = self.miradore;
        t.m3ter = self.m3ter;
        t.mailkit = self.mailkit;
    }

    pub fn set_in_partner(self, p: &mut proto::PartnerDefaults) {
        p.miradore = self.miradore;
        p.m3ter = self.m3ter;
        p.mailkit = self.mailkit;
    }
}
