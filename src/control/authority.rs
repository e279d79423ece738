//! `:authority` normalisation for Unix-socket connections.
//!
//! Many gRPC clients send something that is not an authority as `:authority` when they dial
//! a Unix socket: grpcio (C core) since 1.57 the percent-encoded socket path
//! (`tmp%2Fsidekey%2Fgrpc.sock`), grpc-java and older grpc-go/grpcurl the path itself
//! (`/run/sidekey/grpc.sock`). h2 parses `:authority` as a URI authority and resets every
//! such stream with PROTOCOL_ERROR before tonic sees it, and has no option to relax that.
//! On a Unix socket the authority names nothing (there is one server at the path), so
//! [`NormalisedAuthority`] sits between the socket and h2: it decodes each request header
//! block the client sends and, when `:authority` is not a valid authority, replaces it with
//! `localhost` (what grpc-go and Kubernetes use for Unix sockets); every other field, and
//! every other frame, reaches h2 unchanged. TCP connections are not wrapped.
//!
//! The rewritten block is written as HPACK literals (see [`super::hpack`]); its frames are
//! at most the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which the control plane keeps.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::hpack::{self, Decoder, Field};

/// What replaces an `:authority` that is not one.
pub const UNIX_AUTHORITY: &[u8] = b"localhost";
/// The client connection preface (RFC 9113 3.4), passed through as is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// HTTP/2's default SETTINGS_MAX_FRAME_SIZE; the control plane does not raise it, so a
/// larger frame is a protocol error h2 would refuse too.
const MAX_FRAME: usize = 16_384;
/// Largest header block (all its HEADERS and CONTINUATION fragments) and largest decoded
/// header list accepted: four times the control plane's header list limit, so that h2,
/// not this layer, refuses the lists it considers too large.
const MAX_BLOCK: usize = 4 * super::MAX_HEADER_LIST as usize;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A Unix-socket connection whose request header blocks h2 reads with a valid
/// `:authority`. Writes go straight through.
pub struct NormalisedAuthority<Io> {
    io: Io,
    /// Read from the client, not yet framed.
    input: BytesMut,
    /// Ready for h2.
    output: BytesMut,
    state: State,
    /// The header block being collected, from a HEADERS frame without END_HEADERS.
    block: Option<Block>,
    decoder: Decoder,
    eof: bool,
}

enum State {
    /// Bytes of the preface still to pass.
    Preface(usize),
    FrameHeader,
    /// Payload bytes of a frame that is not part of a header block, still to pass.
    Payload(usize),
}

struct Block {
    stream_id: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields, when it had them.
    priority: Option<[u8; 5]>,
    fragments: BytesMut,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl<Io> NormalisedAuthority<Io> {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            input: BytesMut::new(),
            output: BytesMut::new(),
            state: State::Preface(PREFACE_LEN),
            block: None,
            decoder: Decoder::default(),
            eof: false,
        }
    }

    /// Moves every complete unit of `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Preface(left) | State::Payload(left) => {
                    let n = left.min(self.input.len());
                    self.output.put(self.input.split_to(n));
                    if n < left {
                        self.state = match self.state {
                            State::Preface(_) => State::Preface(left - n),
                            _ => State::Payload(left - n),
                        };
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    let Some(header) = self.input.get(..FRAME_HEADER_LEN) else {
                        return Ok(());
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream_id =
                        u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff;
                    if len > MAX_FRAME {
                        return Err(invalid("HTTP/2 frame larger than SETTINGS_MAX_FRAME_SIZE"));
                    }
                    if kind == HEADERS || kind == CONTINUATION {
                        if self.input.len() < FRAME_HEADER_LEN + len {
                            return Ok(());
                        }
                        self.input.advance(FRAME_HEADER_LEN);
                        let payload = self.input.split_to(len).freeze();
                        self.header_fragment(kind, flags, stream_id, payload)?;
                    } else {
                        if self.block.is_some() {
                            return Err(invalid("HTTP/2 frame inside a header block"));
                        }
                        self.output.put(self.input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Payload(len);
                    }
                }
            }
        }
    }

    fn header_fragment(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        mut payload: Bytes,
    ) -> io::Result<()> {
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(invalid("HTTP/2 HEADERS inside a header block"));
            }
            let padding = if flags & PADDED != 0 {
                if payload.is_empty() {
                    return Err(invalid("HTTP/2 HEADERS padding missing"));
                }
                usize::from(payload.get_u8())
            } else {
                0
            };
            let priority = if flags & PRIORITY != 0 {
                let fields = payload
                    .get(..5)
                    .and_then(|p| <[u8; 5]>::try_from(p).ok())
                    .ok_or_else(|| invalid("HTTP/2 HEADERS priority missing"))?;
                payload.advance(5);
                Some(fields)
            } else {
                None
            };
            if padding > payload.len() {
                return Err(invalid("HTTP/2 HEADERS padding too long"));
            }
            payload.truncate(payload.len() - padding);
            self.block = Some(Block {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragments: BytesMut::new(),
            });
        }
        let block = match self.block.as_mut() {
            Some(b) if b.stream_id == stream_id => b,
            _ => return Err(invalid("HTTP/2 CONTINUATION outside its header block")),
        };
        if block.fragments.len() + payload.len() > MAX_BLOCK {
            return Err(invalid("HTTP/2 header block too large"));
        }
        block.fragments.put(payload);
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.rewrite(block)?;
        }
        Ok(())
    }

    /// Decodes a complete block, normalises `:authority`, and writes it as HEADERS and
    /// CONTINUATION frames.
    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        let mut fields = self
            .decoder
            .decode(&block.fragments, MAX_BLOCK)
            .map_err(|e| invalid(e.to_string()))?;
        normalise(&mut fields);
        let mut encoded = BytesMut::new();
        if let Some(priority) = block.priority {
            encoded.put_slice(&priority);
        }
        hpack::encode(&fields, &mut encoded);
        let mut kind = HEADERS;
        let mut flags = if block.end_stream { END_STREAM } else { 0 }
            | if block.priority.is_some() {
                PRIORITY
            } else {
                0
            };
        loop {
            let chunk = encoded.split_to(encoded.len().min(MAX_FRAME));
            if encoded.is_empty() {
                flags |= END_HEADERS;
            }
            let len = chunk.len();
            self.output
                .put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            self.output.put_u32(block.stream_id);
            self.output.put(chunk);
            if encoded.is_empty() {
                return Ok(());
            }
            (kind, flags) = (CONTINUATION, 0);
        }
    }
}

/// Replaces an `:authority` that h2 would refuse with [`UNIX_AUTHORITY`].
fn normalise(fields: &mut [Field]) {
    for f in fields.iter_mut() {
        if f.name.as_ref() == b":authority"
            && http::uri::Authority::try_from(f.value.as_ref()).is_err()
        {
            f.value = Bytes::from_static(UNIX_AUTHORITY);
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for NormalisedAuthority<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.input.put_slice(read.filled());
                    this.process()?;
                }
                other => return other,
            }
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for NormalisedAuthority<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<Io: Connected> Connected for NormalisedAuthority<Io> {
    type ConnectInfo = Io::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        hpack::encode(
            &[Field {
                name: Bytes::copy_from_slice(name),
                value: Bytes::copy_from_slice(value),
                never_indexed: false,
            }],
            &mut out,
        );
        out.to_vec()
    }

    /// Feeds `input` one byte at a time (the worst split) and returns what h2 would read.
    fn through(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut n = NormalisedAuthority::new(());
        let mut out = Vec::new();
        for b in input {
            n.input.put_u8(*b);
            n.process()?;
            out.extend(n.output.split());
        }
        Ok(out)
    }

    fn decoded_headers(out: &[u8]) -> Vec<Field> {
        let mut rest = &out[PREFACE_LEN..];
        let mut block = Vec::new();
        while rest.len() >= FRAME_HEADER_LEN {
            let len = usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
            if kind == HEADERS || kind == CONTINUATION {
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                block.extend(&payload[skip..]);
            }
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        Decoder::default().decode(&block, 1 << 20).unwrap()
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_everything_else_passes() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut input = preface.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.extend(literal(b":authority", b"/run/sidekey/grpc.sock"));
        block.extend(literal(b":path", b"/grpc.health.v1.Health/Check"));
        // HEADERS, padded and with priority, split over a CONTINUATION.
        let mut headers = vec![3u8];
        headers.extend([0, 0, 0, 0, 15]);
        headers.extend(&block[..10]);
        headers.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[10..]));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
        let out = through(&input).unwrap();
        assert_eq!(&out[..PREFACE_LEN + 9], &input[..PREFACE_LEN + 9]);
        let fields = decoded_headers(&out);
        let authority = fields.iter().find(|f| f.name == ":authority").unwrap();
        assert_eq!(authority.value, "localhost");
        assert_eq!(fields.len(), 4);
        assert!(out.ends_with(&frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])));
        // One HEADERS frame with the priority kept, no padding.
        let headers_at = PREFACE_LEN + 9;
        assert_eq!(out[headers_at + 3], HEADERS);
        assert_eq!(out[headers_at + 4], PRIORITY | END_HEADERS);
        assert_eq!(&out[headers_at + 9..headers_at + 14], &[0, 0, 0, 0, 15]);
    }

    #[test]
    fn a_valid_authority_is_kept() {
        for valid in [&b"localhost"[..], b"127.0.0.1:50051", b"sidekey.internal"] {
            let mut fields = vec![Field {
                name: Bytes::from_static(b":authority"),
                value: Bytes::copy_from_slice(valid),
                never_indexed: false,
            }];
            normalise(&mut fields);
            assert_eq!(fields[0].value, valid);
        }
        for invalid in [
            &b"tmp%2Fsidekey%2Fgrpc.sock"[..],
            b"/tmp/grpc.sock",
            b"unix:/x y",
        ] {
            let mut fields = vec![Field {
                name: Bytes::from_static(b":authority"),
                value: Bytes::copy_from_slice(invalid),
                never_indexed: false,
            }];
            normalise(&mut fields);
            assert_eq!(fields[0].value, "localhost");
        }
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut block = literal(b":authority", b"/tmp/s.sock");
        block.extend(literal(b"x-big", &[b'v'; 20_000]));
        // Sent as two fragments under the frame limit.
        input.extend(frame(HEADERS, END_STREAM, 3, &block[..16_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block[16_000..]));
        let out = through(&input).unwrap();
        let first = PREFACE_LEN;
        assert_eq!(
            usize::from(out[first + 1]) << 8 | usize::from(out[first + 2]),
            16_384
        );
        assert_eq!(out[first + 4], END_STREAM);
        let second = first + 9 + 16_384;
        assert_eq!(out[second + 3], CONTINUATION);
        assert_eq!(out[second + 4], END_HEADERS);
        assert_eq!(decoded_headers(&out)[1].value.len(), 20_000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever follows the preface, framing ends in bytes for h2 or an error, never a
        /// panic; frames are given valid lengths half the time so the rewriting is reached.
        #[test]
        fn any_frames_pass_or_are_refused(
            frames in proptest::collection::vec(
                (0u8..12, proptest::prelude::any::<u8>(), 0u32..4,
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48)),
                0..6,
            )
        ) {
            let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            for (kind, flags, stream, payload) in frames {
                input.extend(frame(kind, flags, stream, &payload));
            }
            let _ = through(&input);
        }
    }

    #[test]
    fn refuses_broken_framing() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let with = |frames: &[Vec<u8>]| {
            let mut input = preface.clone();
            for f in frames {
                input.extend(f);
            }
            through(&input)
        };
        let block = literal(b":path", b"/");
        // A frame interleaved in a header block; a CONTINUATION of another stream or with
        // no block; an oversized frame; an undecodable block; padding longer than the frame.
        assert!(with(&[frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, &[])]).is_err());
        assert!(
            with(&[
                frame(HEADERS, 0, 1, &block),
                frame(CONTINUATION, END_HEADERS, 3, &block)
            ])
            .is_err()
        );
        assert!(with(&[frame(CONTINUATION, END_HEADERS, 1, &block)]).is_err());
        assert!(with(&[frame(0x0, 0, 1, &vec![0; MAX_FRAME + 1])]).is_err());
        assert!(with(&[frame(HEADERS, END_HEADERS, 1, &[0x80])]).is_err());
        assert!(with(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])]).is_err());
        // A block over the bound, however it is fragmented.
        let big = vec![0x82; MAX_FRAME];
        let mut frames = vec![frame(HEADERS, 0, 1, &big)];
        frames.extend((0..4).map(|_| frame(CONTINUATION, 0, 1, &big)));
        assert!(with(&frames).is_err());
    }
}
