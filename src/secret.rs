//! The `Secret` type: a credential value that cannot leak by accident.
//!
//! Its `Debug` and `Display` print only a redaction marker, its memory is zeroed on drop, and
//! the value is read only through [`Secret::expose`], which is called where a credential is
//! put on the wire or sealed for the store. Grepping for `expose(` lists every such place.

use std::fmt;
use std::sync::OnceLock;

use ring::rand::SystemRandom;
use ring::{digest, hmac};
use zeroize::Zeroizing;

/// A secret credential value (API key, API secret, client MD5, bearer token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The plain value. Call only to put it on the wire or to seal it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sha256:` and the first 12 hex digits of the unkeyed SHA-256 of the value: enough for
    /// an operator to tell two values apart, and to check a key locally with `sha256sum`.
    /// It is not a secret-preserving digest: anyone who sees it can test guesses offline, so
    /// a short or guessable value (a 6-digit PIN, a dictionary word) is recovered in seconds.
    /// Vendor keys are long random strings, for which guessing is hopeless; that, not the
    /// truncation, is what keeps them safe.
    pub fn fingerprint(&self) -> String {
        let digest = digest::digest(&digest::SHA256, self.0.as_bytes());
        let mut out = String::with_capacity(19);
        out.push_str("sha256:");
        for byte in &digest.as_ref()[..6] {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Identifies a credential (its public parts and its secret) without holding the secret: an
/// HMAC-SHA256 under a key drawn at random for each process. Equal credentials have equal
/// keys; a rotated secret is a different key; a key printed or dumped gives nothing to test
/// guesses against. Computed once where a credential is resolved, so a cache keyed by it
/// costs no hashing of the secret per request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialKey([u8; 32]);

impl CredentialKey {
    /// The key of the credential made of `public` parts and `secret`; each part is
    /// length-prefixed, so no two different lists of parts share an encoding.
    pub fn of(public: &[&str], secret: &Secret) -> Self {
        static KEY: OnceLock<hmac::Key> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).unwrap_or_else(|_| {
                // Only the OS RNG failing gets here. A fixed key still separates credentials
                // perfectly; it only loses protection of dumped keys against guessing.
                tracing::warn!("no randomness for credential keys; using a fixed key");
                hmac::Key::new(hmac::HMAC_SHA256, b"sidekey credential key")
            })
        });
        let mut ctx = hmac::Context::with_key(key);
        for part in public.iter().copied().chain([secret.expose()]) {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Self(out)
    }
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialKey(<keyed hash>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
    }

    #[test]
    fn fingerprint_is_sha256_prefix() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(Secret::new("abc").fingerprint(), "sha256:ba7816bf8f01");
    }

    #[test]
    fn credential_keys_tell_credentials_apart_and_print_nothing() {
        let secret = Secret::new("s3cret");
        let key = CredentialKey::of(&["api.m3ter.com", "id"], &secret);
        assert_eq!(key, CredentialKey::of(&["api.m3ter.com", "id"], &secret));
        for other in [
            CredentialKey::of(&["api.m3ter.com", "id"], &Secret::new("s3cret2")),
            CredentialKey::of(&["api.m3ter.com", "id2"], &secret),
            CredentialKey::of(&["api.m3ter.co", "mid"], &secret),
            CredentialKey::of(&["api.m3ter.comid"], &secret),
        ] {
            assert_ne!(key, other);
        }
        assert_eq!(format!("{key:?}"), "CredentialKey(<keyed hash>)");
    }
}
