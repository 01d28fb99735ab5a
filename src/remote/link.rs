//! The way to one plugin server (an exec plugin's process, or a socket
//! plugin): its address and the connections to it, for each wire.
//!
//! A link belongs to one process: after a restart (or a reconnect) there is
//! a new link, so no call ever reuses a connection to a dead process. Connections are
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

use super::docker::Docker;
use super::grpc::Grpc;
use super::jsonrpc::JsonRpc;
use super::payload;
use super::rest::Rest;

/// The largest reply accepted from a plugin, in bytes.
pub(crate) const MAX_REPLY: usize = 16 * 1024 * 1024;

/// The protocols dynplug speaks to plugins in other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// goplugin's REST protocol.
    Rest,
    /// goplugin's `plugin.Plugin` gRPC service.
    Grpc,
    /// JSON-RPC 2.0 over HTTP (InfraKit).
    JsonRpc,
    /// Docker's plugin protocol.
    Docker,
    /// The framed protocol of a native plugin's runner (`isolation:
    /// "process"`).
    Process,
}

impl Wire {
    /// The name as manifests and listings write it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Wire::Rest => "rest",
            Wire::Grpc => "grpc",
            Wire::JsonRpc => "jsonrpc",
            Wire::Docker => "docker",
            Wire::Process => "dynplug",
        }
    }
}

/// Where a process listens. A Unix socket may name the user its server
/// must run as: checked on every connection (`SO_PEERCRED`), so a path
/// swapped for another service's socket is refused, not spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf, Option<u32>),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path, _) => write!(f, "unix:{}", path.display()),
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
            Address::Unix(path, peer_uid) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                if let Some(expected) = *peer_uid {
                    let actual = stream.peer_cred()?.uid();
                    if actual != expected {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!(
                                "the server on {} runs as uid {actual}, not uid {expected}",
                                path.display()
                            ),
                        ));
                    }
                }
                Ok(Stream::Unix(stream))
            }
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
    /// The plugin answered with a JSON-RPC error.
    Fault {
        code: i64,
        message: String,
        data: Option<serde_json::Value>,
    },
}

/// Why a handshake (`Plugin.Implements`, `Plugin.Activate`) gave no answer.
#[derive(Debug)]
pub(crate) enum Handshake {
    /// The server answered, but not the handshake: it speaks something else.
    Refused(String),
    /// No answer at all (nothing listens, the connection broke, too slow).
    Down(CallError),
}

impl Handshake {
    pub(crate) fn of(error: CallError) -> Handshake {
        match error {
            CallError::Plugin(why) | CallError::BadReply(why) | CallError::Unavailable(why) => {
                Handshake::Refused(why)
            }
            CallError::Fault { message, .. } => Handshake::Refused(message),
            down => Handshake::Down(down),
        }
    }
}

/// A successful reply: goplugin's payload bytes, or a JSON value (JSON-RPC's
/// result, Docker's body; `None` for an empty body).
#[derive(Debug)]
pub(crate) enum Reply {
    Payload(Vec<u8>),
    Json(Option<serde_json::Value>),
}

impl Reply {
    /// Writes the reply into the context (see `payload.rs`).
    pub(crate) fn apply(self, ctx: &mut crate::Context) {
        match self {
            Reply::Payload(bytes) => payload::apply(ctx, bytes),
            Reply::Json(Some(value)) => payload::apply_json(ctx, value),
            Reply::Json(None) => {}
        }
    }
}

/// What a plugin said it is, by the handshake of its wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The wire that answered (JSON-RPC and Docker plugins are told apart
    /// by which handshake they answer).
    pub(crate) wire: Wire,
    /// `Name/Version` (JSON-RPC) or subsystem names (Docker); empty for a
    /// plugin that implements nothing in particular.
    pub(crate) interfaces: Vec<String>,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(why) => write!(f, "cannot connect: {why}"),
            CallError::Lost(why) => write!(f, "connection lost: {why}"),
            CallError::Plugin(why) | CallError::Unavailable(why) | CallError::BadReply(why) => {
                f.write_str(why)
            }
            CallError::Fault { code, message, .. } => write!(f, "error {code}: {message}"),
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
    JsonRpc(JsonRpc),
    Docker(Docker),
    /// A native plugin's runner (`isolation: "process"`).
    Process(Arc<crate::process::Conns>),
}

impl Link {
    /// `host` is what the goplugin `X-Host` header says.
    pub(crate) fn new(wire: Wire, address: Address, host: &Arc<str>) -> Link {
        let client = match wire {
            Wire::Rest => Client::Rest(Rest::new(address, host)),
            Wire::Grpc => Client::Grpc(Grpc::new(address, host)),
            Wire::JsonRpc => Client::JsonRpc(JsonRpc::new(address)),
            Wire::Docker => Client::Docker(Docker::new(address)),
            Wire::Process => unreachable!("a runner's link is made by `Link::runner`"),
        };
        Link { client }
    }

    /// The link to a native plugin's runner: `conns`, called with the
    /// context through [`process`](Self::process).
    pub(crate) fn runner(conns: crate::process::Conns) -> Link {
        Link {
            client: Client::Process(Arc::new(conns)),
        }
    }

    /// The connections to a native plugin's runner.
    pub(crate) fn process(&self) -> Option<&Arc<crate::process::Conns>> {
        match &self.client {
            Client::Process(conns) => Some(conns),
            _ => None,
        }
    }

    pub(crate) fn wire(&self) -> Wire {
        match &self.client {
            Client::Rest(_) => Wire::Rest,
            Client::Grpc(_) => Wire::Grpc,
            Client::JsonRpc(_) => Wire::JsonRpc,
            Client::Docker(_) => Wire::Docker,
            Client::Process(_) => Wire::Process,
        }
    }

    /// What the plugin is, by its wire's handshake: Ping for goplugin's
    /// wires; for JSON-RPC and Docker plugins, `Plugin.Implements` and
    /// `Plugin.Activate`, its own wire's first. A server that answers HTTP
    /// but neither handshake implements nothing in particular (it is not
    /// dead). Must run inside a tokio runtime.
    pub(crate) async fn identify(&self, timeout: Duration) -> Result<Identity, CallError> {
        let (own, other) = match &self.client {
            Client::Rest(_) | Client::Grpc(_) | Client::Process(_) => {
                self.ping(timeout).await?;
                return Ok(Identity {
                    wire: self.wire(),
                    interfaces: Vec::new(),
                });
            }
            Client::JsonRpc(_) => (Wire::JsonRpc, Wire::Docker),
            Client::Docker(_) => (Wire::Docker, Wire::JsonRpc),
        };
        let handshake = |wire| async move {
            let shake = async {
                match (&self.client, wire) {
                    (Client::JsonRpc(rpc), Wire::JsonRpc) => rpc.implements(timeout).await,
                    (Client::Docker(docker), Wire::Docker) => docker.activate(timeout).await,
                    // The other wire's handshake, on a client of its own.
                    (_, wire) => {
                        Link::new(wire, self.address().clone(), &Arc::from(""))
                            .handshake(timeout)
                            .await
                    }
                }
            };
            match tokio::time::timeout(timeout, shake).await {
                Ok(result) => result,
                Err(_) => Err(Handshake::Down(CallError::Deadline)),
            }
        };
        let mut refused = Vec::new();
        for wire in [own, other] {
            match handshake(wire).await {
                Ok(interfaces) => return Ok(Identity { wire, interfaces }),
                Err(Handshake::Down(e)) => return Err(e),
                Err(Handshake::Refused(why)) => refused.push(why),
            }
        }
        tracing::debug!(address = %self.address(), "no handshake answered: {refused:?}");
        Ok(Identity {
            wire: own,
            interfaces: Vec::new(),
        })
    }

    /// This link's own handshake (JSON-RPC and Docker only).
    async fn handshake(&self, timeout: Duration) -> Result<Vec<String>, Handshake> {
        match &self.client {
            Client::JsonRpc(rpc) => rpc.implements(timeout).await,
            Client::Docker(docker) => docker.activate(timeout).await,
            Client::Rest(_) | Client::Grpc(_) | Client::Process(_) => Ok(Vec::new()),
        }
    }

    fn address(&self) -> &Address {
        match &self.client {
            Client::Rest(c) => c.address(),
            Client::Grpc(c) => c.address(),
            Client::JsonRpc(c) => c.address(),
            Client::Docker(c) => c.address(),
            Client::Process(c) => c.address(),
        }
    }

    /// What a call with these values sends: goplugin's payload, or the
    /// JSON object of params.
    pub(crate) fn encode(&self, ctx: &crate::Context) -> Vec<u8> {
        match &self.client {
            Client::Rest(_) | Client::Grpc(_) | Client::Process(_) => payload::encode(ctx),
            Client::JsonRpc(_) | Client::Docker(_) => payload::params(ctx),
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
                // Any answer, even one refusing the handshake, is alive.
                Client::JsonRpc(_) | Client::Docker(_) => match self.handshake(timeout).await {
                    Ok(_) | Err(Handshake::Refused(_)) => Ok(()),
                    Err(Handshake::Down(e)) => Err(e),
                },
            }
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Deadline),
        }
    }

    /// One call: `command` (the label) with `payload` (from
    /// [`encode`](Self::encode)). `timeout` is passed on the wire; the
    /// caller bounds the wait itself. Must run inside a tokio runtime.
    pub(crate) async fn exec(
        &self,
        command: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        match &self.client {
            Client::Rest(rest) => rest
                .exec(command, payload, timeout)
                .await
                .map(Reply::Payload),
            Client::Grpc(grpc) => grpc
                .exec(command, payload, timeout)
                .await
                .map(Reply::Payload),
            Client::JsonRpc(rpc) => rpc
                .call(command, payload, timeout)
                .await
                .map(|result| Reply::Json(Some(result))),
            Client::Docker(docker) => docker
                .call(command, payload, timeout)
                .await
                .map(Reply::Json),
            // Runners are called through `process()`, with the context.
            Client::Process(_) => Err(CallError::BadReply(
                "a runner is not called with a payload".into(),
            )),
        }
    }
}
