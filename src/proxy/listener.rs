//! The accept loop: HTTP/1.1 and h2c on one port, bounded, with graceful shutdown.
//!
//! Limits are fields of [`ProxyConfig`](super::ProxyConfig), documented there.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::connection::{self, InFlight, Tracked};
use super::{Proxy, ProxyConfig, TunnelOrigin};

/// hyper refuses an HTTP/1 read buffer smaller than this.
const MIN_H1_BUF: usize = 8192;

/// The connection cap, shared by the accept loop (which takes a slot per connection) and
/// `/readyz` (which reports a proxy whose every slot is taken as not ready). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectionSlots {
    free: Arc<Semaphore>,
    limit: usize,
}

impl ConnectionSlots {
    pub(crate) fn new(limit: usize) -> Self {
        // At least one; at most what a shutdown can wait for in one acquire.
        let limit = limit.clamp(1, u32::MAX as usize);
        Self {
            free: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The cap: `ProxyConfig::max_connections`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        self.limit.saturating_sub(self.free.available_permits())
    }

    /// Every slot is taken: a new connection waits in the accept backlog.
    pub fn is_full(&self) -> bool {
        self.free.available_permits() == 0
    }
}

/// Paces an accept loop after `accept` fails (typically EMFILE or ENFILE: out of file
/// descriptors), which would otherwise fail again at once and spin a core: waits 10 ms,
/// doubling with each consecutive failure up to 1 s; a successful accept resets it.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// The wait after one more consecutive failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = Self::FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// Logs the failure and waits before the next accept.
    pub(crate) async fn after(&mut self, error: &std::io::Error, listener: &'static str) {
        let delay = self.next_delay();
        tracing::warn!(%error, listener, ?delay, "accept failed; backing off");
        tokio::time::sleep(delay).await;
    }
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, asks every open
/// connection to finish its in-flight requests (HTTP/1 closes after the current response,
/// HTTP/2 sends GOAWAY), and returns once they have. The caller bounds that wait with its
/// grace deadline (e.g. `tokio::time::timeout(grace, serve(...))`).
///
/// Each connection must send its first bytes within `header_read_timeout` (HTTP/1 then has
/// that long again for the rest of its head); one with no request in flight for that long is
/// closed (HTTP/2 included); and a write that the app does not read for `write_timeout`
/// closes it.
pub async fn serve(listener: TcpListener, proxy: Proxy, shutdown: impl Future<Output = ()>) {
    let cfg = proxy.config().clone();
    let builder = Arc::new(http_builder(&cfg));

    // Set when the listener stops: connections still in protocol detection are dropped at
    // once, the others are asked to finish their requests and close.
    let (stopping, _) = watch::channel(false);
    let slots = proxy.connection_slots();
    let mut backoff = AcceptBackoff::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Take a slot before accepting, so excess connections wait in the backlog rather than
        // being accepted and starved.
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            permit = slots.free.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    backoff.after(&e, "proxy").await;
                    continue;
                }
            },
        };
        backoff.reset();
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let hold = ConnectionHold {
            _slot: Arc::new(permit),
            stopping: stopping.subscribe(),
            builder: builder.clone(),
            peer,
        };
        let (idle_timeout, write_timeout) = (cfg.header_read_timeout, cfg.write_timeout);
        tokio::spawn(async move {
            let mut stopping = hold.stopping.clone();
            let detected = tokio::select! {
                d = connection::first_bytes(stream, idle_timeout, write_timeout) => d,
                _ = stopping.wait_for(|s| *s) => return,
            };
            let io = match detected {
                Ok(io) => io,
                Err(error) => {
                    tracing::debug!(%peer, %error, "app connection closed before a request");
                    return;
                }
            };
            let is_http2 = io.is_http2();
            serve_http(io, is_http2, proxy, hold, None).await;
        });
    }
    drop(listener);
    stopping.send_replace(true);
    // Every connection holds a slot until it has closed.
    let all = u32::try_from(slots.limit).unwrap_or(u32::MAX);
    let _ = slots.free.acquire_many(all).await;
}

/// The HTTP/1.1-and-h2 server every app connection is served with, plain or inside a tunnel.
fn http_builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(MIN_H1_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .keep_alive_interval(Some(cfg.h2_keep_alive_interval))
        .keep_alive_timeout(cfg.h2_keep_alive_timeout);
    builder
}

/// What an app connection holds while it is served, handed on to a `CONNECT` tunnel riding on
/// it (a request extension): its connection slot, so the tunnel counts against the cap until
/// it closes; the listener's stop signal; the HTTP server to serve the tunnel with.
#[derive(Clone)]
pub(crate) struct ConnectionHold {
    /// Held, never read: the slot is freed when the last holder drops it.
    _slot: Arc<OwnedSemaphorePermit>,
    stopping: watch::Receiver<bool>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    pub(crate) peer: SocketAddr,
}

impl ConnectionHold {
    /// The listener's stop signal: `true` once it has stopped accepting.
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.clone()
    }
}

/// Serves HTTP/1.1 or HTTP/2 (`is_http2`: what the client opened with) on `io` until it
/// closes, the listener stops (requests in flight finish first) or it is idle for the idle
/// timeout. The connection's slot is released when the last holder of `hold` is done.
/// With an `origin` (the connection is a tunnel's), every request is served as coming
/// through it; without one, a `CONNECT` carries `hold`, for the tunnel it opens.
pub(crate) async fn serve_http<I>(
    io: I,
    is_http2: bool,
    proxy: Proxy,
    hold: ConnectionHold,
    origin: Option<TunnelOrigin>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = proxy.config().header_read_timeout;
    let peer = hold.peer;
    let mut stopping = hold.stopping.clone();
    let builder = hold.builder.clone();
    // hyper closes an idle HTTP/1 connection itself (its head timeout), so only an HTTP/2
    // connection pays for counting its requests.
    let in_flight = is_http2.then(InFlight::new);
    let counted = in_flight.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        let proxy = proxy.clone();
        let guard = counted.as_ref().map(InFlight::start);
        if origin.is_none() && req.method() == Method::CONNECT {
            req.extensions_mut().insert(hold.clone());
        }
        // A clone of the origin is two reference counts: no allocation per request.
        let origin = origin.clone();
        async move {
            let resp = proxy.handle(req, origin).await;
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, guard)))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    enum Close {
        Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
        Stopping,
        Idle,
    }
    let close = tokio::select! {
        ended = conn.as_mut() => Close::Ended(ended),
        _ = stopping.wait_for(|s| *s) => Close::Stopping,
        () = async {
            match &in_flight {
                Some(in_flight) => in_flight.idle_for(idle_timeout).await,
                None => std::future::pending().await,
            }
        } => Close::Idle,
    };
    let ended = match close {
        Close::Ended(ended) => ended,
        Close::Stopping => {
            // HTTP/1 closes after the response in progress, HTTP/2 sends GOAWAY and lets its
            // streams finish; the caller bounds this with its grace period.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        Close::Idle => {
            // Nothing in flight: HTTP/2's GOAWAY handshake waits for a PING answer, which an
            // unresponsive client never sends, so it gets one more idle timeout before the
            // connection is simply dropped.
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(idle_timeout, conn)
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "app connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let delays: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(b.next_delay(), AcceptBackoff::MAX);
        }
        b.reset();
        assert_eq!(b.next_delay(), AcceptBackoff::FIRST);
    }

    #[test]
    fn slots_report_use_and_exhaustion() {
        let slots = ConnectionSlots::new(2);
        assert_eq!(
            (slots.limit(), slots.in_use(), slots.is_full()),
            (2, 0, false)
        );
        let a = slots.free.clone().try_acquire_owned().unwrap();
        let _b = slots.free.clone().try_acquire_owned().unwrap();
        assert_eq!((slots.in_use(), slots.is_full()), (2, true));
        drop(a);
        assert_eq!((slots.in_use(), slots.is_full()), (1, false));
    }
}
