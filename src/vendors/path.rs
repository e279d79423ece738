//! The one path form sidekey forwards, so that what a vendor rule checks is what the vendor
//! reads.
//!
//! Servers disagree on how they normalise a path before routing it: some merge `//`, resolve
//! `..` (also after decoding `%2e%2e` or `%2f`), strip `;` parameters (`..;/`), read `\` as
//! `/`, decode `%6F` to `o` or match case-insensitively. A check on the raw string then
//! passes paths the vendor reads as another site or organisation. Instead of guessing the
//! vendor's normalisation, sidekey accepts only paths that every normalisation leaves as they
//! are, and refuses the rest ([`NotCanonical`], answered 400 `bad_request`) before any other
//! check.
//!
//! A path is canonical when it is `/` or `/segment(/segment)*`, optionally ending in `/`,
//! where each segment
//! - is not empty (no `//`) and is not `.` or `..`;
//! - is made of RFC 3986 path characters other than `;`: `A-Z a-z 0-9 - . _ ~ ! $ & ' ( ) *
//!   + , = : @` and percent escapes (no raw `\`, `;`, space, quote, brace or non-ASCII byte);
//! - uses a percent escape only for a byte that needs one: never for an unreserved character
//!   (`%2e`, `%41`), nor for `/`, `\`, `;`, `%` (so no double encoding) or a control byte,
//!   and every `%` starts a valid escape.
//!
//! Vendor rules then compare segments byte for byte (`vendors::miradore`,
//! `vendors::m3ter::rule`), adding their own case rules.

/// A path that is not canonical, naming the rule it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the path is refused: {0} (sidekey forwards only canonical paths, see docs/proxy.md)")]
pub struct NotCanonical(&'static str);

/// A path proven canonical; the only path type the vendor rules accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanonicalPath<'a>(&'a str);

impl<'a> CanonicalPath<'a> {
    /// `path` if it is canonical, else the refusal naming the rule it breaks.
    pub fn new(path: &'a str) -> Result<Self, NotCanonical> {
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| refuse("it does not start with '/'"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Ok(CanonicalPath(path));
        }
        for segment in rest.split('/') {
            check_segment(segment)?;
        }
        Ok(CanonicalPath(path))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// The segments, without the empty one a trailing `/` ends with.
    pub fn segments(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.0.split('/').filter(|s| !s.is_empty())
    }
}

fn refuse(why: &'static str) -> NotCanonical {
    NotCanonical(why)
}

fn check_segment(segment: &str) -> Result<(), NotCanonical> {
    match segment {
        "" => return Err(refuse("it has an empty segment ('//')")),
        "." | ".." => return Err(refuse("it has a '.' or '..' segment")),
        _ => {}
    }
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| refuse("a '%' does not start a valid escape"))?;
            if is_unreserved(byte) {
                return Err(refuse(
                    "it percent-encodes a character that needs no encoding",
                ));
            }
            if matches!(byte, b'/' | b'\\' | b';' | b'%') || byte < 0x20 || byte == 0x7f {
                return Err(refuse(
                    "it percent-encodes '/', '\\', ';', '%' or a control character",
                ));
            }
            i += 3;
            continue;
        }
        if !(is_unreserved(b) || b"!$&'()*+,=:@".contains(&b)) {
            return Err(refuse(if b == b';' {
                "it has a ';' parameter"
            } else {
                "it has a character that must be percent-encoded"
            }));
        }
        i += 1;
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_and_their_segments() {
        for (path, segments) in [
            ("/", &[][..]),
            ("/a", &["a"][..]),
            ("/a/b/", &["a", "b"][..]),
            (
                "/Acme1/API/Device%20x/a.b..c/~_-!$&'()*+,=:@",
                &["Acme1", "API", "Device%20x", "a.b..c", "~_-!$&'()*+,=:@"][..],
            ),
            ("/caf%C3%A9/%3A%40%3f", &["caf%C3%A9", "%3A%40%3f"][..]),
        ] {
            let p = CanonicalPath::new(path).unwrap();
            assert_eq!(p.as_str(), path);
            assert_eq!(p.segments().collect::<Vec<_>>(), segments, "{path}");
        }
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for path in [
            "",
            "x",
            "//organizations/o",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/..",
            "/a/..;/b",
            "/a;x/b",
            "/organizations;v=1/o",
            "/a/..%2fb",
            "/a/..%2Fb",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/%6Frganizations/o",
            "/%41cme1/API",
            "/a/%5c..",
            "/a\\..\\b",
            "/a/%252e%252e",
            "/a/%3b",
            "/a/%00",
            "/a/%7F",
            "/a/%",
            "/a/%4",
            "/a/%zz",
            "/a b",
            "/a\"b",
            "/a{b}",
            "/caf\u{e9}",
        ] {
            let e = CanonicalPath::new(path).unwrap_err();
            assert!(
                e.to_string().starts_with("the path is refused: "),
                "{path:?}"
            );
        }
    }
}
