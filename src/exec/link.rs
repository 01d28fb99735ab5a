//! The way to one running process of an exec plugin: its address and the
//! connections to it, for either protocol.
//!
//! A link belongs to one process: after a restart there is a new link, so
//! no call ever reuses a connection to a dead process. Connections are
//! driven on the runtime of the caller that opened them and reused only by
//! callers on that same runtime: a façade's calls then never hop to
//! another thread, and a runtime that stops (a test's) takes only its own
//! connections with it. Blocking callers use the exec runtime's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::grpc::Grpc;
use super::rest::Rest;
use super::settings::Wire;

/// The largest reply accepted from a plugin, in bytes.
pub(crate) const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Where a process listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Address {
    pub(crate) async fn connect(&self) -> std::io::Result<Stream> {
        match self {
            Address::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                // Requests are small and answered at once: no Nagle delay.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            Address::Unix(path) => Ok(Stream::Unix(tokio::net::UnixStream::connect(path).await?)),
        }
    }
}

/// A connection to a process, over TCP or a Unix socket.
pub(crate) enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// Why a call or a ping did not return a reply.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No connection could be made: nothing was sent (safe to retry).
    Connect(String),
    /// The connection failed after the request was sent: it may have run.
    Lost(String),
    /// The plugin answered with an error (its message).
    Plugin(String),
    /// The plugin answered that it is unavailable.
    Unavailable(String),
    /// The plugin (or the wire) reported the deadline passed.
    Deadline,
    /// The plugin reported the call cancelled.
    Cancelled,
    /// The reply could not be understood, or was too large.
    BadReply(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(why) => write!(f, "cannot connect: {why}"),
            CallError::Lost(why) => write!(f, "connection lost: {why}"),
            CallError::Plugin(why) | CallError::Unavailable(why) | CallError::BadReply(why) => {
                f.write_str(why)
            }
            CallError::Deadline => f.write_str("deadline exceeded"),
            CallError::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// The way to one process.
pub(crate) struct Link {
    client: Client,
}

enum Client {
    Rest(Rest),
    Grpc(Grpc),
    /// A native plugin's runner (`isolation: "process"`).
    Process(Arc<crate::process::Conns>),
}

impl Link {
    /// `host` is what the goplugin `X-Host` header says; `child` is the
    /// process the link leads to.
    pub(crate) fn new(
        wire: Wire,
        address: Address,
        host: &Arc<str>,
        child: &super::child::Child,
        logs: &Arc<super::logs::Logs>,
    ) -> Link {
        let client = match wire {
            Wire::Rest => Client::Rest(Rest::new(address, host)),
            Wire::Grpc => Client::Grpc(Grpc::new(address, host)),
            Wire::Process => Client::Process(Arc::new(crate::process::Conns::new(
                address,
                child.handle(),
                Arc::clone(logs),
            ))),
        };
        Link { client }
    }

    /// The connections to a native plugin's runner.
    pub(crate) fn process(&self) -> Option<&Arc<crate::process::Conns>> {
        match &self.client {
            Client::Process(conns) => Some(conns),
            _ => None,
        }
    }

    /// Ping: `Ok` when the plugin answers it successfully within `timeout`.
    /// Must run inside a tokio runtime.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), CallError> {
        let ping = async {
            match &self.client {
                Client::Rest(rest) => rest.ping().await,
                Client::Grpc(grpc) => grpc.ping(timeout).await,
                Client::Process(conns) => conns.ping().await,
            }
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Deadline),
        }
    }

    /// Exec: the reply payload. `timeout` is passed on the wire; the caller
    /// bounds the wait itself. Must run inside a tokio runtime.
    pub(crate) async fn exec(
        &self,
        command: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        match &self.client {
            Client::Rest(rest) => rest.exec(command, payload, timeout).await,
            Client::Grpc(grpc) => grpc.exec(command, payload, timeout).await,
            // Runners are called through `process()`, with the context.
            Client::Process(_) => Err(CallError::BadReply(
                "a runner is not called with a payload".into(),
            )),
        }
    }
}
