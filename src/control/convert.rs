//! Conversions between the `sidekey.v1` messages and the tenant model, and field-mask
//! updates (AIP-134).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::{Connection, FieldMut, FieldRef, ProtoMut, ProtoRef, Slot, VendorVisitor};
use crate::model::{ProtoConnections, ProtoConnectionsOwned};
use crate::proto;
use crate::secret::Secret;
use crate::tenants::validate::echo;
use crate::tenants::{Connections, FieldViolation, PartnerRecord, TenantRecord, VendorKind};

/// The etag of a record: its revision, as an opaque string.
pub fn etag(revision: u64) -> String {
    revision.to_string()
}

/// An etag that is not one sidekey issued: it can never match, so it is reported as stale.
#[derive(Debug)]
pub struct ForeignEtag;

/// Parses an etag sent by a client; `Ok(None)` when none was sent. Only the canonical form
/// sidekey issues (decimal digits, no sign, no leading zero) matches: `+7` and `07` are
/// foreign, even though `u64::from_str` would read them as 7.
pub fn parse_etag(etag: &str) -> Result<Option<u64>, ForeignEtag> {
    if etag.is_empty() {
        return Ok(None);
    }
    let canonical =
        etag.bytes().all(|b| b.is_ascii_digit()) && (etag == "0" || !etag.starts_with('0'));
    if !canonical {
        return Err(ForeignEtag);
    }
    etag.parse().map(Some).map_err(|_| ForeignEtag)
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

// ---- model -> proto (secret values never leave; fingerprints do) ----

fn secret_out(s: &Option<Secret>) -> Option<proto::Secret> {
    s.as_ref().map(|s| proto::Secret {
        value: String::new(),
        fingerprint: s.fingerprint(),
    })
}

/// The connections of a record as sent to clients: every field, secrets as fingerprints.
pub fn connections_out(c: &Connections) -> ProtoConnectionsOwned {
    struct Out<'a> {
        conns: &'a Connections,
        out: ProtoConnectionsOwned,
    }
    impl VendorVisitor for Out<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(conn) = (slot.get)(self.conns) else {
                return;
            };
            let msg = slot.proto_mut(&mut self.out).get_or_insert_default();
            for field in C::FIELDS {
                match ((field.get)(conn), (field.proto_mut)(msg)) {
                    (FieldRef::Text(v), ProtoMut::Text(out)) => v.clone_into(out),
                    (FieldRef::Secret(v), ProtoMut::Secret(out)) => *out = secret_out(v),
                    // A field is text or a secret in both.
                    _ => {}
                }
            }
        }
    }
    let mut out = Out {
        conns: c,
        out: ProtoConnectionsOwned::default(),
    };
    Connections::for_each_vendor(&mut out);
    out.out
}

pub fn tenant_out(t: &TenantRecord) -> proto::Tenant {
    let mut out = proto::Tenant {
        id: t.id.clone(),
        display_name: t.display_name.clone(),
        etag: etag(t.revision),
        create_time: Some(timestamp(t.create_time)),
        update_time: Some(timestamp(t.update_time)),
        ..Default::default()
    };
    connections_out(&t.connections).set_in_tenant(&mut out);
    out
}

pub fn partner_out(p: &PartnerRecord) -> proto::PartnerDefaults {
    let mut out = proto::PartnerDefaults {
        etag: etag(p.revision),
        update_time: p.update_time.map(timestamp),
        ..Default::default()
    };
    connections_out(&p.connections).set_in_partner(&mut out);
    out
}

// ---- proto -> model ----

/// A secret as sent: absent, or present with an empty value (as when a read is sent back
/// with only its fingerprint), means "not set".
fn secret_in(s: &Option<proto::Secret>) -> Option<Secret> {
    s.as_ref()
        .filter(|s| !s.value.is_empty())
        .map(|s| Secret::new(s.value.clone()))
}

/// The `sidekey.v1.Vendor` value of a vendor.
pub fn vendor_out(kind: VendorKind) -> proto::Vendor {
    struct Find(VendorKind, proto::Vendor);
    impl VendorVisitor for Find {
        fn visit<C: Connection>(&mut self, _: &Slot<C>) {
            if C::VENDOR == self.0 {
                self.1 = C::PROTO_VENDOR;
            }
        }
    }
    let mut find = Find(kind, proto::Vendor::Unspecified);
    Connections::for_each_vendor(&mut find);
    find.1
}

/// The vendor a `sidekey.v1.Vendor` value names; `None` for `VENDOR_UNSPECIFIED` and
/// unknown values.
pub fn vendor_in(value: i32) -> Option<VendorKind> {
    VendorKind::ALL
        .into_iter()
        .find(|kind| vendor_out(*kind) as i32 == value)
}

/// The accepted `sidekey.v1.Vendor` names, for an error message:
/// `VENDOR_MIRADORE, VENDOR_M3TER or VENDOR_MAILKIT`.
pub fn vendor_names() -> String {
    let names: Vec<&str> = VendorKind::ALL
        .into_iter()
        .map(|kind| vendor_out(kind).as_str_name())
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The connections of a request as the model holds them.
pub fn connections_in(c: ProtoConnections<'_>) -> Connections {
    struct In<'a> {
        msgs: ProtoConnections<'a>,
        out: Connections,
    }
    impl VendorVisitor for In<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(msg) = slot.proto(self.msgs) else {
                return;
            };
            let conn = (slot.get_mut)(&mut self.out).get_or_insert_default();
            for field in C::FIELDS {
                match ((field.proto)(msg), (field.get_mut)(conn)) {
                    (ProtoRef::Text(v), FieldMut::Text(out)) => v.clone_into(out),
                    (ProtoRef::Secret(v), FieldMut::Secret(out)) => *out = secret_in(v),
                    // A field is text or a secret in both.
                    _ => {}
                }
            }
        }
    }
    let mut conns = In {
        msgs: c,
        out: Connections::default(),
    };
    Connections::for_each_vendor(&mut conns);
    conns.out
}

// ---- field masks ----

/// Every path an update mask may name within a connection set: each vendor, then each of
/// its declared fields (`m3ter`, `m3ter.access_key_id`, ...).
fn connection_paths() -> Vec<String> {
    struct Paths(Vec<String>);
    impl VendorVisitor for Paths {
        fn visit<C: Connection>(&mut self, _: &Slot<C>) {
            let vendor = C::VENDOR.as_str();
            self.0.push(vendor.to_owned());
            self.0
                .extend(C::FIELDS.iter().map(|f| format!("{vendor}.{}", f.name)));
        }
    }
    let mut paths = Paths(Vec::new());
    Connections::for_each_vendor(&mut paths);
    paths.0
}

/// Most paths an update mask may name: there are 12 updatable paths (`display_name` and
/// those of `connection_paths`), so a longer mask repeats or invents paths.
pub const MAX_MASK_PATHS: usize = 32;

/// Checks that every path of `mask` is updatable; `extra` lists further accepted paths.
/// The updatable paths are stated once, first, then each bad path by its index.
pub fn check_mask(paths: &[String], extra: &[&str]) -> Result<(), Vec<FieldViolation>> {
    if paths.len() > MAX_MASK_PATHS {
        return Err(vec![FieldViolation::new(
            "update_mask",
            format!(
                "names {} paths; at most {MAX_MASK_PATHS} are accepted",
                paths.len()
            ),
        )]);
    }
    let connection_paths = connection_paths();
    let mut bad = paths
        .iter()
        .enumerate()
        .filter(|(_, p)| !connection_paths.contains(p) && !extra.contains(&p.as_str()))
        .map(|(i, p)| {
            FieldViolation::new(
                format!("update_mask.paths[{i}]"),
                format!("{} is not an updatable path", echo(p)),
            )
        })
        .peekable();
    if bad.peek().is_none() {
        return Ok(());
    }
    let mut out = vec![FieldViolation::new(
        "update_mask",
        format!(
            "updatable paths: {}",
            extra
                .iter()
                .copied()
                .chain(connection_paths.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )];
    out.extend(bad);
    Err(out)
}

/// Applies the connection paths of `paths` from `req` onto `target`. Naming a whole
/// connection replaces it (removes it when `req` has none); naming a field sets it, blank
/// meaning "inherit from the partner defaults", creating the connection if needed.
pub fn apply_mask(target: &mut Connections, req: &Connections, paths: &[String]) {
    struct Apply<'a> {
        target: &'a mut Connections,
        req: &'a Connections,
        path: &'a str,
    }
    impl VendorVisitor for Apply<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(rest) = self.path.strip_prefix(C::VENDOR.as_str()) else {
                return;
            };
            if rest.is_empty() {
                (slot.get_mut)(self.target).clone_from((slot.get)(self.req));
            } else if let Some(field) = rest
                .strip_prefix('.')
                .and_then(|name| C::FIELDS.iter().find(|f| f.name == name))
            {
                let dst = (slot.get_mut)(self.target).get_or_insert_default();
                field.copy(dst, (slot.get)(self.req).as_ref());
            }
            // Other paths were refused by `check_mask`.
        }
    }
    for path in paths {
        Connections::for_each_vendor(&mut Apply { target, req, path });
    }
}

/// The update an empty mask means: every field present in the request (non-empty strings,
/// set secrets, connections present) is set; nothing is cleared.
pub fn merge_present(target: &mut Connections, req: &Connections) {
    struct Merge<'a> {
        target: &'a mut Connections,
        req: &'a Connections,
    }
    impl VendorVisitor for Merge<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(req) = (slot.get)(self.req) else {
                return;
            };
            let dst = (slot.get_mut)(self.target).get_or_insert_default();
            for field in C::FIELDS {
                if !(field.get)(req).is_blank() {
                    field.copy(dst, Some(req));
                }
            }
        }
    }
    Connections::for_each_vendor(&mut Merge { target, req });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::M3terConn;

    #[test]
    fn vendor_values_map_both_ways() {
        for kind in VendorKind::ALL {
            assert_eq!(vendor_in(vendor_out(kind) as i32), Some(kind));
        }
        assert_eq!(vendor_in(proto::Vendor::Unspecified as i32), None);
        assert_eq!(vendor_in(99), None);
        assert_eq!(
            vendor_names(),
            "VENDOR_MIRADORE, VENDOR_M3TER or VENDOR_MAILKIT"
        );
    }

    fn conns_with_m3ter(secret: &str) -> Connections {
        Connections {
            m3ter: Some(M3terConn {
                access_key_id: "key".into(),
                api_secret: Some(Secret::new(secret)),
                org_id: "org".into(),
                environment: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn mask_rotates_one_secret_and_keeps_the_rest() {
        let mut target = conns_with_m3ter("old");
        let req = Connections {
            m3ter: Some(M3terConn {
                api_secret: Some(Secret::new("new")),
                ..Default::default()
            }),
            ..Default::default()
        };
        apply_mask(&mut target, &req, &["m3ter.api_secret".into()]);
        let m = target.m3ter.unwrap();
        assert_eq!(m.api_secret.unwrap().expose(), "new");
        assert_eq!(m.access_key_id, "key");
        assert_eq!(m.org_id, "org");
    }

    #[test]
    fn naming_a_connection_replaces_or_removes_it() {
        let mut target = conns_with_m3ter("s");
        apply_mask(&mut target, &Connections::default(), &["m3ter".into()]);
        assert!(target.m3ter.is_none());
    }

    #[test]
    fn empty_mask_sets_only_present_fields() {
        let mut target = conns_with_m3ter("s");
        let req = Connections {
            m3ter: Some(M3terConn {
                org_id: "other".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        merge_present(&mut target, &req);
        let m = target.m3ter.unwrap();
        assert_eq!(m.org_id, "other");
        assert_eq!(m.api_secret.unwrap().expose(), "s");
    }

    #[test]
    fn mask_paths_follow_the_declared_fields() {
        assert_eq!(
            connection_paths(),
            [
                "miradore",
                "miradore.site",
                "miradore.api_key",
                "m3ter",
                "m3ter.access_key_id",
                "m3ter.api_secret",
                "m3ter.org_id",
                "m3ter.environment",
                "mailkit",
                "mailkit.client_id",
                "mailkit.client_md5",
            ]
        );
        // display_name and the connection paths, with room for a few vendors more.
        assert!(connection_paths().len() < MAX_MASK_PATHS);
    }

    #[test]
    fn unknown_paths_are_named() {
        let err = check_mask(&["display_name".into(), "m3ter.nope".into()], &[]).unwrap_err();
        assert_eq!(err.len(), 3);
        assert_eq!(err[0].field, "update_mask");
        assert!(err[0].description.contains("m3ter.api_secret"));
        assert_eq!(err[2].field, "update_mask.paths[1]");
        assert!(err[2].description.contains("m3ter.nope"));
        // The valid paths are stated once, not per bad path.
        assert!(
            err[1..]
                .iter()
                .all(|v| !v.description.contains("m3ter.api_secret"))
        );
        let long = vec!["x".to_owned(); MAX_MASK_PATHS + 1];
        assert_eq!(check_mask(&long, &[]).unwrap_err().len(), 1);
        assert!(check_mask(&["display_name".into()], &["display_name"]).is_ok());
    }

    #[test]
    fn only_canonical_etags_parse() {
        assert_eq!(parse_etag("").unwrap(), None);
        assert_eq!(parse_etag("0").unwrap(), Some(0));
        assert_eq!(parse_etag("17").unwrap(), Some(17));
        for foreign in [
            "+17",
            "017",
            "00",
            "-1",
            " 17",
            "17 ",
            "1_7",
            "99999999999999999999",
        ] {
            assert!(parse_etag(foreign).is_err(), "{foreign:?}");
        }
    }

    #[test]
    fn reads_carry_fingerprints_not_values() {
        let m3ter = connections_out(&conns_with_m3ter("topsecret"))
            .as_tenant()
            .m3ter
            .clone();
        let s = m3ter.unwrap().api_secret.unwrap();
        assert!(s.value.is_empty());
        assert_eq!(s.fingerprint, Secret::new("topsecret").fingerprint());
    }
}
