//! Whole-record authentication: every stored record is sealed as a unit (AES-256-GCM under the
//! master keyring, see [`super::sealing`]) with its record type and record key bound in as
//! associated data.
//!
//! So a flipped bit anywhere in a record (a Miradore site, a display name, a revision), or a
//! record copied onto another key or into another table, fails to open with an error naming
//! the record, instead of being served. The secrets inside a record stay sealed individually
//! as well, so the opened bytes of a record never hold a plain credential.
//!
//! Backend-independent: the embedded store seals each table value with it, and a shared
//! backend (etcd) stores the same bytes under its own keys unchanged.

use zeroize::Zeroizing;

use super::master_key::{KeyId, MasterKeys};
use super::sealing::{self, SealError};

/// Associated-data domain of sealed records, distinct from that of sealed secret values.
const RECORD_DOMAIN: &str = "sidekey sealed record v2";

/// The kinds of record a store holds; the name is part of the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Tenant,
    Partner,
}

impl RecordKind {
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Tenant => "tenant",
            RecordKind::Partner => "partner",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "the stored {} record {key:?} failed to authenticate ({reason}): it was altered, \
         corrupted or copied from another record",
        kind.name()
    )]
    Unauthentic {
        kind: RecordKind,
        key: String,
        reason: String,
    },
    #[error("the system random number generator failed while sealing")]
    Random,
}

fn place(kind: RecordKind, key: &str) -> String {
    format!("{}/{key}", kind.name())
}

/// Seals the serialized record `plaintext` stored as `kind` under `key`, with the ring's
/// active key.
pub fn seal(
    keys: &MasterKeys,
    kind: RecordKind,
    key: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, RecordError> {
    sealing::seal_in(RECORD_DOMAIN, keys, &place(kind, key), plaintext)
        .map(String::into_bytes)
        .map_err(|e| match e {
            SealError::Random => RecordError::Random,
            other => RecordError::Unauthentic {
                kind,
                key: key.to_owned(),
                reason: other.to_string(),
            },
        })
}

/// Opens a record read as `kind` under `key`: the serialized record, or an error naming it.
pub fn open(
    keys: &MasterKeys,
    kind: RecordKind,
    key: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, RecordError> {
    let unauthentic = |reason: String| RecordError::Unauthentic {
        kind,
        key: key.to_owned(),
        reason,
    };
    let text =
        std::str::from_utf8(sealed).map_err(|_| unauthentic("not a sealed record".into()))?;
    sealing::open_in(RECORD_DOMAIN, keys, &place(kind, key), text).map_err(|e| {
        // The sealing error names a place; say it with the record's own words instead.
        unauthentic(match e {
            SealError::Malformed { .. } => "not a sealed record".into(),
            SealError::UnknownKey {
                key_id, configured, ..
            } => format!(
                "sealed with master key id {key_id}, not in the keyring (key ids: {configured})"
            ),
            SealError::Open { key_id, .. } => {
                format!("does not open with master key id {key_id}")
            }
            SealError::Random => "random number generator failure".into(),
        })
    })
}

/// The id of the key that sealed a record, without opening it (for rotation).
pub fn key_id(sealed: &[u8]) -> Option<KeyId> {
    std::str::from_utf8(sealed).ok().and_then(sealing::key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{KEY_A, KEY_B, key_ring};

    #[test]
    fn round_trip() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, RecordKind::Tenant, "acme", b"{\"site\":\"a\"}").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("site"));
        assert_eq!(key_id(&sealed), Some(keys.active().id()));
        let opened = open(&keys, RecordKind::Tenant, "acme", &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"{\"site\":\"a\"}");
    }

    #[test]
    fn every_bit_flip_is_refused_naming_the_record() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, RecordKind::Tenant, "acme", b"{\"site\":\"a\"}").unwrap();
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                let err = open(&keys, RecordKind::Tenant, "acme", &bad).unwrap_err();
                let msg = err.to_string();
                assert!(msg.contains("tenant record \"acme\""), "{msg}");
            }
        }
    }

    #[test]
    fn another_key_or_kind_or_master_key_is_refused() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, RecordKind::Tenant, "acme", b"r").unwrap();
        let err = open(&keys, RecordKind::Tenant, "other", &sealed).unwrap_err();
        assert!(err.to_string().contains("\"other\""), "{err}");
        assert!(open(&keys, RecordKind::Partner, "acme", &sealed).is_err());
        let msg = open(&key_ring(KEY_B), RecordKind::Tenant, "acme", &sealed)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not in the keyring"), "{msg}");
        // A secret value sealed for the same place does not open as a record.
        let value = sealing::seal(&keys, "tenant/acme", b"r").unwrap();
        assert!(open(&keys, RecordKind::Tenant, "acme", value.as_bytes()).is_err());
    }
}
