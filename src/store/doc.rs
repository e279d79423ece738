//! The records as stored, by every backend: serde_json of these `*Doc` structs, which mirror
//! the model with each secret replaced by its sealed string (see [`crate::store::sealing`]),
//! so the plain value never reaches the encoder; the connections follow the credential
//! schema ([`ConnectionsDoc`]). The whole document is then sealed as a
//! record ([`crate::store::record`]; for etcd, [`crate::store::codec`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

use crate::model::{
    Connection, Connections, FieldMut, FieldRef, PartnerRecord, Slot, TenantRecord, VendorFields,
    VendorKind, VendorVisitor, vendor_fields,
};
use crate::secret::Secret;
use crate::store::StoreError;
use crate::store::master_key::{KeyId, MasterKeys};
use crate::store::sealing::{self, SealError};

/// Sealing errors name the place and key id, never the value, so they pass through as is.
pub(crate) fn seal_error(e: SealError) -> StoreError {
    match e {
        SealError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Key(other.to_string()),
    }
}

pub(crate) const PARTNER_PLACE: &str = "partner";

pub(crate) fn tenant_place(id: &str) -> String {
    format!("tenant/{id}")
}

#[derive(Serialize, Deserialize)]
pub(crate) struct TenantDoc {
    id: String,
    display_name: String,
    pub(crate) connections: ConnectionsDoc,
    pub(crate) revision: u64,
    create_time: TimeDoc,
    update_time: TimeDoc,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct PartnerDoc {
    pub(crate) connections: ConnectionsDoc,
    pub(crate) revision: u64,
    update_time: Option<TimeDoc>,
}

/// The connections of a record: per vendor present, its fields in the schema's order
/// ([`Connection::FIELDS`]), each text as is and each secret sealed (see [`sealing`]), never
/// plain. Stored as `{"<vendor>": {"<field>": "text", "<secret>": "sealed" | null}}`, in
/// the order of [`Connections::for_each_vendor`]; reading ignores unknown names, takes a
/// missing secret as blank and refuses a missing text field, a name given twice or a value
/// of the wrong type.
#[derive(Default)]
pub(crate) struct ConnectionsDoc {
    vendors: Vec<VendorDoc>,
}

struct VendorDoc {
    vendor: VendorKind,
    fields: Vec<(&'static str, StoredField)>,
}

enum StoredField {
    Text(String),
    Sealed(Option<String>),
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize)]
pub(crate) struct TimeDoc {
    secs: u64,
    nanos: u32,
}

impl TimeDoc {
    pub(crate) fn from_time(t: SystemTime) -> Result<Self, StoreError> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| StoreError::Backend("a record time is before 1970".into()))?;
        Ok(Self {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        })
    }

    pub(crate) fn to_time(&self) -> Result<SystemTime, StoreError> {
        let bad = || StoreError::Backend("a stored time is out of range: corrupted".into());
        // Duration::new panics when nanos carry past u64::MAX seconds.
        if self.nanos >= 1_000_000_000 {
            return Err(bad());
        }
        UNIX_EPOCH
            .checked_add(Duration::new(self.secs, self.nanos))
            .ok_or_else(bad)
    }
}

impl TenantDoc {
    pub(crate) fn seal(keys: &MasterKeys, r: &TenantRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id.clone(),
            display_name: r.display_name.clone(),
            connections: ConnectionsDoc::seal(keys, &tenant_place(&r.id), &r.connections)?,
            revision: r.revision,
            create_time: TimeDoc::from_time(r.create_time)?,
            update_time: TimeDoc::from_time(r.update_time)?,
        })
    }

    /// `key` is the table key the record was read under; the secrets are opened for that
    /// place, so a record moved under another id fails to open.
    pub(crate) fn open(self, keys: &MasterKeys, key: &str) -> Result<TenantRecord, StoreError> {
        if self.id != key {
            return Err(StoreError::Backend(format!(
                "the record stored under tenant {key:?} names tenant {:?}: corrupted",
                self.id
            )));
        }
        Ok(TenantRecord {
            connections: self.connections.open(keys, &tenant_place(key))?,
            create_time: self.create_time.to_time()?,
            update_time: self.update_time.to_time()?,
            id: self.id,
            display_name: self.display_name,
            revision: self.revision,
        })
    }
}

impl PartnerDoc {
    pub(crate) fn seal(keys: &MasterKeys, r: &PartnerRecord) -> Result<Self, StoreError> {
        Ok(Self {
            connections: ConnectionsDoc::seal(keys, PARTNER_PLACE, &r.connections)?,
            revision: r.revision,
            update_time: r.update_time.map(TimeDoc::from_time).transpose()?,
        })
    }

    pub(crate) fn open(self, keys: &MasterKeys) -> Result<PartnerRecord, StoreError> {
        Ok(PartnerRecord {
            connections: self.connections.open(keys, PARTNER_PLACE)?,
            revision: self.revision,
            update_time: self
                .update_time
                .as_ref()
                .map(TimeDoc::to_time)
                .transpose()?,
        })
    }
}

impl ConnectionsDoc {
    pub(crate) fn seal(
        keys: &MasterKeys,
        owner: &str,
        c: &Connections,
    ) -> Result<Self, StoreError> {
        struct Seal<'a> {
            keys: &'a MasterKeys,
            owner: &'a str,
            conns: &'a Connections,
            out: Result<ConnectionsDoc, StoreError>,
        }
        impl VendorVisitor for Seal<'_> {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                let (Ok(out), Some(conn)) = (&mut self.out, (slot.get)(self.conns)) else {
                    return;
                };
                let mut fields = Vec::with_capacity(C::FIELDS.len());
                for field in C::FIELDS {
                    let stored = match (field.get)(conn) {
                        FieldRef::Text(t) => StoredField::Text(t.clone()),
                        FieldRef::Secret(s) => {
                            let place =
                                format!("{}/{}.{}", self.owner, C::VENDOR.as_str(), field.name);
                            let sealed = s.as_ref().map(|s| {
                                sealing::seal(self.keys, &place, s.expose().as_bytes())
                                    .map_err(seal_error)
                            });
                            match sealed.transpose() {
                                Ok(sealed) => StoredField::Sealed(sealed),
                                Err(e) => {
                                    self.out = Err(e);
                                    return;
                                }
                            }
                        }
                    };
                    fields.push((field.name, stored));
                }
                out.vendors.push(VendorDoc {
                    vendor: C::VENDOR,
                    fields,
                });
            }
        }
        let mut seal = Seal {
            keys,
            owner,
            conns: c,
            out: Ok(Self::default()),
        };
        Connections::for_each_vendor(&mut seal);
        seal.out
    }

    pub(crate) fn open(self, keys: &MasterKeys, owner: &str) -> Result<Connections, StoreError> {
        struct Open<'a> {
            keys: &'a MasterKeys,
            owner: &'a str,
            docs: Vec<VendorDoc>,
            out: Result<Connections, StoreError>,
        }
        impl VendorVisitor for Open<'_> {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                let Some(doc) = self.docs.iter_mut().find(|d| d.vendor == C::VENDOR) else {
                    return;
                };
                let Ok(out) = &mut self.out else { return };
                let mut conn = C::default();
                for (field, (name, stored)) in C::FIELDS.iter().zip(&mut doc.fields) {
                    match ((field.get_mut)(&mut conn), stored) {
                        (FieldMut::Text(dst), StoredField::Text(t)) => *dst = std::mem::take(t),
                        (FieldMut::Secret(dst), StoredField::Sealed(Some(sealed))) => {
                            let place = format!("{}/{}.{name}", self.owner, C::VENDOR.as_str());
                            match open_secret(self.keys, &place, sealed) {
                                Ok(secret) => *dst = Some(secret),
                                Err(e) => {
                                    self.out = Err(e);
                                    return;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                *(slot.get_mut)(out) = Some(conn);
            }
        }
        let mut open = Open {
            keys,
            owner,
            docs: self.vendors,
            out: Ok(Connections::default()),
        };
        Connections::for_each_vendor(&mut open);
        open.out
    }

    /// The sealed secrets with their field paths (`miradore.api_key`), for rotation.
    pub(crate) fn sealed_mut(&mut self) -> Vec<(String, &mut String)> {
        let mut out = Vec::new();
        for doc in &mut self.vendors {
            for (name, stored) in &mut doc.fields {
                if let StoredField::Sealed(Some(sealed)) = stored {
                    out.push((format!("{}.{name}", doc.vendor.as_str()), sealed));
                }
            }
        }
        out
    }

    /// Re-seals under the active key each secret an older key sealed; returns how many.
    pub(crate) fn reseal(
        &mut self,
        keys: &MasterKeys,
        owner: &str,
        old_ids: &mut Vec<KeyId>,
    ) -> Result<usize, StoreError> {
        let active = keys.active().id();
        let mut count = 0;
        for (field, sealed) in self.sealed_mut() {
            let place = format!("{owner}/{field}");
            let id = sealing::key_id(sealed).ok_or_else(|| {
                seal_error(SealError::Malformed {
                    place: place.clone(),
                })
            })?;
            if id == active {
                continue;
            }
            let plain = sealing::open(keys, &place, sealed).map_err(seal_error)?;
            *sealed = sealing::seal(keys, &place, &plain).map_err(seal_error)?;
            old_ids.push(id);
            count += 1;
        }
        Ok(count)
    }
}

impl Serialize for ConnectionsDoc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.vendors.len()))?;
        for doc in &self.vendors {
            map.serialize_entry(doc.vendor.as_str(), &FieldsOut(&doc.fields))?;
        }
        map.end()
    }
}

struct FieldsOut<'a>(&'a [(&'static str, StoredField)]);

impl Serialize for FieldsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, stored) in self.0 {
            match stored {
                StoredField::Text(t) => map.serialize_entry(name, t)?,
                StoredField::Sealed(sealed) => map.serialize_entry(name, sealed)?,
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ConnectionsDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vendors;
        impl<'de> Visitor<'de> for Vendors {
            type Value = ConnectionsDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of vendor connections")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let all = vendor_fields();
                let mut found: Vec<Option<Option<VendorDoc>>> = all.iter().map(|_| None).collect();
                while let Some(key) = map.next_key::<String>()? {
                    let Some(i) = all.iter().position(|v| v.vendor.as_str() == key) else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    if found[i].is_some() {
                        return Err(de::Error::duplicate_field(all[i].vendor.as_str()));
                    }
                    found[i] = Some(map.next_value_seed(OptionalFields(&all[i]))?);
                }
                let vendors = found.into_iter().flatten().flatten().collect();
                Ok(ConnectionsDoc { vendors })
            }
        }
        d.deserialize_map(Vendors)
    }
}

/// A vendor's fields, or `null` for none.
struct OptionalFields(&'static VendorFields);

impl<'de> DeserializeSeed<'de> for OptionalFields {
    type Value = Option<VendorDoc>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalFields {
    type Value = Option<VendorDoc>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a vendor connection or null")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(StoredFields(self.0)).map(Some)
    }
}

/// A vendor's stored fields: each by its declared name, at most once.
struct StoredFields(&'static VendorFields);

impl<'de> Visitor<'de> for StoredFields {
    type Value = VendorDoc;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "the {} connection", self.0.vendor.as_str())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let schema = &self.0.fields;
        let mut found: Vec<Option<StoredField>> = schema.iter().map(|_| None).collect();
        while let Some(key) = map.next_key::<String>()? {
            let Some(i) = schema.iter().position(|f| f.name == key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if found[i].is_some() {
                return Err(de::Error::duplicate_field(schema[i].name));
            }
            found[i] = Some(if schema[i].secret {
                StoredField::Sealed(map.next_value()?)
            } else {
                StoredField::Text(map.next_value()?)
            });
        }
        let mut fields = Vec::with_capacity(schema.len());
        for (field, value) in schema.iter().zip(found) {
            let value = match value {
                Some(v) => v,
                None if field.secret => StoredField::Sealed(None),
                None => return Err(de::Error::missing_field(field.name)),
            };
            fields.push((field.name, value));
        }
        Ok(VendorDoc {
            vendor: self.0.vendor,
            fields,
        })
    }
}

fn open_secret(keys: &MasterKeys, place: &str, sealed: &str) -> Result<Secret, StoreError> {
    let mut plain = sealing::open(keys, place, sealed).map_err(seal_error)?;
    // Moved, not copied, into the Secret, so no unzeroed copy is left behind.
    match String::from_utf8(std::mem::take(&mut *plain)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(StoreError::Key(format!(
                "the secret at {place} is not UTF-8 after opening: corrupted"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as every version since schema 2 wrote it: vendors and fields in this order,
    /// a blank secret as `null`, an absent vendor left out.
    const STORED: &str = concat!(
        r#"{"miradore":{"site":"acme","api_key":"sealed-1"},"#,
        r#""m3ter":{"access_key_id":"AK","api_secret":null,"org_id":"o","environment":""},"#,
        r#""mailkit":{"client_id":"12","client_md5":"sealed-2"}}"#,
    );

    #[test]
    fn stored_connections_read_and_write_the_same_bytes() {
        let mut doc: ConnectionsDoc = serde_json::from_str(STORED).unwrap();
        assert_eq!(serde_json::to_string(&doc).unwrap(), STORED);
        let sealed: Vec<_> = doc
            .sealed_mut()
            .into_iter()
            .map(|(p, s)| (p, s.clone()))
            .collect();
        assert_eq!(
            sealed,
            [
                ("miradore.api_key".into(), "sealed-1".to_owned()),
                ("mailkit.client_md5".into(), "sealed-2".to_owned())
            ]
        );
        // Field order in the input does not matter; unknown fields are ignored; a missing
        // secret is blank; a missing text field, a duplicate or a wrong type is an error.
        let reordered = r#"{"mailkit":{"x":1,"client_md5":null,"client_id":"12"},"other":{}}"#;
        let doc: ConnectionsDoc = serde_json::from_str(reordered).unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"mailkit":{"client_id":"12","client_md5":null}}"#
        );
        let doc: ConnectionsDoc = serde_json::from_str(r#"{"miradore":{"site":"a"}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"miradore":{"site":"a","api_key":null}}"#
        );
        for bad in [
            r#"{"miradore":{"api_key":null}}"#,
            r#"{"miradore":{"site":"a","site":"b"}}"#,
            r#"{"miradore":{"site":1}}"#,
            r#"{"miradore":{"site":"a"},"miradore":null}"#,
            r#"{"miradore":"a"}"#,
        ] {
            assert!(
                serde_json::from_str::<ConnectionsDoc>(bad).is_err(),
                "{bad}"
            );
        }
        let empty: ConnectionsDoc = serde_json::from_str(r#"{"m3ter":null}"#).unwrap();
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
    }
}
