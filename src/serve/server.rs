//! [`Server`]: the façades' settings, `start`, and the [`Running`] server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::metrics::Metrics;
use super::routes::RouteTable;
use super::{
    Client, Endpoint, HttpService, Registry, Secret, Shared, State, auth, bind_error, conn,
    goplugin, grpc, http, listen, origin, registry, routes, tls, unix,
};
use crate::PluginManager;
use crate::error::{Error, Result};

/// Configures and starts the façades.
///
/// Every connection, HTTP or gRPC, TCP or Unix, is served under the same
/// limits (each a method below, with its default): a cap on open
/// connections, a header-read timeout, an idle timeout, header size and
/// count limits, and a cap on concurrent HTTP/2 streams.
#[derive(Debug)]
pub struct Server {
    manager: PluginManager,
    http: Vec<Endpoint>,
    grpc: Vec<Endpoint>,
    timeout: Duration,
    log_calls: bool,
    goplugin_dir: Option<PathBuf>,
    management_token: Option<Secret>,
    limits: conn::Limits,
    socket_mode: u32,
    allowed_hosts: Vec<String>,
    allow_open_management: bool,
    clients: Vec<Client>,
    tls: Option<tls::TlsFiles>,
    tls_client_ca: Option<PathBuf>,
    sockets: Vec<PathBuf>,
    registry: Option<Registry>,
}

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
            limits: conn::Limits::default(),
            socket_mode: unix::DEFAULT_SOCKET_MODE,
            allowed_hosts: Vec::new(),
            allow_open_management: false,
            clients: Vec::new(),
            tls: None,
            tls_client_ca: None,
            sockets: Vec::new(),
            registry: None,
        }
    }

    /// Serves the plugin registry (`plugins.PluginRegistry`, see
    /// `proto/registry.proto`) on the Unix socket `path`, with the
    /// defaults of [`Registry::new`]: plugins of this user register
    /// endpoints in that socket's directory, are probed every second, and
    /// are unregistered after 3 missed probes.
    #[must_use]
    pub fn registry_unix(self, path: impl Into<PathBuf>) -> Server {
        self.registry(Registry::new(path))
    }

    /// Serves the plugin registry with these settings.
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Server {
        self.registry = Some(registry);
        self
    }

    /// Follows a sockets directory (see
    /// [`PluginManager::discover_sockets`]): each Unix socket in it is a
    /// plugin named by its file name (`<name>.listen` holding
    /// `tcp://host:port` names a TCP one), spoken to in JSON-RPC 2.0 or
    /// Docker's plugin protocol, and callable at `POST
    /// /plugins/<name>/<method>` (the body its params, the reply its
    /// result) besides gRPC `Exec`. The directory is created 0700 if
    /// missing; an existing one must be ours and private. Repeatable.
    #[must_use]
    pub fn sockets(mut self, dir: impl Into<PathBuf>) -> Server {
        self.sockets.push(dir.into());
        self
    }

    /// Requires `token` for the management API's data and actions
    /// (`/_dynplug/plugins...`, `/_dynplug/events`), as `Authorization: Bearer
    /// <token>` or a `dynplug_token` cookie (which the web page sets when it
    /// asks for the token). The page itself, `/_dynplug/health` and
    /// `/metrics` stay open. Without a token (and without
    /// [clients](Self::client)) the management API is open to whoever
    /// reaches the listener, which [`start`](Self::start) refuses on a
    /// non-loopback address unless [allowed](Self::allow_open_management).
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

    /// Adds a named caller. With at least one client, every plugin call
    /// (HTTP routes, gRPC `Exec` and `Ping`, the goplugin service) must name
    /// a client allowed to call that plugin (401/`UNAUTHENTICATED` without a
    /// known identity, 403/`PERMISSION_DENIED` for a plugin not in its
    /// list); gRPC `List` and `Watch` take any client; the management API
    /// takes the management token or a client with
    /// [`management(true)`](Client::management). Without clients, plugin
    /// calls are open.
    ///
    /// ```no_run
    /// # async fn run(manager: dynplug::PluginManager) -> dynplug::Result<()> {
    /// use dynplug::serve::{Client, Server};
    /// let running = Server::new(manager)
    ///     .http("127.0.0.1:8080".parse().unwrap())
    ///     .client(Client::new("billing").token("s3cret").plugins(["hello"]))
    ///     .start()
    ///     .await?;
    /// // curl -H 'Authorization: Bearer s3cret' http://127.0.0.1:8080/api/hello/Ada
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn client(mut self, client: Client) -> Server {
        self.clients.push(client);
        self
    }

    /// Serves every TCP endpoint (HTTP and gRPC) over TLS, with the
    /// certificate chain and private key of these PEM files. HTTP offers
    /// `h2` and `http/1.1` by ALPN, gRPC `h2`. Unix sockets stay plain.
    #[must_use]
    pub fn tls(
        mut self,
        cert_chain_pem: impl Into<PathBuf>,
        key_pem: impl Into<PathBuf>,
    ) -> Server {
        self.tls = Some(tls::TlsFiles {
            cert: cert_chain_pem.into(),
            key: key_pem.into(),
            client_ca: None,
        });
        self
    }

    /// Verifies client certificates against the CA certificates of this PEM
    /// file (needs [`tls`](Self::tls)). A verified certificate names a
    /// [`Client`] by its subject common name or a DNS name
    /// ([`Client::cert_name`]); a certificate that does not verify fails the
    /// handshake; a connection without one must authenticate with a token.
    #[must_use]
    pub fn tls_client_ca(mut self, ca_pem: impl Into<PathBuf>) -> Server {
        self.tls_client_ca = Some(ca_pem.into());
        self
    }

    /// Host names the management API (`/_dynplug/...`, `/metrics`) answers
    /// to besides IP literals, `localhost` and `*.localhost`; `"*"` turns
    /// the check off. Another `Host` gets 403: DNS rebinding would let a
    /// web page reach a loopback listener under its own name. Requests on
    /// Unix sockets are not checked.
    #[must_use]
    pub fn allowed_hosts<I: IntoIterator<Item = S>, S: Into<String>>(mut self, hosts: I) -> Server {
        self.allowed_hosts.extend(hosts.into_iter().map(Into::into));
        self
    }

    /// Lets [`start`](Self::start) serve the management API on a
    /// non-loopback TCP address without a management token or clients (it
    /// refuses by default: anyone who reaches the port could reload and
    /// unload plugins).
    #[must_use]
    pub fn allow_open_management(mut self, allowed: bool) -> Server {
        self.allow_open_management = allowed;
        self
    }

    /// At most this many connections open at once, over every endpoint
    /// (default: half the process's file descriptor limit, between 16 and
    /// 4,096). At the cap the server stops accepting until one closes;
    /// clients wait in the kernel's backlog.
    #[must_use]
    pub fn max_connections(mut self, max: usize) -> Server {
        self.limits.max_connections = Some(max.max(1));
        self
    }

    /// How long a client may take to send a request's headers (default
    /// 10 s), and a TLS handshake. An HTTP/1.1 connection waiting for its
    /// next request is closed after this long too, and so is a connection
    /// that starts no request that soon after it opened (or after its TLS
    /// handshake).
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Server {
        self.limits.header_read_timeout = timeout;
        self
    }

    /// How long a request's body may take to arrive whole, counted from
    /// when its handler first waits for it (default 60 s): a client that
    /// declares a body and sends it slowly or not at all gets 408 (a gRPC
    /// call, an error status) instead of holding its connection.
    #[must_use]
    pub fn body_timeout(mut self, timeout: Duration) -> Server {
        self.limits.body_timeout = timeout;
        self
    }

    /// How long a response write may wait for the client to read (default
    /// 30 s): a client that stops reading loses its connection then.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Duration) -> Server {
        self.limits.write_timeout = timeout;
        self
    }

    /// A connection with no request in flight for this long is closed
    /// (default 60 s; it closes between one and two of these after its last
    /// request). An event stream is a request in flight; HTTP/2 PINGs are not.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Server {
        self.limits.idle_timeout = timeout;
        self
    }

    /// Largest request head: HTTP/1.1 request line and headers, HTTP/2
    /// header list (default 32 KiB; HTTP/1.1 reads at least 8 KiB).
    #[must_use]
    pub fn max_header_bytes(mut self, max: usize) -> Server {
        self.limits.max_header_bytes = max;
        self
    }

    /// Most headers in an HTTP/1.1 request (default 100).
    #[must_use]
    pub fn max_headers(mut self, max: usize) -> Server {
        self.limits.max_headers = max;
        self
    }

    /// Most concurrent HTTP/2 streams (calls) per connection, gRPC and HTTP
    /// (default 100): a stalled stream reserves buffers for its message.
    #[must_use]
    pub fn max_concurrent_streams(mut self, max: u32) -> Server {
        self.limits.max_concurrent_streams = max;
        self
    }

    /// HTTP/2 keep-alive: a PING every `interval` (default 60 s; `None`
    /// for none), and the connection closed when its answer takes longer
    /// than `timeout` (default 20 s). Finds peers that vanished while a
    /// stream (a `Watch`) was open.
    #[must_use]
    pub fn http2_keepalive(mut self, interval: Option<Duration>, timeout: Duration) -> Server {
        self.limits.keepalive_interval = interval;
        self.limits.keepalive_timeout = timeout;
        self
    }

    /// Largest gRPC request message (default 4 MiB).
    #[must_use]
    pub fn grpc_max_message_size(mut self, max: usize) -> Server {
        self.limits.grpc_max_message_size = max;
        self
    }

    /// The mode of the Unix sockets the server creates (default `0o600`:
    /// the user only), whatever the umask. With group bits (e.g. `0o660`),
    /// their directories may let the group in (mode up to `0o750`).
    #[must_use]
    pub fn unix_socket_mode(mut self, mode: u32) -> Server {
        self.socket_mode = mode & 0o777;
        self
    }

    /// Also serves the goplugin `plugin.Plugin` service on `<dir>/<plugin>.sock`
    /// for every loaded plugin, so an unmodified goplugin client can call
    /// any plugin through its socket. The directory is created with mode
    /// 0700 if missing; an existing one must be ours and private, or
    /// [`start`](Self::start) refuses it.
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

    /// Serves HTTP on a Unix socket (a stale socket file is replaced). Its
    /// directory must be ours and private (mode 0700).
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

    /// Serves gRPC on a Unix socket (in a private directory, as HTTP's).
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

    /// Refuses what would expose the management API to the network without
    /// credentials, and warns about gRPC open to the network.
    fn check_exposure(&self, guarded: bool, clients: bool) -> Result<()> {
        for endpoint in &self.http {
            if let Endpoint::Tcp(addr) = endpoint
                && !addr.ip().is_loopback()
                && !guarded
            {
                if !self.allow_open_management {
                    return Err(Error::Config {
                        what: format!("HTTP endpoint {addr}"),
                        message: "the management API (reload, unload) would be open to the network: set a management token, listen on loopback or a Unix socket, or allow it explicitly (--allow-open-management)".into(),
                    });
                }
                tracing::warn!(
                    "HTTP on {addr}: the management API is open to the network (allowed explicitly)"
                );
            }
        }
        for endpoint in &self.grpc {
            if let Endpoint::Tcp(addr) = endpoint
                && !addr.ip().is_loopback()
                && !clients
            {
                tracing::warn!(
                    "gRPC on {addr}: any caller that reaches it may call every plugin (no clients configured)"
                );
            }
        }
        Ok(())
    }

    /// Binds every endpoint and starts serving; must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Bind`] if an endpoint cannot be bound, or a socket directory
    /// is not ours and private; [`Error::Config`] for an invalid client or
    /// TLS file, or the management API open on a non-loopback address
    /// without credentials (see [`allow_open_management`](Self::allow_open_management)).
    pub async fn start(self) -> Result<Running> {
        let clients = auth::Clients::new(self.clients.clone())?;
        let tls = match (&self.tls, &self.tls_client_ca) {
            (Some(files), ca) => {
                let files = tls::TlsFiles {
                    client_ca: ca.clone(),
                    ..files.clone()
                };
                Some(files.acceptors()?)
            }
            (None, Some(ca)) => {
                return Err(Error::Config {
                    what: format!("TLS: {}", ca.display()),
                    message: "a client CA needs a server certificate and key (tls)".into(),
                });
            }
            (None, None) => None,
        };
        self.check_exposure(
            self.management_token.is_some() || clients.enabled(),
            clients.enabled(),
        )?;
        let max_connections = self
            .limits
            .max_connections
            .unwrap_or_else(listen::default_max_connections);
        let slots = Arc::new(Semaphore::new(max_connections));
        let (stop, shutdown) = watch::channel(false);
        let metrics = Metrics::default();
        let state: State = Arc::new(Shared {
            routes: ArcSwap::from_pointee(RouteTable::build(&self.manager, &metrics)),
            manager: self.manager.clone(),
            metrics,
            timeout: self.timeout,
            log_calls: self.log_calls,
            management_token: self.management_token.clone(),
            clients,
            allowed_hosts: origin::AllowedHosts::new(&self.allowed_hosts),
            slots: Arc::clone(&slots),
            max_connections,
            shutdown: shutdown.clone(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            registry: self
                .registry
                .as_ref()
                .map(|_| Arc::new(registry::Stats::default())),
        });
        let (http_tls, grpc_tls) = match tls {
            Some(acceptors) => (Some(acceptors.http), Some(acceptors.grpc)),
            None => (None, None),
        };
        let http_settings = Arc::new(conn::Settings::new(&self.limits, false, http_tls));
        let grpc_settings = Arc::new(conn::Settings::new(&self.limits, true, grpc_tls));
        let listening = Listening {
            slots,
            shutdown: shutdown.clone(),
            socket_mode: self.socket_mode,
        };
        let mut tasks = vec![tokio::spawn(routes::follow(Arc::clone(&state)))];
        let app = http::HttpService::new(Arc::clone(&state));
        let mut running = Running {
            http: Vec::new(),
            grpc: Vec::new(),
            stop,
            tasks: Vec::new(),
            manager: self.manager,
            http_service: app.clone(),
            discoveries: Vec::new(),
        };
        for endpoint in &self.http {
            let (bound, task) = listening
                .serve(endpoint, app.clone(), &http_settings)
                .await?;
            running.http.push(bound);
            tasks.push(task);
        }
        let routes = grpc::routes(&state, &self.limits);
        for endpoint in &self.grpc {
            let (bound, task) = listening
                .serve(endpoint, routes.clone(), &grpc_settings)
                .await?;
            running.grpc.push(bound);
            tasks.push(task);
        }
        if let Some(dir) = self.goplugin_dir {
            unix::private_dir(&dir, self.socket_mode)
                .map_err(|e| bind_error(&Endpoint::Unix(dir.clone()), e))?;
            tasks.push(tokio::spawn(goplugin::plugin_sockets(
                Arc::clone(&state),
                dir,
                listening.clone(),
                Arc::clone(&grpc_settings),
                self.limits.grpc_max_message_size,
            )));
        }
        if let Some(settings) = self.registry {
            let endpoint = Endpoint::Unix(settings.path.clone());
            let dir = match settings.path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => std::path::Path::new("."),
            };
            unix::private_dir(dir, self.socket_mode).map_err(|e| bind_error(&endpoint, e))?;
            let stats = state.registry.clone().unwrap_or_default();
            let service = Arc::new(registry::Service::new(Arc::clone(&state), settings, stats)?);
            let server = super::proto::registry::plugin_registry_server::PluginRegistryServer::new(
                Arc::clone(&service),
            )
            .max_decoding_message_size(64 * 1024);
            let routes = tonic::service::Routes::new(server).prepare();
            let (_, task) = listening.serve(&endpoint, routes, &grpc_settings).await?;
            tasks.push(task);
            tasks.push(tokio::spawn(registry::reap(service)));
        }
        for dir in self.sockets {
            let manager = running.manager.clone();
            let discovery = tokio::task::spawn_blocking(move || manager.discover_sockets(dir))
                .await
                .map_err(|e| Error::Config {
                    what: "sockets directory".into(),
                    message: e.to_string(),
                })??;
            running.discoveries.push(discovery);
        }
        running.tasks = tasks;
        Ok(running)
    }
}

/// What every listener of one server shares: the connection cap, the
/// shutdown flag, the mode of its Unix sockets.
#[derive(Clone)]
pub(crate) struct Listening {
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) socket_mode: u32,
}

impl Listening {
    /// Binds `endpoint` and serves `service` on it until shutdown; returns
    /// the address actually bound.
    pub(crate) async fn serve<S, B>(
        &self,
        endpoint: &Endpoint,
        service: S,
        settings: &Arc<conn::Settings>,
    ) -> Result<(Endpoint, JoinHandle<()>)>
    where
        S: tower_service::Service<
                axum::http::Request<axum::body::Body>,
                Response = axum::http::Response<B>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (listener, bound, socket) = match endpoint {
            Endpoint::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_error(endpoint, e))?;
                let bound = listener.local_addr().map_err(|e| bind_error(endpoint, e))?;
                (listen::Listener::Tcp(listener), Endpoint::Tcp(bound), None)
            }
            Endpoint::Unix(path) => {
                let listener =
                    unix::bind(path, self.socket_mode).map_err(|e| bind_error(endpoint, e))?;
                let socket = Some(path.clone());
                (listen::Listener::Unix(listener), endpoint.clone(), socket)
            }
        };
        let task = listen::spawn(
            listener,
            socket,
            service,
            Arc::clone(settings),
            Arc::clone(&self.slots),
            self.shutdown.clone(),
        );
        Ok((bound, task))
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
    discoveries: Vec<crate::Discovery>,
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
        let discoveries = self.discoveries;
        let _ = tokio::task::spawn_blocking(move || drop(discoveries)).await;
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
