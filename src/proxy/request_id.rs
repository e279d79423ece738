//! Request ids: the `x-sidekey-request-id` header on every answer to the app and the
//! `request_id` field of the request's log line, plus how the app's own ids are logged.
//!
//! An id is 32 lowercase hex digits: a random 64-bit prefix drawn when the proxy starts,
//! then a 64-bit counter from 1. Unique across restarts and replicas (two processes share a
//! prefix with odds of 2^-64 per pair), ordered within one process, and made without a lock
//! or a random draw per request.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The response header carrying the request id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-sidekey-request-id");
/// The app's own request id: forwarded unchanged, and logged as `app_request_id`.
pub const APP_REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// The longest app request id logged verbatim.
pub const MAX_LOGGED_APP_REQUEST_ID: usize = 128;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Hands out this process's request ids.
pub(crate) struct RequestIds {
    prefix: [u8; 16],
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        let mut random = [0u8; 8];
        if SystemRandom::new().fill(&mut random).is_err() {
            // No system randomness: the clock still tells restarts apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            random = (nanos as u64 ^ u64::from(std::process::id())).to_be_bytes();
        }
        let mut prefix = [0u8; 16];
        hex_into(&random, &mut prefix);
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn next(&self) -> RequestId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 32];
        text[..16].copy_from_slice(&self.prefix);
        hex_into(&n.to_be_bytes(), &mut text[16..]);
        RequestId(text)
    }
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// One request's id: 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestId([u8; 32]);

impl RequestId {
    pub(crate) fn as_str(&self) -> &str {
        // Only hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    pub(crate) fn header_value(&self) -> HeaderValue {
        HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&self.0))
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The app's `x-request-id` as logged: the value when it is 1 to
/// [`MAX_LOGGED_APP_REQUEST_ID`] visible ASCII characters (no space, no control), else
/// `invalid` (the header is still forwarded unchanged); `None` when absent.
pub(crate) fn loggable_app_request_id(headers: &HeaderMap) -> Option<Box<str>> {
    let value = headers.get(APP_REQUEST_ID_HEADER)?.as_bytes();
    let visible = !value.is_empty()
        && value.len() <= MAX_LOGGED_APP_REQUEST_ID
        && value.iter().all(|b| b.is_ascii_graphic());
    Some(match std::str::from_utf8(value) {
        Ok(text) if visible => text.into(),
        _ => "invalid".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_a_fixed_prefix_and_a_counter_in_hex() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| HEX.contains(&c)), "{a}");
        assert_eq!(a.as_str()[..16], b.as_str()[..16]);
        assert_eq!(&a.as_str()[16..], "0000000000000001");
        assert_eq!(&b.as_str()[16..], "0000000000000002");
        assert_eq!(a.header_value(), a.as_str());
        // Another process (here: another proxy) draws another prefix.
        assert_ne!(RequestIds::new().next().as_str()[..16], a.as_str()[..16]);
    }

    #[test]
    fn app_request_ids_are_logged_only_when_short_and_visible() {
        let logged = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(APP_REQUEST_ID_HEADER, HeaderValue::from_bytes(v).unwrap());
            loggable_app_request_id(&h).map(String::from)
        };
        assert_eq!(loggable_app_request_id(&HeaderMap::new()), None);
        assert_eq!(logged(b"req-42_a/b=c").as_deref(), Some("req-42_a/b=c"));
        let longest = "x".repeat(MAX_LOGGED_APP_REQUEST_ID);
        assert_eq!(logged(longest.as_bytes()), Some(longest));
        let too_long = "x".repeat(MAX_LOGGED_APP_REQUEST_ID + 1);
        for bad in [
            too_long.as_bytes(),
            b"",
            b"two words",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            b"\x80\xff",
        ] {
            assert_eq!(logged(bad).as_deref(), Some("invalid"), "{bad:?}");
        }
    }
}
