//! One client connection at the byte level: the deadline on its first bytes (protocol
//! detection), the deadline on writes the client does not read, and the count of requests in
//! flight that decides when it is idle. Used by the proxy listener and the admin listener.
//!
//! hyper bounds a request head (`header_read_timeout`) only once it knows the connection is
//! HTTP/1, and its HTTP/1-or-h2c detection waits for bytes without a timer; a peer that sends
//! nothing, or part of the HTTP/2 preface, would hold a connection slot forever. So the first
//! bytes are read here, under a deadline, and handed back to hyper in front of the stream.
//! Writes are bounded the same way: a write that makes no progress for the write timeout
//! fails the connection, so an app that stops reading a large response loses it. And a
//! connection with no request in flight for the idle timeout is closed, HTTP/2 included.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// What an HTTP/2 client sends first; any other first bytes mean HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a connection was closed before hyper saw it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DetectError {
    #[error("no request within {0:?} of connecting")]
    Timeout(Duration),
    #[error("closed before sending a request")]
    Closed,
    #[error("reading the first bytes failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads the connection's first bytes until they decide the protocol (a byte that departs
/// from the HTTP/2 preface, or the whole preface), within `deadline`. Returns the stream
/// with those bytes in front of it, for hyper's own detection to read again at once.
pub(crate) async fn first_bytes(
    mut stream: TcpStream,
    deadline: Duration,
    write_timeout: Duration,
) -> Result<AppIo, DetectError> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let read = async {
        while filled < buf.len() {
            let n = stream.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Err(DetectError::Closed);
            }
            let was = filled;
            filled += n;
            if buf[was..filled] != H2_PREFACE[was..filled] {
                break;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(DetectError::Timeout(deadline)),
    }
    Ok(AppIo {
        stream,
        prefix: buf,
        prefix_start: 0,
        prefix_end: filled,
        write_timeout,
        stalled: None,
        stall_armed: false,
    })
}

/// The app's TCP stream, with the bytes [`first_bytes`] read replayed first and a deadline
/// on writes that make no progress.
pub(crate) struct AppIo {
    stream: TcpStream,
    prefix: [u8; H2_PREFACE.len()],
    prefix_start: usize,
    prefix_end: usize,
    write_timeout: Duration,
    /// The write deadline, made on the first write that returns `Pending`.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Whether `stalled` runs: set by a write that returns `Pending`, cleared by progress.
    stall_armed: bool,
}

impl AppIo {
    /// Whether the client opened with the HTTP/2 preface (h2c prior knowledge).
    pub(crate) fn is_http2(&self) -> bool {
        self.prefix[..self.prefix_end] == *H2_PREFACE
    }

    /// Passes a write's outcome through, failing it once writes have made no progress for
    /// the write timeout.
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall_armed = false;
            return polled;
        }
        let deadline = Instant::now() + self.write_timeout;
        // Kept allocated once made: a client reading slowly stalls again soon.
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stall_armed {
            sleep.as_mut().reset(deadline);
        }
        self.stall_armed = true;
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the app read nothing for the write timeout",
        )))
    }
}

impl AsyncRead for AppIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.prefix_start < this.prefix_end {
            let n = (this.prefix_end - this.prefix_start).min(buf.remaining());
            buf.put_slice(&this.prefix[this.prefix_start..this.prefix_start + n]);
            this.prefix_start += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AppIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.bound_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.bound_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.bound_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Requests in flight on one connection, so that a connection carrying none for the idle
/// timeout can be closed: hyper closes an idle HTTP/1 connection itself (its head timeout),
/// but keeps an HTTP/2 connection whose client answers PINGs open for ever.
#[derive(Clone)]
pub(crate) struct InFlight(Arc<watch::Sender<usize>>);

/// One request counted in flight until its response body is done with.
pub(crate) struct InFlightGuard(Arc<watch::Sender<usize>>);

impl InFlight {
    pub(crate) fn new() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }

    pub(crate) fn start(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.0.clone())
    }

    /// Resolves once no request has been in flight for `idle` in a row.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            // The sender lives in `self`: these waits cannot fail.
            let _ = rx.wait_for(|n| *n == 0).await;
            if tokio::time::timeout(idle, rx.wait_for(|n| *n > 0))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that keeps its request counted in flight until it is dropped (when the
/// connection counts them at all: only HTTP/2 connections do).
pub(crate) struct Tracked<B> {
    inner: B,
    _guard: Option<InFlightGuard>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, guard: Option<InFlightGuard>) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
