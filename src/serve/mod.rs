//! The façades: routed HTTP (axum) and gRPC (tonic) in front of every plugin,
//! a management API, Prometheus metrics and a web page. Feature `server`.
//!
//! ```no_run
//! # async fn run() -> Result<(), dynplug::Error> {
//! let manager = dynplug::PluginManager::new("plugins")?;
//! manager.load_plugins()?;
//! let running = dynplug::serve::Server::new(manager)
//!     .http("127.0.0.1:8080".parse().unwrap())
//!     .grpc("127.0.0.1:50051".parse().unwrap())
//!     .start()
//!     .await?;
//! tokio::signal::ctrl_c().await.ok();
//! running.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # The map
//!
//! * [`Server`] (`server.rs`): the settings, `start`, and [`Running`].
//! * The request path: `listen.rs` (accept loop, connection cap) →
//!   `conn.rs` (TLS, HTTP/1.1 and HTTP/2 with their limits) → `http.rs`
//!   (plugin routes via `routes.rs`; the management API in `admin.rs`;
//!   errors as responses in `reply.rs`) or `grpc.rs` (`dynplug.v1.Plugins`)
//!   and `goplugin.rs` (goplugin's service), which share `grpc_request.rs`
//!   (caller, plugin, deadline) → `call` here, the one call path of every
//!   façade. Dependencies run one way: no module of the path imports one
//!   after it.
//! * Who may call: `auth.rs` (clients), `origin.rs` (Host and cross-site
//!   checks), `tls.rs`; where sockets live: `unix.rs`.
//! * `routes.rs` (the route table, rebuilt on lifecycle events; the
//!   default route of found plugins) and `metrics.rs` (histograms and
//!   `/metrics`).
//! * `registry/`: the plugin registry (`plugins.PluginRegistry` on a Unix
//!   socket), which feeds the manager as sockets directories do.

mod admin;
mod auth;
mod conn;
mod goplugin;
mod grpc;
mod grpc_request;
mod http;
mod listen;
mod metrics;
mod origin;
mod registry;
mod reply;
mod routes;
mod server;
mod tls;
mod unix;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};

use crate::PluginManager;
use crate::error::{Error, Result};
pub use auth::Client;
pub use grpc::{from_proto, to_proto};
pub use grpc_request::PLUGIN_METADATA;
pub use http::HttpService;
use metrics::{Facade, Metrics};
pub use registry::Registry;
use routes::RouteTable;
pub use server::{Running, Server};

/// The request path's latency histogram, for `benches/metrics.rs`: not API.
#[doc(hidden)]
pub mod bench {
    pub use super::metrics::Histogram;
}

/// Generated gRPC code (clients and servers) for `proto/*.proto`.
pub mod proto {
    pub use crate::proto::{goplugin, health, registry, v1};
}

/// Where a façade listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A token that `Debug` does not print.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Shared by every handler.
pub(crate) struct Shared {
    manager: PluginManager,
    routes: ArcSwap<RouteTable>,
    metrics: Metrics,
    timeout: Duration,
    log_calls: bool,
    /// With a token, the management API's data and actions need it (§ http).
    management_token: Option<Secret>,
    /// Named callers; with any, every plugin call needs one (§ auth).
    clients: auth::Clients,
    /// The host names the management API answers to (§ origin).
    allowed_hosts: origin::AllowedHosts,
    /// The connection cap's slots, for the metrics.
    slots: Arc<Semaphore>,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
    /// Set by `Running::shutdown` once the server's own endpoints have
    /// drained, before plugins unload: a service a host mounted answers 503
    /// from then on. (An atomic load per request, not the watch's lock.)
    stopped: std::sync::atomic::AtomicBool,
    /// The plugin registry's counters, when it runs.
    registry: Option<Arc<registry::Stats>>,
}

impl Shared {
    /// Whether the management API's data and actions need credentials.
    pub(crate) fn management_guarded(&self) -> bool {
        self.management_token.is_some() || self.clients.enabled()
    }
}

type State = Arc<Shared>;

pub(crate) fn bind_error(endpoint: &Endpoint, source: std::io::Error) -> Error {
    Error::Bind {
        address: endpoint.to_string(),
        source,
    }
}

/// Runs one façade call with its deadline: the context carries it (so the
/// plugin sees it) and the wait is bounded by it (so a plugin that ignores it
/// cannot hold the request; dropping the call cancels it). `latency` is the
/// plugin's histograms when the caller has them at hand (HTTP routes do).
pub(crate) async fn call(
    state: &Shared,
    executor: &crate::Executor,
    latency: Option<&metrics::Latency>,
    ctx: &mut crate::Context,
    timeout: Duration,
    facade: Facade,
) -> Result<()> {
    let started = std::time::Instant::now();
    if ctx.deadline().is_none() {
        // From the clock read above: one read fewer per request. A timeout
        // too large for the clock means no deadline.
        if let Some(deadline) = started.checked_add(timeout) {
            ctx.set_deadline(deadline);
        }
    }
    // A call in place runs inside this poll: a timer could not interrupt
    // it, and the plugin sees the deadline through its context. A call on
    // the workers returns at the deadline by itself (`execute_async`), label
    // kept.
    // The server's runtime has timers: a deadline costs no wake-up of
    // another thread (`timer`).
    let result = crate::timer::on_runtime_timers(executor.execute_async(ctx)).await;
    match latency {
        Some(latency) => latency[facade as usize].observe(started.elapsed()),
        None => state
            .metrics
            .observe(executor.name(), facade, started.elapsed()),
    }
    if state.log_calls {
        match &result {
            Ok(()) => tracing::info!(
                plugin = executor.name(), label = ctx.label(), facade = facade.as_str(), elapsed = ?started.elapsed(),
                values = ?ctx.values().map(|(k, _)| k).collect::<Vec<_>>(), "call ok"
            ),
            Err(e) => tracing::info!(
                plugin = executor.name(), label = ctx.label(), facade = facade.as_str(), elapsed = ?started.elapsed(),
                "call failed: {e}"
            ),
        }
    }
    result
}
