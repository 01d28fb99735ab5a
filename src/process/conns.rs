//! The host's connections to one runner process.
//!
//! A pool of Unix stream connections, one call at a time on each: a caller
//! takes an idle connection (or opens one), writes its `CALL` and reads the
//! `REPLY` on its own thread, so concurrent callers never queue behind one
//! another, and the runner calls the plugin on the thread that reads the
//! connection. Blocking callers use blocking sockets (no runtime, no thread
//! hop: the round trip is two context switches); async callers use tokio
//! sockets of their own runtime, kept apart per runtime as in `remote/link.rs`.
//!
//! A call whose deadline passes returns at once; its connection goes to a
//! watchdog that waits for the late reply until the deadline plus a grace
//! period, and then kills the process: the only way to stop code that
//! ignores its deadline. The supervisor then restarts it.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{self, Fields, Frame};
use crate::Context;
use crate::exec::child::Handle;
use crate::exec::logs::Logs;
use crate::remote::link::{Address, CallError};
use crate::remote::runtime;

/// Idle connections kept per pool (beyond them, connections are closed
/// after their call).
const MAX_IDLE: usize = 64;
/// How often a blocking call whose context has a cancel token looks at it
/// (the token is a flag, with nothing to wake a waiting thread).
const CANCEL_POLL: Duration = Duration::from_millis(5);
/// A receive buffer larger than this is not kept for the next call.
const KEEP_BUFFER: usize = 1024 * 1024;

/// Why a call got no reply.
#[derive(Debug)]
pub(crate) enum Failed {
    /// No connection could be made: nothing was sent.
    Connect(String),
    /// The deadline passed; the call may still run in the process.
    Deadline,
    /// The connection was lost during the call: how the process ended
    /// (if it did) and the last line it wrote on stderr.
    Lost { how: String, stderr: Option<String> },
    /// The runner answered outside the protocol.
    Bad(String),
}

/// The connections to one runner process.
pub(crate) struct Conns {
    path: PathBuf,
    /// `path`, as links name their server.
    address: Address,
    child: Handle,
    logs: Arc<Logs>,
    idle: Mutex<Vec<Conn>>,
    idle_async: Mutex<Vec<AsyncConn>>,
    /// The id of the next call.
    next_id: AtomicU64,
}

/// A frame being received, kept across reads (and across a hand-over to a
/// watchdog, so a reply cut by a timeout is read on from where it stopped).
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    filled: usize,
}

impl Inbox {
    /// Where the next bytes go, or `None` once a whole frame is in.
    fn next_range(&mut self) -> io::Result<Option<Range<usize>>> {
        if self.filled < 4 {
            if self.buf.len() < 4 {
                self.buf.resize(4, 0);
            }
            return Ok(Some(self.filled..4));
        }
        let head: [u8; 4] = self.buf[..4].try_into().expect("4 bytes");
        let total = 4 + wire::frame_len(head)?;
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        Ok((self.filled < total).then_some(self.filled..total))
    }

    /// The frame received: its kind, then its fields.
    fn frame(&self) -> &[u8] {
        &self.buf[4..self.filled]
    }

    fn reset(&mut self) {
        self.filled = 0;
        if self.buf.len() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
    }
}

struct Conn {
    stream: UnixStream,
    inbox: Inbox,
    out: Vec<u8>,
    /// The read timeout set on the socket.
    timeout: Option<Duration>,
}

impl Conn {
    fn read(&mut self) -> io::Result<()> {
        while let Some(range) = self.inbox.next_range()? {
            let n = self.stream.read(&mut self.inbox.buf[range])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.inbox.filled += n;
        }
        Ok(())
    }
}

struct AsyncConn {
    stream: tokio::net::UnixStream,
    runtime: tokio::runtime::Id,
    inbox: Inbox,
    out: Vec<u8>,
}

async fn read_async(stream: &mut tokio::net::UnixStream, inbox: &mut Inbox) -> io::Result<()> {
    while let Some(range) = inbox.next_range()? {
        // `read` is cancel-safe: a dropped read loses no byte.
        let n = stream.read(&mut inbox.buf[range]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        inbox.filled += n;
    }
    Ok(())
}

impl Conns {
    pub(crate) fn new(address: Address, child: Handle, logs: Arc<Logs>) -> Conns {
        let path = match &address {
            Address::Unix(path, _) => path.clone(),
            Address::Tcp(_) => unreachable!("runners listen on Unix sockets"),
        };
        Conns {
            path,
            address,
            child,
            logs,
            idle: Mutex::default(),
            idle_async: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Readiness and health: `PING` on a new connection, answered by a
    /// `PONG` of this protocol version.
    /// Where the runner listens.
    pub(crate) fn address(&self) -> &Address {
        &self.address
    }

    pub(crate) async fn ping(&self) -> Result<(), CallError> {
        let mut stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| CallError::Connect(e.to_string()))?;
        let ping = Frame::start(Vec::new(), wire::PING).finish();
        let lost = |e: io::Error| CallError::Lost(e.to_string());
        stream.write_all(&ping).await.map_err(lost)?;
        let mut inbox = Inbox::default();
        read_async(&mut stream, &mut inbox).await.map_err(lost)?;
        let frame = inbox.frame();
        let bad =
            |what: String| CallError::BadReply(format!("the runner answered Ping with {what}"));
        if frame[0] != wire::PONG {
            return Err(bad(format!("a frame of kind {}", frame[0])));
        }
        let version = Fields::new(&frame[1..])
            .varint()
            .map_err(|e| bad(e.to_string()))?;
        if version != u64::from(wire::VERSION) {
            return Err(bad(format!(
                "protocol version {version}, not {}",
                wire::VERSION
            )));
        }
        Ok(())
    }

    /// One call from a blocking caller; `grace` past the deadline, a call
    /// still running gets the process killed.
    pub(crate) fn call(&self, ctx: &mut Context, grace: Duration) -> Result<(u8, String), Failed> {
        let deadline = ctx.deadline();
        let left = left(deadline)?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => Conn {
                stream: UnixStream::connect(&self.path)
                    .map_err(|e| Failed::Connect(e.to_string()))?,
                inbox: Inbox::default(),
                out: Vec::new(),
                timeout: None,
            },
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conn.out = wire::call(std::mem::take(&mut conn.out), id, ctx, left.map(nanos));
        if let Err(e) = conn.stream.write_all(&conn.out) {
            return Err(self.lost_blocking(e));
        }
        let token = ctx.existing_cancel_token().cloned();
        let mut cancelled = false;
        loop {
            // A zero timeout is refused by the socket: 1 µs is as good.
            let mut timeout = deadline.map(|d| {
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_micros(1))
            });
            if token.is_some() && !cancelled {
                timeout = Some(timeout.map_or(CANCEL_POLL, |t| t.min(CANCEL_POLL)));
            }
            if timeout != conn.timeout {
                if let Err(e) = conn.stream.set_read_timeout(timeout) {
                    return Err(self.lost_blocking(e));
                }
                conn.timeout = timeout;
            }
            match conn.read() {
                Ok(()) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(deadline) = deadline.filter(|d| Instant::now() >= *d) {
                        self.watch(conn.stream, conn.inbox, ctx.label(), deadline, grace);
                        return Err(Failed::Deadline);
                    }
                    // Cancelled: the plugin is told, and its answer awaited
                    // as for a `pooled` call.
                    if !cancelled && token.as_ref().is_some_and(|t| t.is_cancelled()) {
                        cancelled = true;
                        self.cancel(id);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost_blocking(e)),
            }
        }
        let reply = apply(conn.inbox.frame(), ctx);
        conn.inbox.reset();
        if reply.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        reply
    }

    /// One call from an async caller inside a tokio runtime; dropping the
    /// future leaves the call to a watchdog, as a passed deadline does.
    pub(crate) async fn call_async(
        &self,
        ctx: &mut Context,
        grace: Duration,
    ) -> Result<(u8, String), Failed> {
        let deadline = ctx.deadline();
        let left = left(deadline)?;
        let runtime = tokio::runtime::Handle::current().id();
        let idle = {
            let mut idle = self.idle_async.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter()
                .rposition(|c| c.runtime == runtime)
                .map(|at| idle.swap_remove(at))
        };
        let conn = match idle {
            Some(conn) => conn,
            None => AsyncConn {
                stream: tokio::net::UnixStream::connect(&self.path)
                    .await
                    .map_err(|e| Failed::Connect(e.to_string()))?,
                runtime,
                inbox: Inbox::default(),
                out: Vec::new(),
            },
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pending = Pending {
            conns: self,
            conn: Some(conn),
            id,
            sent: false,
            label: ctx.label_compact().clone(),
            deadline,
            grace,
        };
        let conn = pending.conn.as_mut().expect("set above");
        conn.out = wire::call(std::mem::take(&mut conn.out), id, ctx, left.map(nanos));
        if let Err(e) = conn.stream.write_all(&conn.out).await {
            pending.conn = None;
            return Err(self.lost(e).await);
        }
        pending.sent = true;
        let read = read_async(&mut conn.stream, &mut conn.inbox);
        match crate::timer::within(deadline, read).await {
            // `pending` hands the connection to a watchdog.
            None => return Err(Failed::Deadline),
            Some(Err(e)) => {
                pending.conn = None;
                return Err(self.lost(e).await);
            }
            Some(Ok(())) => {}
        }
        let mut conn = pending.conn.take().expect("still held");
        let reply = apply(conn.inbox.frame(), ctx);
        conn.inbox.reset();
        if reply.is_ok() {
            let mut idle = self.idle_async.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        reply
    }

    /// Waits for the reply of a call whose caller stopped waiting, on the
    /// exec runtime; kills the process if it is still running `grace` after
    /// its deadline. Without a deadline, it only waits.
    fn watch(
        &self,
        stream: UnixStream,
        mut inbox: Inbox,
        label: &str,
        deadline: Instant,
        grace: Duration,
    ) {
        self.watch_until(stream, &mut inbox, label, Some(deadline), grace);
    }

    fn watch_until(
        &self,
        stream: UnixStream,
        inbox: &mut Inbox,
        label: &str,
        deadline: Option<Instant>,
        grace: Duration,
    ) {
        let handle = runtime::handle();
        let _inside = handle.enter();
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream));
        let Ok(mut stream) = stream else { return };
        let mut inbox = std::mem::take(inbox);
        let child = self.child.clone();
        let why =
            format!("killed by dynplug: call `{label}` still running {grace:?} after its deadline");
        handle.spawn(async move {
            let read = read_async(&mut stream, &mut inbox);
            match deadline {
                Some(deadline) => {
                    let at = tokio::time::Instant::from_std(deadline + grace);
                    if tokio::time::timeout_at(at, read).await.is_err() {
                        tracing::warn!(pid = child.pid, "{why}");
                        child.kill(why);
                    }
                }
                None => {
                    let _ = read.await;
                }
            }
        });
    }

    /// Tells the runner that call `id` is cancelled, on a connection of
    /// its own (the call's is busy), from the exec runtime.
    fn cancel(&self, id: u64) {
        let path = self.path.clone();
        runtime::handle().spawn(async move {
            if let Ok(mut stream) = tokio::net::UnixStream::connect(&path).await {
                let _ = stream.write_all(&wire::cancel(id)).await;
            }
        });
    }

    fn lost_blocking(&self, error: io::Error) -> Failed {
        let child = self.child.clone();
        let logs = Arc::clone(&self.logs);
        runtime::block(async move { super::crash::lost(&child, &logs, error).await })
    }

    async fn lost(&self, error: io::Error) -> Failed {
        super::crash::lost(&self.child, &self.logs, error).await
    }
}

/// A sent async call: if its future is dropped (or its deadline passes)
/// before the reply, the connection goes to a watchdog.
struct Pending<'a> {
    conns: &'a Conns,
    conn: Option<AsyncConn>,
    id: u64,
    sent: bool,
    label: compact_str::CompactString,
    deadline: Option<Instant>,
    grace: Duration,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if !self.sent {
            // Cut in the middle of the request: the connection is useless.
            return;
        }
        // The plugin sees `is_cancelled()`.
        self.conns.cancel(self.id);
        let Ok(stream) = conn.stream.into_std() else {
            return;
        };
        let mut inbox = conn.inbox;
        self.conns
            .watch_until(stream, &mut inbox, &self.label, self.deadline, self.grace);
    }
}

/// The time left before `deadline`, in nanoseconds on the wire; a deadline
/// already past fails before anything is sent.
fn left(deadline: Option<Instant>) -> Result<Option<Duration>, Failed> {
    match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
        Some(left) if left.is_zero() => Err(Failed::Deadline),
        left => Ok(left),
    }
}

fn nanos(left: Duration) -> u64 {
    u64::try_from(left.as_nanos()).unwrap_or(u64::MAX)
}

/// Applies a `REPLY` to the caller's context.
fn apply(frame: &[u8], ctx: &mut Context) -> Result<(u8, String), Failed> {
    if frame[0] != wire::REPLY {
        return Err(Failed::Bad(format!(
            "the runner answered a call with a frame of kind {}",
            frame[0]
        )));
    }
    wire::apply_reply(&mut Fields::new(&frame[1..]), ctx)
        .map_err(|e| Failed::Bad(format!("the runner's reply: {e}")))
}
