//! Tenant and partner-default records as the operator wrote them.
//!
//! A blank field (empty string, or `None` for a secret) means "inherit from the partner
//! defaults"; a connection that is `None` means the tenant does not use that vendor.

use std::time::SystemTime;

use crate::proto;
use crate::secret::Secret;
use crate::vendors;

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

// ---- the credential schema ----
//
// Each connection record declares its fields once, in `Connection::FIELDS`: the name used in
// field paths, update masks, documents, stored records and CLI flags, whether it is a
// secret, whether it is required, its format rule (owned by the vendor's module, in its leaf
// `fields` module) and help line, and the same field of its `sidekey.v1` message.
// `Connections::for_each_vendor` lists the vendors once. Validation (`tenants::validate`),
// resolution against the partner defaults (`tenants::effective`), the proto conversions and
// update masks (`control::convert`), the tenant document (`document`), the stored record
// (`store::doc`), the CLI's flags and output walk these tables, so none of them names a
// vendor's fields by hand. docs/adding-a-vendor.md lists what still names a vendor.

/// A format rule: `Err` says what is wrong, without repeating the value.
pub type FormatRule = fn(&str) -> Result<(), String>;

/// One field of a connection, read through [`Field::get`] and written through
/// [`Field::get_mut`]; the same field of the `sidekey.v1` message through [`Field::proto`]
/// and [`Field::proto_mut`].
pub struct Field<C: Connection> {
    /// Its name in field paths, update masks and the message (`site`, `api_key`).
    pub name: &'static str,
    /// Blank in both the tenant and the partner defaults, resolution reports it missing; an
    /// optional field then resolves to blank.
    pub required: bool,
    /// Checked on every non-blank value (for a secret, after the rules every secret obeys).
    pub rule: FormatRule,
    /// What the field is, for the CLI's `--help`: a text field's help line ("Miradore site
    /// name (case-sensitive)"); a secret's name ("Miradore API key"), which the help lines
    /// of its `-file` and `-env` flags name.
    pub help: &'static str,
    pub get: fn(&C) -> FieldRef<'_>,
    pub get_mut: fn(&mut C) -> FieldMut<'_>,
    pub proto: fn(&C::Proto) -> ProtoRef<'_>,
    pub proto_mut: fn(&mut C::Proto) -> ProtoMut<'_>,
}

/// A field of a `sidekey.v1` connection message: text, or a `Secret` message.
pub enum ProtoRef<'a> {
    Text(&'a String),
    Secret(&'a Option<proto::Secret>),
}

pub enum ProtoMut<'a> {
    Text(&'a mut String),
    Secret(&'a mut Option<proto::Secret>),
}

/// A field's value: text (blank when empty) or a secret (blank when `None`).
pub enum FieldRef<'a> {
    Text(&'a String),
    Secret(&'a Option<Secret>),
}

pub enum FieldMut<'a> {
    Text(&'a mut String),
    Secret(&'a mut Option<Secret>),
}

impl FieldRef<'_> {
    pub fn is_blank(&self) -> bool {
        match self {
            FieldRef::Text(s) => s.is_empty(),
            FieldRef::Secret(s) => s.is_none(),
        }
    }
}

impl<C: Connection> Field<C> {
    /// Whether the field holds a secret (else text).
    pub fn is_secret(&self) -> bool {
        matches!((self.get)(&C::default()), FieldRef::Secret(_))
    }

    /// Sets this field of `dst` to its value in `src` (blank when `src` is `None`).
    pub fn copy(&self, dst: &mut C, src: Option<&C>) {
        match ((self.get_mut)(dst), src.map(|c| (self.get)(c))) {
            (FieldMut::Text(d), Some(FieldRef::Text(s))) => s.clone_into(d),
            (FieldMut::Secret(d), Some(FieldRef::Secret(s))) => d.clone_from(s),
            (FieldMut::Text(d), _) => d.clear(),
            (FieldMut::Secret(d), _) => *d = None,
        }
    }
}

/// A vendor's connection record, as an operator writes it.
pub trait Connection: Clone + Default + 'static {
    /// Its `sidekey.v1` message (`MiradoreConnection`), whose fields have the same names.
    type Proto: Clone + Default + 'static;
    const VENDOR: VendorKind;
    /// Its name as people write it ("Miradore"), in the CLI's `--help`.
    const TITLE: &'static str;
    /// The `sidekey.v1.Vendor` value that names it (`TestTenant`).
    const PROTO_VENDOR: proto::Vendor;
    /// Every field, in the order errors and update-mask paths list them.
    const FIELDS: &'static [Field<Self>];
}

/// The proto3 JSON name of a field (`api_key` → `apiKey`): its name in JSON and YAML.
pub fn json_name(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A vendor's fields by name, in their declared order: what the formats that name fields
/// without typed access (the tenant document, the stored record) read and write.
pub struct VendorFields {
    pub vendor: VendorKind,
    pub fields: Vec<NamedField>,
}

pub struct NamedField {
    /// As in [`Field::name`] (`api_key`).
    pub name: &'static str,
    /// Its [`json_name`] (`apiKey`).
    pub json_name: String,
    pub secret: bool,
}

/// Every vendor's [`VendorFields`], in the order of [`VendorKind::ALL`].
pub fn vendor_fields() -> &'static [VendorFields] {
    struct Collect(Vec<VendorFields>);
    impl VendorVisitor for Collect {
        fn visit<C: Connection>(&mut self, _: &Slot<C>) {
            let fields = C::FIELDS.iter().map(|f| NamedField {
                name: f.name,
                json_name: json_name(f.name),
                secret: f.is_secret(),
            });
            self.0.push(VendorFields {
                vendor: C::VENDOR,
                fields: fields.collect(),
            });
        }
    }
    static ALL: std::sync::LazyLock<Vec<VendorFields>> = std::sync::LazyLock::new(|| {
        let mut all = Collect(Vec::new());
        Connections::for_each_vendor(&mut all);
        all.0
    });
    &ALL
}

/// Where a vendor's connection sits in [`Connections`] and in the `sidekey.v1` messages
/// (`Tenant` and `PartnerDefaults` carry one optional field per vendor: the wire format
/// stays flat).
pub struct Slot<C: Connection> {
    pub get: fn(&Connections) -> &Option<C>,
    pub get_mut: fn(&mut Connections) -> &mut Option<C>,
    pub tenant: fn(&proto::Tenant) -> &Option<C::Proto>,
    pub tenant_mut: fn(&mut proto::Tenant) -> &mut Option<C::Proto>,
    pub partner: fn(&proto::PartnerDefaults) -> &Option<C::Proto>,
    pub partner_mut: fn(&mut proto::PartnerDefaults) -> &mut Option<C::Proto>,
}

impl<C: Connection> Slot<C> {
    /// This vendor's message among `msgs`.
    pub fn proto<'a>(&self, msgs: ProtoConnections<'a>) -> Option<&'a C::Proto> {
        match msgs {
            ProtoConnections::Tenant(t) => (self.tenant)(t).as_ref(),
            ProtoConnections::Partner(p) => (self.partner)(p).as_ref(),
        }
    }

    /// This vendor's message among `msgs`.
    pub fn proto_mut<'a>(&self, msgs: &'a mut ProtoConnectionsOwned) -> &'a mut Option<C::Proto> {
        (self.tenant_mut)(&mut msgs.0)
    }
}

/// The vendor connections of a `sidekey.v1` message, borrowed: what the conversions to the
/// model (`control::convert`), the document format (`document`) and the CLI's output
/// (`cli::render`) read, through each vendor's [`Slot`].
#[derive(Clone, Copy, Debug)]
pub enum ProtoConnections<'a> {
    Tenant(&'a proto::Tenant),
    Partner(&'a proto::PartnerDefaults),
}

impl<'a> From<&'a proto::Tenant> for ProtoConnections<'a> {
    fn from(t: &'a proto::Tenant) -> Self {
        Self::Tenant(t)
    }
}

impl<'a> From<&'a proto::PartnerDefaults> for ProtoConnections<'a> {
    fn from(p: &'a proto::PartnerDefaults) -> Self {
        Self::Partner(p)
    }
}

/// The vendor connections of a message, owned: what the conversions from the model, the
/// document format and the CLI's flags build before they go into a `Tenant` or
/// `PartnerDefaults`. Held in a `Tenant` whose other fields stay empty.
#[derive(Clone, Debug, Default)]
pub struct ProtoConnectionsOwned(proto::Tenant);

impl ProtoConnectionsOwned {
    /// The connections, as the vendor fields of an otherwise empty `Tenant`.
    pub fn as_tenant(&self) -> &proto::Tenant {
        &self.0
    }

    /// Sets every vendor's field of `t` to these connections (absent: none).
    pub fn set_in_tenant(self, t: &mut proto::Tenant) {
        self.move_into(Target::Tenant(t));
    }

    /// Sets every vendor's field of `p` to these connections (absent: none).
    pub fn set_in_partner(self, p: &mut proto::PartnerDefaults) {
        self.move_into(Target::Partner(p));
    }

    fn move_into(mut self, to: Target<'_>) {
        struct Move<'a>(&'a mut proto::Tenant, Target<'a>);
        impl VendorVisitor for Move<'_> {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                let conn = (slot.tenant_mut)(self.0).take();
                match &mut self.1 {
                    Target::Tenant(t) => *(slot.tenant_mut)(t) = conn,
                    Target::Partner(p) => *(slot.partner_mut)(p) = conn,
                }
            }
        }
        Connections::for_each_vendor(&mut Move(&mut self.0, to));
    }
}

enum Target<'a> {
    Tenant(&'a mut proto::Tenant),
    Partner(&'a mut proto::PartnerDefaults),
}

/// What a walk over the vendors ([`Connections::for_each_vendor`]) does with each.
pub trait VendorVisitor {
    fn visit<C: Connection>(&mut self, slot: &Slot<C>);
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MiradoreConn {
    pub site: String,
    pub api_key: Option<Secret>,
}

impl Connection for MiradoreConn {
    type Proto = proto::MiradoreConnection;
    const VENDOR: VendorKind = VendorKind::Miradore;
    const TITLE: &'static str = "Miradore";
    const PROTO_VENDOR: proto::Vendor = proto::Vendor::Miradore;
    const FIELDS: &'static [Field<Self>] = &[
        Field {
            name: "site",
            required: true,
            rule: vendors::miradore::fields::site,
            help: "Miradore site name (case-sensitive)",
            get: |c| FieldRef::Text(&c.site),
            get_mut: |c| FieldMut::Text(&mut c.site),
            proto: |c| ProtoRef::Text(&c.site),
            proto_mut: |c| ProtoMut::Text(&mut c.site),
        },
        Field {
            name: "api_key",
            required: true,
            rule: vendors::miradore::fields::api_key,
            help: "Miradore API key",
            get: |c| FieldRef::Secret(&c.api_key),
            get_mut: |c| FieldMut::Secret(&mut c.api_key),
            proto: |c| ProtoRef::Secret(&c.api_key),
            proto_mut: |c| ProtoMut::Secret(&mut c.api_key),
        },
    ];
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct M3terConn {
    pub access_key_id: String,
    pub api_secret: Option<Secret>,
    pub org_id: String,
    pub environment: String,
}

impl Connection for M3terConn {
    type Proto = proto::M3terConnection;
    const VENDOR: VendorKind = VendorKind::M3ter;
    const TITLE: &'static str = "m3ter";
    const PROTO_VENDOR: proto::Vendor = proto::Vendor::M3ter;
    const FIELDS: &'static [Field<Self>] = &[
        Field {
            name: "access_key_id",
            required: true,
            rule: vendors::m3ter::fields::access_key_id,
            help: "m3ter access key ID",
            get: |c| FieldRef::Text(&c.access_key_id),
            get_mut: |c| FieldMut::Text(&mut c.access_key_id),
            proto: |c| ProtoRef::Text(&c.access_key_id),
            proto_mut: |c| ProtoMut::Text(&mut c.access_key_id),
        },
        Field {
            name: "api_secret",
            required: true,
            rule: vendors::m3ter::fields::api_secret,
            help: "m3ter API secret",
            get: |c| FieldRef::Secret(&c.api_secret),
            get_mut: |c| FieldMut::Secret(&mut c.api_secret),
            proto: |c| ProtoRef::Secret(&c.api_secret),
            proto_mut: |c| ProtoMut::Secret(&mut c.api_secret),
        },
        Field {
            name: "org_id",
            required: true,
            rule: vendors::m3ter::fields::org_id,
            help: "m3ter organisation ID (a UUID)",
            get: |c| FieldRef::Text(&c.org_id),
            get_mut: |c| FieldMut::Text(&mut c.org_id),
            proto: |c| ProtoRef::Text(&c.org_id),
            proto_mut: |c| ProtoMut::Text(&mut c.org_id),
        },
        Field {
            name: "environment",
            required: false,
            rule: vendors::m3ter::fields::environment,
            help: r#"m3ter environment: empty or "prod" for production, else api.<env>.m3ter.com"#,
            get: |c| FieldRef::Text(&c.environment),
            get_mut: |c| FieldMut::Text(&mut c.environment),
            proto: |c| ProtoRef::Text(&c.environment),
            proto_mut: |c| ProtoMut::Text(&mut c.environment),
        },
    ];
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailkitConn {
    pub client_id: String,
    pub client_md5: Option<Secret>,
}

impl Connection for MailkitConn {
    type Proto = proto::MailkitConnection;
    const VENDOR: VendorKind = VendorKind::Mailkit;
    const TITLE: &'static str = "Mailkit";
    const PROTO_VENDOR: proto::Vendor = proto::Vendor::Mailkit;
    const FIELDS: &'static [Field<Self>] = &[
        Field {
            name: "client_id",
            required: true,
            rule: vendors::mailkit::fields::client_id,
            help: "Mailkit client ID (digits)",
            get: |c| FieldRef::Text(&c.client_id),
            get_mut: |c| FieldMut::Text(&mut c.client_id),
            proto: |c| ProtoRef::Text(&c.client_id),
            proto_mut: |c| ProtoMut::Text(&mut c.client_id),
        },
        Field {
            name: "client_md5",
            required: true,
            rule: vendors::mailkit::fields::client_md5,
            help: "Mailkit client MD5",
            get: |c| FieldRef::Secret(&c.client_md5),
            get_mut: |c| FieldMut::Secret(&mut c.client_md5),
            proto: |c| ProtoRef::Secret(&c.client_md5),
            proto_mut: |c| ProtoMut::Secret(&mut c.client_md5),
        },
    ];
}

/// One optional connection per vendor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    pub miradore: Option<MiradoreConn>,
    pub m3ter: Option<M3terConn>,
    pub mailkit: Option<MailkitConn>,
}

impl Connections {
    /// Visits every vendor's slot, in the order of [`VendorKind::ALL`].
    pub fn for_each_vendor(v: &mut impl VendorVisitor) {
        v.visit(&Slot {
            get: |c| &c.miradore,
            get_mut: |c| &mut c.miradore,
            tenant: |t| &t.miradore,
            tenant_mut: |t| &mut t.miradore,
            partner: |p| &p.miradore,
            partner_mut: |p| &mut p.miradore,
        });
        v.visit(&Slot {
            get: |c| &c.m3ter,
            get_mut: |c| &mut c.m3ter,
            tenant: |t| &t.m3ter,
            tenant_mut: |t| &mut t.m3ter,
            partner: |p| &p.m3ter,
            partner_mut: |p| &mut p.m3ter,
        });
        v.visit(&Slot {
            get: |c| &c.mailkit,
            get_mut: |c| &mut c.mailkit,
            tenant: |t| &t.mailkit,
            tenant_mut: |t| &mut t.mailkit,
            partner: |p| &p.mailkit,
            partner_mut: |p| &mut p.mailkit,
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each declared field is text or a secret in both the record and the message (the
    /// conversions skip a field whose two sides disagree), and every vendor has a slot.
    #[test]
    fn every_field_has_the_same_kind_in_record_and_message() {
        struct Check(Vec<VendorKind>);
        impl VendorVisitor for Check {
            fn visit<C: Connection>(&mut self, _: &Slot<C>) {
                let (conn, msg) = (C::default(), C::Proto::default());
                for f in C::FIELDS {
                    let same = matches!(
                        ((f.get)(&conn), (f.proto)(&msg)),
                        (FieldRef::Text(_), ProtoRef::Text(_))
                            | (FieldRef::Secret(_), ProtoRef::Secret(_))
                    );
                    assert!(same, "{}.{}", C::VENDOR.as_str(), f.name);
                }
                self.0.push(C::VENDOR);
            }
        }
        let mut check = Check(Vec::new());
        Connections::for_each_vendor(&mut check);
        assert_eq!(check.0, VendorKind::ALL);
    }

    /// Owned connections reach every vendor's field of both messages, and replace them.
    #[test]
    fn owned_connections_move_every_vendor_into_both_messages() {
        struct Fill(ProtoConnectionsOwned);
        impl VendorVisitor for Fill {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                *slot.proto_mut(&mut self.0) = Some(C::Proto::default());
            }
        }
        struct Count<'a>(ProtoConnections<'a>, usize);
        impl VendorVisitor for Count<'_> {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                self.1 += usize::from(slot.proto(self.0).is_some());
            }
        }
        let count = |msgs: ProtoConnections<'_>| {
            let mut c = Count(msgs, 0);
            Connections::for_each_vendor(&mut c);
            c.1
        };
        let mut fill = Fill(ProtoConnectionsOwned::default());
        Connections::for_each_vendor(&mut fill);
        let (mut t, mut p) = (proto::Tenant::default(), proto::PartnerDefaults::default());
        fill.0.clone().set_in_tenant(&mut t);
        fill.0.set_in_partner(&mut p);
        assert_eq!(count((&t).into()), VendorKind::ALL.len());
        assert_eq!(count((&p).into()), VendorKind::ALL.len());
        ProtoConnectionsOwned::default().set_in_tenant(&mut t);
        assert_eq!(count((&t).into()), 0);
    }
}
