//! AEAD sealing of secret values at rest: AES-256-GCM under a master key, bound to the place
//! the value is stored.
//!
//! A sealed value is the compact string `v1.<key id>.<base64url(nonce || ciphertext || tag)>`.
//! The key id says which master key opens it, so a ring of old and new keys can open values
//! sealed before a rotation. The associated data binds the ciphertext to its place (for
//! example `tenant/acme/m3ter.api_secret`) and to the key id, so a sealed value copied into
//! another record or field fails to open instead of yielding another tenant's credential.
//!
//! Nonces are 96 random bits per value. With the handful of secrets sidekey seals per write,
//! the birthday bound of 2^32 values per key is far beyond reach.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::master_key::{KeyId, MasterKey, MasterKeys};

/// The format tag that starts every sealed value; a future format gets a new tag.
pub const FORMAT: &str = "v1";

/// Prefix of the associated data, so these ciphertexts cannot be confused with any other
/// use of the same key.
const AAD_DOMAIN: &str = "sidekey sealed value v1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the sealed value at {place} is malformed (not a {FORMAT} sealed value)")]
    Malformed { place: String },
    #[error(
        "the sealed value at {place} was sealed with master key id {key_id}, which is not in \
         the configured keyring (key ids: {configured})"
    )]
    UnknownKey {
        place: String,
        key_id: KeyId,
        configured: String,
    },
    #[error(
        "the sealed value at {place} does not open with master key id {key_id}: it was altered \
         or moved from another record"
    )]
    Open { place: String, key_id: KeyId },
    #[error("the system random number generator failed while sealing")]
    Random,
}

/// Seals `plaintext` for `place` under the ring's active key.
pub fn seal(keys: &MasterKeys, place: &str, plaintext: &[u8]) -> Result<String, SealError> {
    seal_in(AAD_DOMAIN, keys, place, plaintext)
}

/// [`seal`] with another associated-data domain, so that values sealed for one purpose (a
/// secret field, a whole record) never open as the other.
pub(super) fn seal_in(
    domain: &str,
    keys: &MasterKeys,
    place: &str,
    plaintext: &[u8],
) -> Result<String, SealError> {
    let key = keys.active();
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;

    // Capacity for the tag up front: a reallocation while the buffer still holds the
    // plaintext would leave an unzeroed copy behind.
    let mut in_out = Zeroizing::new(Vec::with_capacity(plaintext.len() + AES_256_GCM.tag_len()));
    in_out.extend_from_slice(plaintext);
    aead_key(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(domain, key.id(), place).as_bytes()),
            &mut *in_out,
        )
        // ring fails only for inputs over ~64 GiB.
        .map_err(|_| SealError::Malformed {
            place: place.to_owned(),
        })?;
    let mut raw = Vec::with_capacity(NONCE_LEN + in_out.len());
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&in_out);
    Ok(format!(
        "{FORMAT}.{}.{}",
        key.id(),
        URL_SAFE_NO_PAD.encode(&raw)
    ))
}

/// Opens a value sealed for `place` with whichever key of the ring its key id names.
pub fn open(keys: &MasterKeys, place: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
    open_in(AAD_DOMAIN, keys, place, sealed)
}

/// [`open`] of a value sealed by [`seal_in`] with `domain`.
pub(super) fn open_in(
    domain: &str,
    keys: &MasterKeys,
    place: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let malformed = || SealError::Malformed {
        place: place.to_owned(),
    };
    let (key_id, body) = split(sealed).ok_or_else(malformed)?;
    let key = keys.get(key_id).ok_or_else(|| SealError::UnknownKey {
        place: place.to_owned(),
        key_id,
        configured: keys
            .ids()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let mut raw = Zeroizing::new(URL_SAFE_NO_PAD.decode(body).map_err(|_| malformed())?);
    if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(malformed());
    }
    let mut ciphertext = Zeroizing::new(raw.split_off(NONCE_LEN));
    let nonce = Nonce::try_assume_unique_for_key(&raw).map_err(|_| malformed())?;
    let len = aead_key(key)
        .open_in_place(
            nonce,
            Aad::from(aad(domain, key_id, place).as_bytes()),
            &mut ciphertext,
        )
        .map_err(|_| SealError::Open {
            place: place.to_owned(),
            key_id,
        })?
        .len();
    ciphertext.truncate(len);
    Ok(ciphertext)
}

/// The id of the key that sealed `sealed`, without opening it (to find what a rotation must
/// re-seal). `None` when the value is not a sealed value.
pub fn key_id(sealed: &str) -> Option<KeyId> {
    split(sealed).map(|(id, _)| id)
}

fn split(sealed: &str) -> Option<(KeyId, &str)> {
    let rest = sealed.strip_prefix(FORMAT)?.strip_prefix('.')?;
    let (id, body) = rest.split_once('.')?;
    Some((KeyId::parse(id)?, body))
}

fn aad(domain: &str, key_id: KeyId, place: &str) -> String {
    format!("{domain}\0{key_id}\0{place}")
}

fn aead_key(key: &MasterKey) -> LessSafeKey {
    // AES-256-GCM takes any 32-byte key, so this cannot fail for a MasterKey.
    match UnboundKey::new(&AES_256_GCM, key.bytes()) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("a MasterKey is always {} bytes", super::master_key::KEY_LEN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{KEY_A, KEY_B, key_ring};

    #[test]
    fn round_trip_and_format() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, "tenant/acme/m3ter.api_secret", b"s3cret").unwrap();
        let kid = keys.active().id().to_string();
        assert!(sealed.starts_with(&format!("v1.{kid}.")), "{sealed}");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(key_id(&sealed), Some(keys.active().id()));
        let opened = open(&keys, "tenant/acme/m3ter.api_secret", &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"s3cret");
    }

    #[test]
    fn nonces_differ_so_equal_values_do_not_look_equal() {
        let keys = key_ring(KEY_A);
        let a = seal(&keys, "p", b"same").unwrap();
        let b = seal(&keys, "p", b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn another_place_does_not_open() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, "tenant/acme/miradore.api_key", b"k").unwrap();
        let err = open(&keys, "tenant/other/miradore.api_key", &sealed).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SealError::Open { .. }));
        assert!(msg.contains(&keys.active().id().to_string()), "{msg}");
    }

    #[test]
    fn tampering_is_detected() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, "p", b"value").unwrap();
        let (head, body) = sealed.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(raw));
        assert!(matches!(
            open(&keys, "p", &tampered),
            Err(SealError::Open { .. })
        ));
        for junk in ["", "v1", "v1.zz.abc", "v2.00000000.abc", "v1.00000000.!!"] {
            assert!(open(&keys, "p", junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn older_key_in_ring_opens_unknown_key_names_ids() {
        let old = key_ring(KEY_A);
        let sealed = seal(&old, "p", b"v").unwrap();
        let rotated = key_ring(&format!("{KEY_B}\n{KEY_A}"));
        assert_eq!(open(&rotated, "p", &sealed).unwrap().as_slice(), b"v");

        let new_only = key_ring(KEY_B);
        let err = open(&new_only, "p", &sealed).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SealError::UnknownKey { .. }));
        assert!(msg.contains(&old.active().id().to_string()), "{msg}");
        assert!(msg.contains(&new_only.active().id().to_string()), "{msg}");
    }

    #[test]
    fn errors_never_contain_the_value() {
        let keys = key_ring(KEY_A);
        let sealed = seal(&keys, "p", b"distinctive-secret").unwrap();
        let err = open(&key_ring(KEY_B), "p", &sealed).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("distinctive-secret"));
    }
}
