//! Connections to vendors, kept per host: idle HTTP/1.1 connections (one request at a time)
//! and shared HTTP/2 connections, each carrying up to a configured number of streams at once;
//! when every one is that busy, another is dialed, and spare ones close at the next sweep once
//! they carry nothing.
//!
//! Written for this proxy's traffic rather than taken from hyper-util's general client: a
//! handful of vendor hosts, every request over TLS, most responses small. A request takes an
//! idle connection with one short lock, sends on it, and hands it back when the response
//! body has been read to its end, in the task that read it; no task is spawned and no
//! connector is cloned per request.
//!
//! A connection goes back into the pool only once its response has been read in full and it
//! is ready for the next request; a response body dropped half-read closes its connection
//! (HTTP/1.1 cannot skip the rest). Idle connections are kept up to a count per host and for
//! an idle timeout, after which a background sweep closes them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::Either;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};

use super::Body;

/// Idle HTTP/1.1 connections and the HTTP/2 connection of every vendor host dialed so far.
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: Mutex<HashMap<Arc<str>, Host>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    /// Streams in flight on one HTTP/2 connection before another is dialed.
    max_streams: usize,
    sweeping: AtomicBool,
}

struct Host {
    key: Arc<str>,
    /// The `Host` header of HTTP/1.1 requests, built once.
    host_header: HeaderValue,
    /// Most recently returned last: reused first, so spare connections age out.
    idle: Vec<Idle>,
    /// Oldest first: new streams fill the oldest connection that has room.
    http2: Vec<Http2Conn>,
}

struct Http2Conn {
    sender: http2::SendRequest<Body>,
    streams: Arc<AtomicUsize>,
}

/// One stream counted against its HTTP/2 connection until its response body is done with.
pub(crate) struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    fn start(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::AcqRel);
        Self(streams.clone())
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// A connection taken from the pool or just made, ready to carry one request.
pub(crate) enum Conn {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>, StreamCount),
}

/// Where a connection goes back to; also what [`Pool::checkout`] found for the host.
pub(crate) struct Slot {
    inner: Arc<Inner>,
    key: Arc<str>,
    host_header: HeaderValue,
}

/// Why sending on a connection failed.
pub(crate) enum SendError {
    /// The connection was closed before the request was written: the request is handed back
    /// (in the form that connection wanted: origin-form with `Host` for HTTP/1.1) and may go
    /// on another connection.
    NotSent(Box<Request<Body>>, hyper::Error),
    /// The request may have reached the vendor; it must not be sent again.
    Failed(hyper::Error),
}

impl Pool {
    pub(crate) fn new(
        max_idle_per_host: usize,
        idle_timeout: Duration,
        max_streams: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                hosts: Mutex::new(HashMap::new()),
                max_idle_per_host,
                idle_timeout,
                max_streams: max_streams.max(1),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// The pool's place for `authority`, and a connection to it if one is usable now.
    pub(crate) fn checkout(
        &self,
        authority: &Authority,
    ) -> Result<(Slot, Option<Conn>), http::header::InvalidHeaderValue> {
        let mut hosts = self.inner.lock();
        let host = match hosts.get_mut(authority.as_str()) {
            Some(host) => host,
            None => {
                let key: Arc<str> = Arc::from(authority.as_str());
                let host_header = HeaderValue::from_str(authority.as_str())?;
                hosts.entry(key.clone()).or_insert(Host {
                    key,
                    host_header,
                    idle: Vec::new(),
                    http2: Vec::new(),
                })
            }
        };
        let slot = Slot {
            inner: self.inner.clone(),
            key: host.key.clone(),
            host_header: host.host_header.clone(),
        };
        let conn = host.take(self.inner.max_streams);
        Ok((slot, conn))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Host>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sweep(&self) {
        let now = Instant::now();
        let mut hosts = self.lock();
        for host in hosts.values_mut() {
            host.idle.retain(|i| {
                !i.sender.is_closed() && now.duration_since(i.since) < self.idle_timeout
            });
            host.http2.retain(|c| !c.sender.is_closed());
            // The first connection stays; spares go once they carry nothing.
            let mut first = true;
            host.http2.retain(|c| {
                let keep = first || c.streams.load(Ordering::Acquire) > 0;
                first = false;
                keep
            });
        }
    }
}

impl Host {
    fn take(&mut self, max_streams: usize) -> Option<Conn> {
        self.http2.retain(|c| !c.sender.is_closed());
        if !self.http2.is_empty() {
            // The vendor speaks HTTP/2: a connection with room, or none (dial another).
            return self
                .http2
                .iter()
                .find(|c| c.streams.load(Ordering::Acquire) < max_streams)
                .map(|c| Conn::Http2(c.sender.clone(), StreamCount::start(&c.streams)));
        }
        while let Some(idle) = self.idle.pop() {
            if idle.sender.is_ready() {
                return Some(Conn::Http1(idle.sender));
            }
        }
        None
    }
}

impl Slot {
    /// Keeps a new HTTP/2 connection for other requests to share, and returns it carrying
    /// the stream of the request it was dialed for.
    pub(crate) fn share_http2(&self, sender: http2::SendRequest<Body>) -> Conn {
        self.inner.start_sweeping();
        let streams = Arc::new(AtomicUsize::new(0));
        let stream = StreamCount::start(&streams);
        let mut hosts = self.inner.lock();
        if let Some(host) = hosts.get_mut(&self.key) {
            host.http2.push(Http2Conn {
                sender: sender.clone(),
                streams,
            });
        }
        Conn::Http2(sender, stream)
    }

    /// Sends `req` (absolute `https://` URI) on `conn`.
    ///
    /// Returns a combinator rather than being an `async fn`: this future is part of every
    /// proxied request's state, and an `async fn` would also keep a copy of `req` beside
    /// hyper's own future that already holds it.
    pub(crate) fn send(
        &self,
        conn: Conn,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<VendorBody>, SendError>> + Send + 'static {
        match conn {
            Conn::Http2(mut sender, stream) => {
                Either::Left(sender.try_send_request(req).map(move |sent| {
                    let resp = sent.map_err(not_sent)?;
                    Ok(resp.map(|body| VendorBody {
                        inner: body,
                        checkin: None,
                        _stream: Some(stream),
                    }))
                }))
            }
            Conn::Http1(mut sender) => {
                // HTTP/1.1 to an origin: origin-form request target and a Host header. The
                // path is moved out of the absolute URI, not cloned: a clone of its bytes
                // would allocate on every request.
                let path = std::mem::take(req.uri_mut())
                    .into_parts()
                    .path_and_query
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from(path);
                req.headers_mut().insert(HOST, self.host_header.clone());
                let sent = sender.try_send_request(req);
                let checkin = Checkin {
                    inner: self.inner.clone(),
                    key: self.key.clone(),
                    sender: Some(sender),
                };
                Either::Right(sent.map(move |sent| {
                    let resp = sent.map_err(not_sent)?;
                    Ok(resp.map(|body| VendorBody {
                        inner: body,
                        checkin: Some(checkin),
                        _stream: None,
                    }))
                }))
            }
        }
    }
}

/// Spawns `task` on the current runtime. A response body can be dropped outside one (while
/// a runtime shuts down, or by a caller off the runtime); the pool's background work is then
/// skipped, and a connection it would have kept is closed instead.
fn spawn_if_running(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}

fn not_sent(mut e: TrySendError<Request<Body>>) -> SendError {
    match e.take_message() {
        Some(req) => SendError::NotSent(Box::new(req), e.into_error()),
        None => SendError::Failed(e.into_error()),
    }
}

impl Inner {
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) {
            return;
        }
        // Off a runtime (see `spawn_if_running`) the sweep starts with a later checkin.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_secs(1));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.sweep(),
                    None => return,
                }
            }
        });
    }

    fn checkin(self: &Arc<Self>, key: &str, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if !sender.is_ready() {
            // Not idle yet (the vendor answered before the request body was sent in full):
            // wait for it off the request path.
            let inner = self.clone();
            let key: Arc<str> = Arc::from(key);
            let mut sender = sender;
            spawn_if_running(async move {
                if sender.ready().await.is_ok() {
                    inner.put(&key, sender);
                }
            });
            return;
        }
        self.put(key, sender);
    }

    fn put(self: &Arc<Self>, key: &str, sender: http1::SendRequest<Body>) {
        self.start_sweeping();
        let mut hosts = self.lock();
        if let Some(host) = hosts.get_mut(key)
            && host.idle.len() < self.max_idle_per_host
        {
            host.idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A vendor's response body, streamed. Reading it to the end returns its HTTP/1.1
/// connection to the pool; dropping it earlier closes that connection.
pub struct VendorBody {
    inner: Incoming,
    checkin: Option<Checkin>,
    /// HTTP/2: the stream stays counted against its connection until the body is dropped.
    _stream: Option<StreamCount>,
}

struct Checkin {
    inner: Arc<Inner>,
    key: Arc<str>,
    sender: Option<http1::SendRequest<Body>>,
}

impl Checkin {
    fn done(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.inner.checkin(&self.key, sender);
        }
    }
}

impl http_body::Body for VendorBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(checkin) = &mut self.checkin
        {
            checkin.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for VendorBody {
    fn drop(&mut self) {
        // A body that was empty, or known complete, is never polled to its end by a server
        // that checks `is_end_stream` first: its connection is still reusable.
        if self.inner.is_end_stream()
            && let Some(checkin) = &mut self.checkin
        {
            checkin.done();
        }
    }
}

impl std::fmt::Debug for VendorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorBody").finish_non_exhaustive()
    }
}
