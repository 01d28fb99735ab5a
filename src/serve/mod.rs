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

mod admin;
mod goplugin;
mod grpc;
mod http;
mod metrics;
mod routes;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::ServiceExt as _;
use axum::serve::ListenerExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::PluginManager;
use crate::error::{Error, Result};
pub use grpc::{PLUGIN_METADATA, from_proto, to_proto};
pub use http::HttpService;
use metrics::{Facade, Metrics};
use routes::RouteTable;

/// Generated gRPC code (clients and servers) for `proto/*.proto`.
pub mod proto {
    /// `dynplug.v1`: the `Plugins` service.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("dynplug.v1");
    }
    /// `plugin`: the goplugin `Plugin` service.
    #[allow(missing_docs, clippy::all)]
    pub mod goplugin {
        tonic::include_proto!("plugin");
    }
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

/// Configures and starts the façades.
#[derive(Debug)]
pub struct Server {
    manager: PluginManager,
    http: Vec<Endpoint>,
    grpc: Vec<Endpoint>,
    timeout: Duration,
    log_calls: bool,
    goplugin_dir: Option<PathBuf>,
    management_token: Option<Secret>,
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
    shutdown: watch::Receiver<bool>,
    /// Set by `Running::shutdown` once the server's own endpoints have
    /// drained, before plugins unload: a service a host mounted answers 503
    /// from then on. (An atomic load per request, not the watch's lock.)
    stopped: std::sync::atomic::AtomicBool,
}

type State = Arc<Shared>;

impl Server {
    /// A server for `manager`'s plugins, listening nowhere yet.
    pub fn new(manager: PluginManager) -> Server {
        Server {
            manager,
            http: Vec::new(),
            grpc: Vec::new(),
            timeout: Duration::from_secs(30),
            log_calls: false,
            goplugin_dir: None,
            management_token: None,
        }
    }

    /// Requires `token` for the management API's data and actions
    /// (`/_dynplug/plugins...`, `/_dynplug/events`), as `Authorization: Bearer
    /// <token>` or a `dynplug_token` cookie (which the web page sets when it
    /// asks for the token). The page itself, `/_dynplug/health` and
    /// `/metrics` stay open. Without a token the management API is open to
    /// whoever reaches the listener.
    /// An empty token is ignored, with a warning: it would guard nothing.
    #[must_use]
    pub fn management_token(mut self, token: impl Into<String>) -> Server {
        let token = token.into();
        if token.is_empty() {
            tracing::warn!("empty management token ignored: the management API is open");
        } else {
            self.management_token = Some(Secret(token));
        }
        self
    }

    /// Also serves the goplugin `plugin.Plugin` service on `<dir>/<plugin>.sock`
    /// for every loaded plugin (the directory is created with mode 0700), so
    /// an unmodified goplugin client can call any plugin through its socket.
    #[must_use]
    pub fn goplugin_sockets(mut self, dir: impl Into<PathBuf>) -> Server {
        self.goplugin_dir = Some(dir.into());
        self
    }

    /// Serves HTTP on a TCP address (port 0 picks a free port).
    #[must_use]
    pub fn http(mut self, addr: SocketAddr) -> Server {
        self.http.push(Endpoint::Tcp(addr));
        self
    }

    /// Serves HTTP on a Unix socket (a stale socket file is replaced).
    #[must_use]
    pub fn http_unix(mut self, path: impl Into<PathBuf>) -> Server {
        self.http.push(Endpoint::Unix(path.into()));
        self
    }

    /// Serves gRPC on a TCP address.
    #[must_use]
    pub fn grpc(mut self, addr: SocketAddr) -> Server {
        self.grpc.push(Endpoint::Tcp(addr));
        self
    }

    /// Serves gRPC on a Unix socket.
    #[must_use]
    pub fn grpc_unix(mut self, path: impl Into<PathBuf>) -> Server {
        self.grpc.push(Endpoint::Unix(path.into()));
        self
    }

    /// Default deadline of a plugin call (default 30 s); routes may set their own.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Server {
        self.timeout = timeout;
        self
    }

    /// Logs every plugin request and response (at `info`).
    #[must_use]
    pub fn log_calls(mut self, on: bool) -> Server {
        self.log_calls = on;
        self
    }

    /// Binds every endpoint and starts serving; must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Bind`] if an endpoint cannot be bound.
    pub async fn start(self) -> Result<Running> {
        let (stop, shutdown) = watch::channel(false);
        let metrics = Metrics::default();
        let state: State = Arc::new(Shared {
            routes: ArcSwap::from_pointee(RouteTable::build(&self.manager, &metrics)),
            manager: self.manager.clone(),
            metrics,
            timeout: self.timeout,
            log_calls: self.log_calls,
            management_token: self.management_token.clone(),
            shutdown: shutdown.clone(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        let mut tasks = vec![tokio::spawn(routes::follow(Arc::clone(&state)))];
        let app = http::HttpService::new(Arc::clone(&state));
        let mut running = Running {
            http: Vec::new(),
            grpc: Vec::new(),
            stop,
            tasks: Vec::new(),
            manager: self.manager,
            http_service: app.clone(),
        };
        for endpoint in &self.http {
            let (bound, task) = serve_http(endpoint, app.clone(), shutdown.clone()).await?;
            running.http.push(bound);
            tasks.push(task);
        }
        for endpoint in &self.grpc {
            let (bound, task) = grpc::serve(endpoint, Arc::clone(&state), shutdown.clone()).await?;
            running.grpc.push(bound);
            tasks.push(task);
        }
        if let Some(dir) = self.goplugin_dir {
            private_dir(&dir).map_err(|e| bind_error(&Endpoint::Unix(dir.clone()), e))?;
            tasks.push(tokio::spawn(goplugin::plugin_sockets(
                Arc::clone(&state),
                dir,
            )));
        }
        running.tasks = tasks;
        Ok(running)
    }
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    http: Vec<Endpoint>,
    grpc: Vec<Endpoint>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    manager: PluginManager,
    http_service: HttpService,
}

impl Running {
    /// The HTTP façade as a tower service, for a host that serves HTTP
    /// itself: mount it in an axum `Router` (`fallback_service`,
    /// `nest_service`). It follows plugins as they load, upgrade and unload,
    /// like the façade on the server's own endpoints;
    /// [`shutdown`](Self::shutdown) ends its event streams and, once the
    /// server's own endpoints have drained, makes it answer 503.
    pub fn http_service(&self) -> HttpService {
        self.http_service.clone()
    }

    /// Where HTTP is served (actual ports, when 0 was asked).
    pub fn http_endpoints(&self) -> &[Endpoint] {
        &self.http
    }

    /// Where gRPC is served.
    pub fn grpc_endpoints(&self) -> &[Endpoint] {
        &self.grpc
    }

    /// Stops accepting, lets in-flight requests finish, then drains and
    /// unloads every plugin. A service from [`http_service`](Self::http_service)
    /// that a host still serves answers 503 from the moment plugins start
    /// unloading (its event streams end at once).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.http_service
            .state
            .stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let manager = self.manager;
        let _ = tokio::task::spawn_blocking(move || manager.unload_all()).await;
    }
}

pub(crate) fn bind_error(endpoint: &Endpoint, source: std::io::Error) -> Error {
    Error::Bind {
        address: endpoint.to_string(),
        source,
    }
}

/// Creates `dir` if needed, readable by its owner only (sockets in it accept
/// calls to plugins).
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Binds a Unix socket, replacing a stale socket file: never another kind of
/// file, and never a socket some process still accepts on.
pub(crate) fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// Binds a TCP endpoint; returns the listener and the address actually bound.
pub(crate) async fn bind_tcp(
    endpoint: &Endpoint,
    addr: &SocketAddr,
) -> Result<(tokio::net::TcpListener, Endpoint)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(endpoint, e))?;
    let bound = listener.local_addr().map_err(|e| bind_error(endpoint, e))?;
    Ok((listener, Endpoint::Tcp(bound)))
}

pub(crate) async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_http(
    endpoint: &Endpoint,
    app: HttpService,
    shutdown: watch::Receiver<bool>,
) -> Result<(Endpoint, JoinHandle<()>)> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let (listener, bound) = bind_tcp(endpoint, addr).await?;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let task = tokio::spawn(async move {
                let serve = axum::serve(listener, app.clone().into_make_service())
                    .with_graceful_shutdown(stopped(shutdown));
                if let Err(e) = serve.await {
                    tracing::error!("http server: {e}");
                }
            });
            Ok((bound, task))
        }
        Endpoint::Unix(path) => {
            let listener = bind_unix(path).map_err(|e| bind_error(endpoint, e))?;
            let socket = path.clone();
            let task = tokio::spawn(async move {
                let serve = axum::serve(listener, app.clone().into_make_service())
                    .with_graceful_shutdown(stopped(shutdown));
                if let Err(e) = serve.await {
                    tracing::error!("http server: {e}");
                }
                let _ = std::fs::remove_file(socket);
            });
            Ok((endpoint.clone(), task))
        }
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
    // Inline code runs inside this poll: a timer could not interrupt it, and
    // the plugin sees the deadline through its context.
    let result = match executor.try_inline(ctx) {
        Some(result) => result,
        None => {
            let wait = ctx.remaining().unwrap_or(timeout);
            // The call owns the context while it runs: keep what the error
            // needs (inline, no allocation, for labels up to 24 bytes).
            let label = compact_str::CompactString::new(ctx.label());
            match tokio::time::timeout(wait, executor.execute_async(ctx)).await {
                Ok(result) => result,
                Err(_) => {
                    ctx.set_label(&label);
                    Err(Error::DeadlineExceeded {
                        plugin: executor.name().to_owned(),
                        label: label.into_string(),
                    })
                }
            }
        }
    };
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
