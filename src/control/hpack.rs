//! An HPACK (RFC 7541) header-block decoder, and an encoder that writes literals only: what
//! [`super::authority`] needs to rewrite a request's header block before h2 reads it.
//!
//! The decoder keeps the dynamic table the client's encoder fills, so it follows the
//! client's block after block. The encoder never indexes: the blocks it writes leave the
//! receiver's dynamic table empty, whatever the client did with its own.

use std::collections::{HashMap, VecDeque};
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};

/// The dynamic table size a client may use: HTTP/2's default SETTINGS_HEADER_TABLE_SIZE,
/// which the control plane's server never changes.
pub const TABLE_SIZE: usize = 4096;

/// One header field of a block, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Bytes,
    pub value: Bytes,
    /// Sent as "never indexed" (RFC 7541 6.2.3): kept so when the field is written again.
    pub never_indexed: bool,
}

impl Field {
    /// The size RFC 7541 4.1 (and SETTINGS_MAX_HEADER_LIST_SIZE) counts for it.
    fn size(&self) -> usize {
        self.name.len() + self.value.len() + 32
    }
}

/// Why a block cannot be decoded; the connection is then closed (h2 would answer
/// COMPRESSION_ERROR, which closes it too).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("integer too large in header block")]
    Overflow,
    #[error("header table index {0} out of range")]
    BadIndex(usize),
    #[error("invalid Huffman string in header block")]
    Huffman,
    #[error("dynamic table size update to {0}, above {TABLE_SIZE}")]
    TableSize(usize),
    #[error("dynamic table size update after the first field")]
    LateTableSize,
    #[error("header list larger than {0} bytes")]
    TooLarge(usize),
}

/// The decoding side of one connection.
pub struct Decoder {
    /// Newest entry first.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: TABLE_SIZE,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block into its fields; refuses a list whose size
    /// (RFC 7541 4.1) exceeds `max_list` bytes.
    pub fn decode(&mut self, mut block: &[u8], max_list: usize) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list = 0usize;
        while let Some(&first) = block.first() {
            let field = if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (name, value) = self.entry(index)?;
                Field {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0xc0 == 0x40 {
                let field = self.literal(&mut block, 6, false)?;
                self.insert(field.name.clone(), field.value.clone());
                field
            } else if first & 0xe0 == 0x20 {
                // Only at the start of a block (RFC 7541 4.2).
                if !fields.is_empty() {
                    return Err(HpackError::LateTableSize);
                }
                let size = integer(&mut block, 5)?;
                if size > TABLE_SIZE {
                    return Err(HpackError::TableSize(size));
                }
                self.max_size = size;
                self.evict();
                continue;
            } else {
                // 0001xxxx never indexed, 0000xxxx without indexing.
                self.literal(&mut block, 4, first & 0x10 != 0)?
            };
            list += field.size();
            if list > max_list {
                return Err(HpackError::TooLarge(max_list));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(
        &self,
        block: &mut &[u8],
        prefix: u8,
        never_indexed: bool,
    ) -> Result<Field, HpackError> {
        let index = integer(block, prefix)?;
        let name = if index == 0 {
            string(block)?
        } else {
            self.entry(index)?.0
        };
        let value = string(block)?;
        Ok(Field {
            name,
            value,
            never_indexed,
        })
    }

    fn entry(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((Bytes::from_static(name), Bytes::from_static(value)))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        self.size += name.len() + value.len() + 32;
        self.table.push_front((name, value));
        // An entry larger than the table empties it (RFC 7541 4.4).
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

/// Writes `fields` as literals without indexing (never indexed where they were), names and
/// values as raw octets.
pub fn encode(fields: &[Field], dst: &mut BytesMut) {
    for f in fields {
        put_integer(dst, if f.never_indexed { 0x10 } else { 0x00 }, 4, 0);
        for s in [&f.name, &f.value] {
            put_integer(dst, 0x00, 7, s.len());
            dst.put_slice(s);
        }
    }
}

/// Largest integer accepted: far above any length or index a 64 KiB block can need.
const MAX_INTEGER: usize = 1 << 24;

/// An integer with an N-bit prefix (RFC 7541 5.1).
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let mask = (1u16 << prefix) as usize - 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        // Continuation bytes that add nothing still count: the shift is bounded too.
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value += usize::from(byte & 0x7f) << shift;
        if value > MAX_INTEGER {
            return Err(HpackError::Overflow);
        }
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

fn put_integer(dst: &mut BytesMut, flags: u8, prefix: u8, value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        dst.put_u8(flags | value as u8);
        return;
    }
    dst.put_u8(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        dst.put_u8((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    dst.put_u8(rest as u8);
}

/// A string literal (RFC 7541 5.2), raw or Huffman-coded.
fn string(block: &mut &[u8]) -> Result<Bytes, HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    if block.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(raw).map(Bytes::from)
    } else {
        Ok(Bytes::copy_from_slice(raw))
    }
}

/// The code length of each symbol (0..=255, then EOS) of RFC 7541 Appendix B. The code is
/// canonical: codes are assigned in order of length, then symbol.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];
const EOS: u16 = 256;

/// (length, code) -> symbol, built from [`CODE_LENGTHS`].
static HUFFMAN: LazyLock<HashMap<(u8, u32), u16>> = LazyLock::new(|| {
    let mut symbols: Vec<u16> = (0..=EOS).collect();
    symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
    let mut codes = HashMap::with_capacity(symbols.len());
    let (mut code, mut len) = (0u32, CODE_LENGTHS[usize::from(symbols[0])]);
    for s in symbols {
        let l = CODE_LENGTHS[usize::from(s)];
        code <<= l - len;
        len = l;
        codes.insert((len, code), s);
        code += 1;
    }
    codes
});

fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for byte in raw {
        for bit in (0..8).rev() {
            code = code << 1 | u32::from(byte >> bit & 1);
            len += 1;
            if let Some(&symbol) = HUFFMAN.get(&(len, code)) {
                // EOS inside a string is an error (RFC 7541 5.2).
                let symbol = u8::try_from(symbol).map_err(|_| HpackError::Huffman)?;
                out.push(symbol);
                (code, len) = (0, 0);
            } else if len >= 30 {
                return Err(HpackError::Huffman);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (the most significant bits of EOS).
    if len >= 8 || code != (1 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Whatever a client sends, decoding ends in fields or an error, never a panic.
        #[test]
        fn any_block_decodes_or_is_refused(
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..4)
        ) {
            let mut d = Decoder::default();
            for block in blocks {
                let _ = d.decode(&block, 1 << 16);
                prop_assert!(d.size <= d.max_size);
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.to_vec()).unwrap(),
                    String::from_utf8(f.value.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.table
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn p(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    /// RFC 7541 C.4: three requests, Huffman-coded, sharing the dynamic table.
    #[test]
    fn decodes_the_rfc_huffman_request_examples_with_their_dynamic_table() {
        let mut d = Decoder::default();
        let one = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"), 1 << 16)
            .unwrap();
        assert_eq!(
            pairs(&one),
            [
                p(":method", "GET"),
                p(":scheme", "http"),
                p(":path", "/"),
                p(":authority", "www.example.com")
            ]
        );
        let two = d
            .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"), 1 << 16)
            .unwrap();
        assert_eq!(two[3], one[3]);
        assert_eq!(pairs(&two)[4], p("cache-control", "no-cache"));
        let three = d
            .decode(
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
                1 << 16,
            )
            .unwrap();
        assert_eq!(
            pairs(&three),
            [
                p(":method", "GET"),
                p(":scheme", "https"),
                p(":path", "/index.html"),
                p(":authority", "www.example.com"),
                p("custom-key", "custom-value")
            ]
        );
        assert_eq!(
            table(&d),
            [
                p("custom-key", "custom-value"),
                p("cache-control", "no-cache"),
                p(":authority", "www.example.com")
            ]
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.5 with a 256-byte table: entries are evicted, oldest first.
    #[test]
    fn evicts_the_oldest_entries_when_the_table_shrinks() {
        let mut d = Decoder::default();
        // A size update to 256 first (RFC 7541 C.5 assumes that table size).
        let mut block = hex("3fe1 01");
        block.extend(hex(
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        ));
        d.decode(&block, 1 << 16).unwrap();
        assert_eq!(d.size, 222);
        d.decode(&hex("4883 640e ffc1 c0bf"), 1 << 16).unwrap();
        assert_eq!(d.size, 222);
        assert_eq!(table(&d)[0], p(":status", "307"));
        assert_eq!(table(&d).len(), 4);
    }

    #[test]
    fn literals_round_trip_through_the_encoder() {
        let fields = vec![
            Field {
                name: Bytes::from_static(b":authority"),
                value: Bytes::from(vec![b'a'; 300]),
                never_indexed: false,
            },
            Field {
                name: Bytes::from_static(b"authorization"),
                value: Bytes::from_static(b"Bearer x"),
                never_indexed: true,
            },
        ];
        let mut out = BytesMut::new();
        encode(&fields, &mut out);
        let mut d = Decoder::default();
        assert_eq!(d.decode(&out, 1 << 16).unwrap(), fields);
        assert!(d.table.is_empty(), "literals never index");
    }

    #[test]
    fn refuses_malformed_blocks() {
        let mut d = Decoder::default();
        // Index 0; an index past the tables; a truncated string; a size update above the
        // setting, and one after a field; an over-long integer; EOS inside a string;
        // padding that is not all ones.
        assert_eq!(d.decode(&[0x80], 1 << 16), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe], 1 << 16), Err(HpackError::BadIndex(62)));
        assert_eq!(
            d.decode(&[0x01, 0x05, b'a'], 1 << 16),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            d.decode(&hex("3fe2 1f"), 1 << 16),
            Err(HpackError::TableSize(4097))
        );
        assert_eq!(
            d.decode(&[0x82, 0x20], 1 << 16),
            Err(HpackError::LateTableSize)
        );
        assert_eq!(
            d.decode(&hex("01 7f ffffffff0f"), 1 << 16),
            Err(HpackError::Overflow)
        );
        assert_eq!(
            d.decode(&hex("01 84 ffffffff"), 1 << 16),
            Err(HpackError::Huffman)
        );
        assert_eq!(
            d.decode(&hex("01 81 00"), 1 << 16),
            Err(HpackError::Huffman)
        );
        // Zero-valued continuation bytes without end.
        let mut endless = hex("01 7f");
        endless.extend([0x80; 16]);
        assert_eq!(d.decode(&endless, 1 << 16), Err(HpackError::Overflow));
        // A list over the bound given.
        assert_eq!(d.decode(&hex("82 86"), 40), Err(HpackError::TooLarge(40)));
    }
}
