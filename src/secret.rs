//! The `Secret` type: a credential value that cannot leak by accident.
//!
//! Its `Debug` and `Display` print only a redaction marker, its memory is zeroed on drop, and
//! the value is read only through [`Secret::expose`], which is called where a credential is
//! put on the wire or sealed for the store. Grepping for `expose(` lists every such place.

use std::fmt;

use ring::digest;
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
}
