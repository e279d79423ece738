//! The bytes of one record in a shared backend: a tenant or the partner defaults as the
//! serde_json of its document ([`super::doc`]: each secret replaced by its value sealed for
//! its place), then sealed whole ([`record`]) with its record kind and the backend's key for
//! it as associated data.
//!
//! The etcd backend stores these bytes as values ([`super::etcd`]) and its local snapshot
//! cache keeps the same bytes. The revision inside a document is the one the writing backend
//! assigned; a backend that versions its keys itself (etcd's `mod_revision`) overrides it.

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::doc::{PartnerDoc, TenantDoc};
use super::master_key::MasterKeys;
use super::record::{self, RecordError, RecordKind};
use crate::model::{PartnerRecord, TenantRecord};

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

pub(super) fn record_error(e: RecordError) -> StoreError {
    match e {
        RecordError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Record(other.to_string()),
    }
}

/// Serializes `doc` and seals it whole as `kind` under `key`.
pub(super) fn write_record<T: Serialize>(
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
pub(super) fn read_record<T: for<'a> Deserialize<'a>>(
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
