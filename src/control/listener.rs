//! The control plane's listener: where it binds (TCP or a Unix socket, created safely), and
//! the stream of accepted connections handed to tonic, with the bounds tonic has no knob
//! for: a cap on open connections, a deadline on the HTTP/2 connection preface, TCP_NODELAY,
//! and a back-off when accepting fails for want of resources (EMFILE) instead of a spin.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use super::authority::NormalisedAuthority;

/// Most control-plane connections open at once; further clients wait in the kernel's
/// accept backlog until one closes. Operators and provisioning jobs need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// `sidekey_control_accept_errors_total`: accepts failed for want of resources.
pub const METRIC_ACCEPT_ERRORS: &str = "sidekey_control_accept_errors_total";

/// Registers the help text of [`METRIC_ACCEPT_ERRORS`].
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_ACCEPT_ERRORS,
        "Control-plane accepts that failed for want of resources (EMFILE, ENFILE, ENOMEM)"
    );
}

/// How long a new connection has to send the HTTP/2 connection preface and its first frame
/// header; a connection that does not is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes that make up the handshake the deadline covers: the 24-byte preface and the 9-byte
/// header of the client's SETTINGS frame.
const HANDSHAKE_BYTES: usize = 24 + 9;
/// First pause after an accept error that is not about one connection (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM); doubled on each further error up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where the control plane listens: `HOST:PORT`, or `unix:/path` for a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrpcListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for GrpcListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/sidekey/grpc.sock".into());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            crate::listen_addr::parse(s)
                .map(Self::Tcp)
                .map_err(|e| format!("{e}, nor unix:/path"))
        }
    }
}

/// A bound control-plane listener.
pub enum GrpcListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// How long probing an existing socket file may take before it is taken to be live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl GrpcListener {
    /// Binds `listen`. At a Unix socket path, only a stale socket (a socket file nobody
    /// accepts on, left by a sidekey that died) is replaced; a live socket, or a file of any
    /// other kind, is refused and left alone. The socket is owner-only (0600) from the
    /// moment it appears at `path`.
    pub async fn bind(listen: &GrpcListen) -> io::Result<Self> {
        match listen {
            GrpcListen::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            GrpcListen::Unix(path) => {
                remove_stale_socket(path).await?;
                Ok(Self::Unix(bind_private_socket(path)?, path.clone()))
            }
        }
    }

    /// The address a client dials: `http://IP:PORT` or `unix:/path`.
    pub fn client_url(&self) -> String {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}"),
                Err(_) => String::from("http://<unbound>"),
            },
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Removes `path` if it is a socket nobody accepts on; refuses anything else that is there.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; sidekey replaces only a stale socket. \
                 Choose another path, or remove the file if it is not needed",
                path.display()
            ),
        ));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Err(_) | Ok(Ok(_)) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        )),
        // Refused: a socket file with no listener behind it.
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} is a socket sidekey cannot probe ({e}); it is left alone",
                path.display()
            ),
        )),
    }
}

/// Binds a Unix socket at `path` that is never reachable by other users, without changing
/// the process umask (which is process-wide, and not settable without `unsafe`): the socket
/// is bound inside a fresh directory of mode 0700, where only this user can reach it, made
/// 0600 there, then hard-linked to `path`. `link(2)` never replaces an existing file, so a
/// file that appeared at `path` meanwhile is refused, not clobbered.
fn bind_private_socket(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let private = parent.join(format!(".sidekey-bind-{}-{nonce}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("grpc.sock");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&inner, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    let listener = bound?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// A listener the accept loop can take connections from.
pub(super) trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Small request-response calls: without it, Nagle and delayed ACKs add ~40 ms.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Accept for UnixListener {
    /// Clients dialling a socket often send its path as `:authority`: see [`super::authority`].
    type Io = NormalisedAuthority<UnixStream>;
    async fn accept(&self) -> io::Result<Self::Io> {
        UnixListener::accept(self)
            .await
            .map(|(s, _)| NormalisedAuthority::new(s))
    }
}

/// Errors about one connection (it went away before it was accepted, or setting an option
/// on it failed): the next accept is tried at once. Any other error is about the process or
/// the system and is retried after a pause.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::NotConnected
    )
}

/// The accepted connections of `listener`, at most [`MAX_CONNECTIONS`] open at once.
pub(super) fn incoming<L: Accept>(
    listener: L,
    limits: Limits,
) -> impl Stream<Item = io::Result<Bounded<L::Io>>> + Send {
    struct State<L> {
        listener: L,
        slots: Arc<Semaphore>,
        backoff: Duration,
        limits: Limits,
    }
    let state = State {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        backoff: ACCEPT_BACKOFF_MIN,
        limits,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        // The permit is taken before accepting: at the cap, connections wait in the backlog.
        let permit = s.slots.clone().acquire_owned().await.ok()?;
        loop {
            match s.listener.accept().await {
                Ok(io) => {
                    s.backoff = ACCEPT_BACKOFF_MIN;
                    let conn = Bounded::new(io, permit, s.limits.handshake_timeout);
                    return Some((Ok(conn), s));
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    if s.backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!(error = %e, "control plane cannot accept connections; backing off");
                    }
                    metrics::counter!(METRIC_ACCEPT_ERRORS).increment(1);
                    tokio::time::sleep(s.backoff).await;
                    s.backoff = (s.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    })
}

/// The listener's bounds; [`Limits::default`] holds the documented constants.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// An accepted connection holding one of the listener's slots until it is dropped, whose
/// reads fail once the handshake deadline passes without the handshake bytes received.
pub struct Bounded<Io> {
    io: Io,
    _slot: OwnedSemaphorePermit,
    /// Set until [`HANDSHAKE_BYTES`] have been read.
    handshake: Option<Pin<Box<Sleep>>>,
    handshake_left: usize,
}

impl<Io> Bounded<Io> {
    fn new(io: Io, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        Self {
            io,
            _slot: slot,
            handshake: Some(Box::pin(tokio::time::sleep(timeout))),
            handshake_left: HANDSHAKE_BYTES,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Bounded<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.handshake_left = this.handshake_left.saturating_sub(read);
                if this.handshake_left == 0 || read == 0 {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .handshake
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 handshake within the deadline",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Bounded<Io> {
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

impl<Io: Connected> Connected for Bounded<Io> {
    type ConnectInfo = Io::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_backed_off_not_retried_at_once() {
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: about the process, not one connection.
        for errno in [24, 23, 105, 12] {
            assert!(
                !is_per_connection(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // ECONNABORTED, EINTR: one connection; the next accept goes ahead.
        for errno in [103, 4] {
            assert!(
                is_per_connection(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}
