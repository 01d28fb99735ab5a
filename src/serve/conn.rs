//! One connection: TLS (when configured), then hyper's HTTP/1.1 and HTTP/2
//! with the server's limits, an idle timeout, and graceful shutdown. The same
//! code serves the HTTP façade and gRPC (tonic's generated services are
//! served through hyper here rather than by tonic's own server, so both have
//! one set of limits, one TLS handshake and one idle rule).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::listen::Accepted;

/// The limits every connection is served with; see the `Server` methods
/// of the same names for what each means and why its default.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: Option<usize>,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) keepalive_interval: Option<Duration>,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) grpc_max_message_size: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_concurrent_streams: 100,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            grpc_max_message_size: 4 * 1024 * 1024,
        }
    }
}

/// How one listener serves its connections.
pub(crate) struct Settings {
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    body_timeout: Duration,
    write_timeout: Duration,
}

impl Settings {
    /// `http2_only` for gRPC; the HTTP façade speaks both (HTTP/2 by prior
    /// knowledge, or by ALPN over TLS) with the same stream caps as gRPC.
    pub(crate) fn new(limits: &Limits, http2_only: bool, tls: Option<TlsAcceptor>) -> Settings {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper starts the header timer when it waits for a request head,
        // including the next one on a keep-alive connection: an HTTP/1.1
        // connection with nothing in flight closes after this long.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The head must fit the read buffer (else 431); hyper's minimum is 8 KiB.
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(limits.max_headers);
        // Measured before the cap: 2,000 stalled streams on one connection,
        // each reserving its declared message length, took +8 GB.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout);
        if http2_only {
            builder = builder.http2_only();
        }
        Settings {
            builder,
            tls,
            handshake_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            body_timeout: limits.body_timeout,
            write_timeout: limits.write_timeout,
        }
    }
}

/// What handlers may know about the connection a request came on, in the
/// request's extensions. Only inserted when it says something a handler
/// reads (a client certificate; a Unix socket, for the management API; the
/// peer's credentials, for the plugin registry): a plugin call pays no
/// allocation for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Peer {
    /// Came over a Unix socket (no browser can: the Host check is moot).
    pub(crate) unix: bool,
    /// The names of the verified client certificate (subject CN, DNS SANs).
    pub(crate) cert_names: Option<Arc<[String]>>,
    /// The Unix socket peer's user and process, from the kernel
    /// (`SO_PEERCRED`, as of its `connect`): who registers a plugin.
    pub(crate) cred: Option<(u32, Option<i32>)>,
}

/// Whether a request to `path` reads its [`Peer`] even without a client
/// certificate: the management API and the plugin registry.
fn reads_peer(path: &str) -> bool {
    crate::manifest::is_reserved_path(path) || path.starts_with("/plugins.PluginRegistry/")
}

/// The connection's bytes, holding its slot of the connection cap until
/// dropped. A write that cannot go on for `write_timeout` (a client that
/// stopped reading) fails, which ends the connection.
struct Conn {
    io: Io,
    _slot: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// Armed while a write waits; cleared by any progress.
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    fn new(io: Io, slot: OwnedSemaphorePermit, write_timeout: Duration) -> Conn {
        Conn {
            io,
            _slot: slot,
            write_timeout,
            stalled_since: None,
        }
    }

    /// `poll` is a write's (or flush's) answer: pending for too long is an error.
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled_since = None;
            return poll;
        }
        if ran_out(&mut self.stalled_since, self.write_timeout, cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of the response for the write timeout",
            )));
        }
        Poll::Pending
    }
}

/// Arms `timer` for `timeout` unless it is armed, and says whether it ran
/// out (else `cx` is woken when it does).
fn ran_out(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> bool {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
        .as_mut()
        .poll(cx)
        .is_ready()
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.io {
            Io::Tcp($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Unix($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $call
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        delegate!(this, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = delegate!(this, io => io.poll_write(cx, buf));
        this.bound_write(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = delegate!(this, io => io.poll_write_vectored(cx, bufs));
        this.bound_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(io) => io.is_write_vectored(),
            Io::Unix(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = delegate!(this, io => io.poll_flush(cx));
        this.bound_write(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = delegate!(this, io => io.poll_shutdown(cx));
        this.bound_write(cx, poll)
    }
}

/// Requests in flight on one connection, and whether any started or ended
/// lately: the idle rule's only inputs. Bytes alone do not count, so HTTP/2
/// PINGs cannot keep an unused connection (and its slot) forever.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    touched: AtomicBool,
}

/// One request in flight, from the call until its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.touched.store(true, Ordering::Relaxed);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touched.store(true, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once a whole `timeout` passed with no request in flight and
/// none starting or ending: the connection is then closed after between one
/// and two `timeout`s of idleness. Two relaxed stores per request, no wake-up.
/// The first period is `first` (if shorter): a connection that starts no
/// request that soon (one that says nothing, or never finishes its first
/// head or its HTTP/2 preface) is closed then.
async fn idle(activity: &Activity, first: Duration, timeout: Duration) {
    let mut period = first.min(timeout);
    loop {
        tokio::time::sleep(period).await;
        if !activity.touched.swap(false, Ordering::Relaxed)
            && activity.in_flight.load(Ordering::Relaxed) == 0
        {
            return;
        }
        period = timeout;
    }
}

/// The façade's service, counting requests for the idle rule and telling
/// handlers about the connection ([`Peer`]).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    peer: Option<Peer>,
    body_timeout: Duration,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: tower_service::Service<
            Request<axum::body::Body>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone,
{
    type Response = Response<Counted<B>>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(&self.activity);
        // Only requests that read it pay for it (two allocations): any
        // with a client certificate (callers are named by it), those to the
        // management API (its Host check skips Unix sockets), and those to
        // the plugin registry (it checks the caller's uid).
        if let Some(peer) = &self.peer
            && (peer.cert_names.is_some() || reads_peer(request.uri().path()))
        {
            request.extensions_mut().insert(peer.clone());
        }
        // Both façades are always ready (an axum router, and `HttpService`):
        // `call` without `poll_ready` is within their contract.
        let body_timeout = self.body_timeout;
        let request = request.map(|body| axum::body::Body::new(Timed::new(body, body_timeout)));
        let future = self.inner.clone().call(request);
        TrackedFuture {
            inner: future,
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<Counted<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        let Some(guard) = this.guard.take() else {
            unreachable!("polled after completion")
        };
        Poll::Ready(response.map(|r| r.map(|inner| Counted { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A request body that must have arrived whole `timeout` after it was
    /// first waited for: a client that declares a body and sends it slowly,
    /// or not at all, cannot hold its request (and its connection) open.
    /// No timer for a body that is there when it is read.
    struct Timed<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<B> Timed<B> {
    fn new(inner: B, timeout: Duration) -> Timed<B> {
        Timed {
            inner,
            timeout,
            deadline: None,
        }
    }
}

/// What a [`Timed`] body that ran out of time fails with.
#[derive(Debug)]
pub(crate) struct BodyTimedOut(Duration);

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body did not arrive within {:?}", self.0)
    }
}

impl std::error::Error for BodyTimedOut {}

impl<B> http_body::Body for Timed<B>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if ran_out(this.deadline, *this.timeout, cx) {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(*this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it
    /// is sent (or dropped): an event stream is a request in flight.
    struct Counted<B> {
        #[pin]
        inner: B,
        guard: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one accepted connection on its own task. `drain` is held until
/// the connection closes, so the listener can wait for all of them.
pub(crate) fn spawn<S, B>(
    accepted: Accepted,
    slot: OwnedSemaphorePermit,
    service: S,
    settings: Arc<Settings>,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) where
    S: tower_service::Service<
            Request<axum::body::Body>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let _drain = drain;
        let handshake = handshake(accepted, slot, &settings);
        let (conn, peer) = tokio::select! {
            done = handshake => match done {
                Some(done) => done,
                None => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let activity = Arc::new(Activity::default());
        let service = Tracked {
            inner: service,
            activity: Arc::clone(&activity),
            peer,
            body_timeout: settings.body_timeout,
        };
        let mut connection = pin!(
            settings
                .builder
                .serve_connection(TokioIo::new(conn), service)
        );
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection ended: {e}");
                    }
                    break;
                }
                // Stop taking requests, finish those in flight (event
                // streams end on the same flag).
                _ = shutdown.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = idle(&activity, settings.handshake_timeout, settings.idle_timeout), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    });
}

/// TLS, when the listener has it, bounded in time: a client that connects
/// and says nothing holds a slot for `handshake_timeout` at most.
async fn handshake(
    accepted: Accepted,
    slot: OwnedSemaphorePermit,
    settings: &Settings,
) -> Option<(Conn, Option<Peer>)> {
    let (io, peer) = match (accepted, &settings.tls) {
        (Accepted::Unix(stream), _) => {
            let cred = stream.peer_cred().ok().map(|c| (c.uid(), c.pid()));
            let peer = Peer {
                unix: true,
                cert_names: None,
                cred,
            };
            (Io::Unix(stream), Some(peer))
        }
        (Accepted::Tcp(stream), None) => (Io::Tcp(stream), None),
        (Accepted::Tcp(stream), Some(acceptor)) => {
            let tls =
                match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake failed: {e}");
                        return None;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return None;
                    }
                };
            let cert_names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| Arc::from(super::tls::cert_names(cert)));
            let peer = cert_names.map(|names| Peer {
                unix: false,
                cert_names: Some(names),
                cred: None,
            });
            (Io::Tls(Box::new(tls)), peer)
        }
    };
    Some((Conn::new(io, slot, settings.write_timeout), peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_the_client_never_reads_fails_at_the_write_timeout() {
        let (server, _client) = UnixStream::pair().unwrap();
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let mut conn = Conn::new(Io::Unix(server), slot, Duration::from_millis(100));
        // Far more than the socket buffers hold, and nobody reads.
        let response = vec![0u8; 64 << 20];
        let written = tokio::time::timeout(Duration::from_secs(10), conn.write_all(&response))
            .await
            .expect("the write timeout ended the write");
        assert_eq!(written.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn writes_that_progress_are_not_cut_off() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let mut conn = Conn::new(Io::Unix(server), slot, Duration::from_millis(100));
        let reader = tokio::spawn(async move {
            let mut read = 0;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match client.read(&mut buf).await.unwrap() {
                    0 => return read,
                    n => read += n,
                }
            }
        });
        conn.write_all(&vec![1u8; 8 << 20]).await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), 8 << 20);
    }
}
