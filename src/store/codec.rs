//! The bytes of one stored record, shared by every backend: a tenant or the partner defaults
//! as the serde_json of the `*Doc` structs below (each secret replaced by its value sealed
//! for its place, see [`sealing`]), then sealed whole ([`record`]) with its record kind and
//! the backend's key for it as associated data.
//!
//! The etcd backend stores these bytes as values ([`super::etcd`]) and its local snapshot
//! cache keeps the same bytes. The revision inside a document is the one the writing backend
//! assigned; a backend that versions its keys itself (etcd's `mod_revision`) overrides it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::StoreError;
use super::master_key::MasterKeys;
use super::record::{self, RecordError, RecordKind};
use super::sealing::{self, SealError};
use crate::secret::Secret;
use crate::tenants::{
    Connections, M3terConn, MailkitConn, MiradoreConn, PartnerRecord, TenantRecord,
};

/// Seals `tenant` whole, bound to the backend key `key`.
pub fn encode_tenant(
    keys: &MasterKeys,
    key: &str,
    tenant: &TenantRecord,
) -> Result<Vec<u8>, StoreError> {
    let doc = TenantDoc::seal(keys, tenant)?;
    write_record(keys, RecordKind::Tenant, key, &doc)
}

/// Opens the tenant stored under the backend key `key`, which must be tenant `id`'s.
pub fn decode_tenant(
    keys: &MasterKeys,
    key: &str,
    id: &str,
    bytes: &[u8],
) -> Result<TenantRecord, StoreError> {
    let doc: TenantDoc = read_record(keys, RecordKind::Tenant, key, bytes)?;
    doc.open(keys, id)
}

/// Seals the partner defaults whole, bound to the backend key `key`.
pub fn encode_partner(
    keys: &MasterKeys,
    key: &str,
    partner: &PartnerRecord,
) -> Result<Vec<u8>, StoreError> {
    let doc = PartnerDoc::seal(keys, partner)?;
    write_record(keys, RecordKind::Partner, key, &doc)
}

/// Opens the partner defaults stored under the backend key `key`.
pub fn decode_partner(
    keys: &MasterKeys,
    key: &str,
    bytes: &[u8],
) -> Result<PartnerRecord, StoreError> {
    let doc: PartnerDoc = read_record(keys, RecordKind::Partner, key, bytes)?;
    doc.open(keys)
}

/// Sealing errors name the place and key id, never the value, so they pass through as is.
fn seal_error(e: SealError) -> StoreError {
    match e {
        SealError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Key(other.to_string()),
    }
}

fn record_error(e: RecordError) -> StoreError {
    match e {
        RecordError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Record(other.to_string()),
    }
}

fn write_record<T: Serialize>(
    keys: &MasterKeys,
    kind: RecordKind,
    key: &str,
    doc: &T,
) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(doc)
        .map_err(|e| StoreError::Backend(format!("cannot encode a record: {e}")))?;
    record::seal(keys, kind, key, &json).map_err(record_error)
}

/// serde_json errors quote at most a position and a type, and the documents hold only
/// sealed secrets, so the message cannot carry a secret.
fn read_record<T: for<'a> Deserialize<'a>>(
    keys: &MasterKeys,
    kind: RecordKind,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let json = record::open(keys, kind, key, bytes).map_err(record_error)?;
    serde_json::from_slice(&json).map_err(|e| {
        StoreError::Record(format!(
            "the stored {} record {key:?} does not decode: {e}",
            kind.name()
        ))
    })
}

const PARTNER_PLACE: &str = "partner";

fn tenant_place(id: &str) -> String {
    format!("tenant/{id}")
}

#[derive(Serialize, Deserialize)]
struct TenantDoc {
    id: String,
    display_name: String,
    connections: ConnectionsDoc,
    revision: u64,
    create_time: TimeDoc,
    update_time: TimeDoc,
}

#[derive(Serialize, Deserialize)]
struct PartnerDoc {
    connections: ConnectionsDoc,
    revision: u64,
    update_time: Option<TimeDoc>,
}

/// Each `Option<String>` secret below holds a sealed value (see [`sealing`]), never a plain one.
#[derive(Serialize, Deserialize, Default)]
struct ConnectionsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    miradore: Option<MiradoreDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m3ter: Option<M3terDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mailkit: Option<MailkitDoc>,
}

#[derive(Serialize, Deserialize)]
struct MiradoreDoc {
    site: String,
    api_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct M3terDoc {
    access_key_id: String,
    api_secret: Option<String>,
    org_id: String,
    environment: String,
}

#[derive(Serialize, Deserialize)]
struct MailkitDoc {
    client_id: String,
    client_md5: Option<String>,
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize)]
struct TimeDoc {
    secs: u64,
    nanos: u32,
}

impl TimeDoc {
    fn from_time(t: SystemTime) -> Result<Self, StoreError> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| StoreError::Backend("a record time is before 1970".into()))?;
        Ok(Self {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        })
    }

    fn to_time(&self) -> Result<SystemTime, StoreError> {
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
    fn seal(keys: &MasterKeys, r: &TenantRecord) -> Result<Self, StoreError> {
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
    fn open(self, keys: &MasterKeys, key: &str) -> Result<TenantRecord, StoreError> {
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
    fn seal(keys: &MasterKeys, r: &PartnerRecord) -> Result<Self, StoreError> {
        Ok(Self {
            connections: ConnectionsDoc::seal(keys, PARTNER_PLACE, &r.connections)?,
            revision: r.revision,
            update_time: r.update_time.map(TimeDoc::from_time).transpose()?,
        })
    }

    fn open(self, keys: &MasterKeys) -> Result<PartnerRecord, StoreError> {
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
    fn seal(keys: &MasterKeys, owner: &str, c: &Connections) -> Result<Self, StoreError> {
        let seal = |field: &str, s: &Option<Secret>| -> Result<Option<String>, StoreError> {
            s.as_ref()
                .map(|s| {
                    sealing::seal(keys, &format!("{owner}/{field}"), s.expose().as_bytes())
                        .map_err(seal_error)
                })
                .transpose()
        };
        Ok(Self {
            miradore: c
                .miradore
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreDoc {
                        site: m.site.clone(),
                        api_key: seal("miradore.api_key", &m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: c
                .m3ter
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terDoc {
                        access_key_id: m.access_key_id.clone(),
                        api_secret: seal("m3ter.api_secret", &m.api_secret)?,
                        org_id: m.org_id.clone(),
                        environment: m.environment.clone(),
                    })
                })
                .transpose()?,
            mailkit: c
                .mailkit
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitDoc {
                        client_id: m.client_id.clone(),
                        client_md5: seal("mailkit.client_md5", &m.client_md5)?,
                    })
                })
                .transpose()?,
        })
    }

    fn open(self, keys: &MasterKeys, owner: &str) -> Result<Connections, StoreError> {
        let open = |field: &str, s: Option<String>| -> Result<Option<Secret>, StoreError> {
            s.map(|s| open_secret(keys, &format!("{owner}/{field}"), &s))
                .transpose()
        };
        Ok(Connections {
            miradore: self
                .miradore
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreConn {
                        site: m.site,
                        api_key: open("miradore.api_key", m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: self
                .m3ter
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terConn {
                        access_key_id: m.access_key_id,
                        api_secret: open("m3ter.api_secret", m.api_secret)?,
                        org_id: m.org_id,
                        environment: m.environment,
                    })
                })
                .transpose()?,
            mailkit: self
                .mailkit
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitConn {
                        client_id: m.client_id,
                        client_md5: open("mailkit.client_md5", m.client_md5)?,
                    })
                })
                .transpose()?,
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
