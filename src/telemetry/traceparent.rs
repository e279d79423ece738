//! The W3C Trace Context `traceparent` header (<https://www.w3.org/TR/trace-context/>),
//! read strictly: version `00` only, exactly `00-<32 hex>-<16 hex>-<2 hex>` in lowercase,
//! neither id all zeros. Anything else is not a parent: it is ignored for logs and traces
//! (and still forwarded untouched when tracing is off).

use http::HeaderMap;
use http::header::HeaderName;

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`, which only means something next to a valid `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The length of a version-00 `traceparent`.
const LEN: usize = 55;

/// A valid `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// The request's one `traceparent`, if valid. Several `traceparent` fields make none.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        Self::parse(first.as_bytes())
    }

    /// Parses one header value; `None` unless it is exactly the version-00 grammar.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() != LEN || &value[..3] != b"00-" || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut flags = [0u8; 1];
        decode_hex(&value[3..35], &mut trace_id)?;
        decode_hex(&value[36..52], &mut parent_id)?;
        decode_hex(&value[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The trace id as logged.
    pub fn trace_id_text(&self) -> TraceIdText {
        TraceIdText::new(self.trace_id)
    }
}

/// A trace id as 32 lowercase hex digits, without allocating.
#[derive(Clone, Copy)]
pub struct TraceIdText([u8; 32]);

impl TraceIdText {
    pub fn new(trace_id: [u8; 16]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (b, pair) in trace_id.iter().zip(text.chunks_exact_mut(2)) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
        }
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        // Only hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Lowercase hex digits only (the spec's HEXDIGLC); `out` takes half as many bytes.
fn decode_hex(digits: &[u8], out: &mut [u8]) -> Option<()> {
    fn nibble(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        }
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_parses() {
        let tp = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(
            tp.trace_id_text().as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            tp.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(tp.flags, 1);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled.as_bytes()).unwrap().flags, 0);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "00",
            // Other versions, including the reserved ff and future ones with more fields.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Uppercase hex, non-hex, wrong lengths, wrong separators.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn two_traceparent_fields_make_none() {
        let mut headers = HeaderMap::new();
        headers.append(TRACEPARENT, VALID.parse().unwrap());
        assert!(TraceParent::from_headers(&headers).is_some());
        headers.append(TRACEPARENT, VALID.parse().unwrap());
        assert_eq!(TraceParent::from_headers(&headers), None);
        assert_eq!(TraceParent::from_headers(&HeaderMap::new()), None);
    }
}
