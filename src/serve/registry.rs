//! The plugin registry (Network Service Mesh / kubelet style): the gRPC
//! `plugins.PluginRegistry` service on a Unix socket, where plugins that
//! serve goplugin's `plugin.Plugin` on their own socket register.
//!
//! A registration is checked in this order, each refusal with its reason:
//! the caller's user (`SO_PEERCRED`: ours, or a configured list), the
//! fields (no empty name, endpoint or capability list), the endpoint (a
//! Unix socket, not a link, owned by the caller, in an allowed directory;
//! never, say, the Docker daemon's socket), the name (the same endpoint
//! registers again; another endpoint is refused while the first answers),
//! then the endpoint is dialled back and must answer Ping. Only then is
//! the plugin loaded, as a socket plugin whose health checks are the
//! registry's probes: when they miss the threshold, it is unregistered
//! (`Event::Unregistered`, a metric) and unloaded. Unlike the reference,
//! dead plugins leave, and `Unregister` exists.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::State;
use super::conn::Peer;
use super::proto::registry::{PluginCapability, PluginInfo, plugin_registry_server};
use crate::error::Error;
use crate::manifest::{Manifest, is_path_safe};
use crate::origin::Found;
use crate::remote::link::{Address, Link, Wire};
use crate::{Event, EventsError};

/// The plugin registry's settings, for
/// [`Server::registry`](super::Server::registry).
///
/// ```no_run
/// # async fn run(manager: dynplug::PluginManager) -> dynplug::Result<()> {
/// use std::time::Duration;
/// use dynplug::serve::{Registry, Server};
/// let running = Server::new(manager)
///     .registry(
///         Registry::new("/run/dynplug/registry.sock")
///             .endpoint_dir("/run/dynplug/plugins")
///             .probe(Duration::from_secs(1), 3),
///     )
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    pub(crate) path: PathBuf,
    endpoint_dirs: Vec<PathBuf>,
    allowed_uids: Option<Vec<u32>>,
    probe_interval: Duration,
    probe_timeout: Duration,
    probe_misses: u32,
}

impl Registry {
    /// The registry on the Unix socket `path` (its directory is created
    /// 0700 if missing; an existing one must be ours and private). By
    /// default: registrations from this process's user only, endpoints in
    /// the registry socket's own directory only, a probe every second, and
    /// unregistered after 3 missed in a row.
    pub fn new(path: impl Into<PathBuf>) -> Registry {
        Registry {
            path: path.into(),
            endpoint_dirs: Vec::new(),
            allowed_uids: None,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            probe_misses: 3,
        }
    }

    /// Allows endpoints in `dir` (repeatable; the first replaces the
    /// default, the registry socket's directory). Symlinks are resolved
    /// before the comparison.
    #[must_use]
    pub fn endpoint_dir(mut self, dir: impl Into<PathBuf>) -> Registry {
        self.endpoint_dirs.push(dir.into());
        self
    }

    /// The users allowed to register, by uid (default: this process's user
    /// only). The list replaces the default: include your own uid to keep
    /// it.
    #[must_use]
    pub fn allowed_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Registry {
        self.allowed_uids = Some(uids.into_iter().collect());
        self
    }

    /// Probes (goplugin Ping) every `interval`; after `misses` failures in
    /// a row the plugin is unregistered (default 1 s and 3). Each probe may
    /// take half the interval, at most 1 s.
    #[must_use]
    pub fn probe(mut self, interval: Duration, misses: u32) -> Registry {
        self.probe_interval = interval.max(Duration::from_millis(1));
        self.probe_timeout = (interval / 2).clamp(Duration::from_millis(1), Duration::from_secs(1));
        self.probe_misses = misses.max(1);
        self
    }

    fn uids(&self) -> Vec<u32> {
        self.allowed_uids
            .clone()
            .unwrap_or_else(|| vec![rustix::process::geteuid().as_raw()])
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    registrations: AtomicU64,
    refused: [AtomicU64; Refusal::KINDS.len()],
    unregistered_probe: AtomicU64,
    unregistered_request: AtomicU64,
    registered: AtomicU64,
}

/// Why a registration was refused: one kind per metric label and status.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Invalid,
    Caller,
    Endpoint,
    Taken,
    Unreachable,
}

impl Refusal {
    const KINDS: [&'static str; 5] = ["invalid", "caller", "endpoint", "taken", "unreachable"];

    fn status(self, stats: &Stats, message: String) -> Status {
        stats.refused[self as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!("registration refused: {message}");
        match self {
            Refusal::Invalid => Status::invalid_argument(message),
            Refusal::Caller | Refusal::Endpoint => Status::permission_denied(message),
            Refusal::Taken => Status::already_exists(message),
            Refusal::Unreachable => Status::failed_precondition(message),
        }
    }
}

/// One registered plugin.
#[derive(Debug, Clone)]
struct Registered {
    endpoint: PathBuf,
    capabilities: Vec<&'static str>,
}

pub(crate) struct Service {
    state: State,
    settings: Registry,
    /// Canonical allowed directories.
    allowed: Vec<PathBuf>,
    /// `Found::by` of registered plugins.
    by: String,
    stats: Arc<Stats>,
    /// Registrations are handled one at a time: each checks the table,
    /// dials back and loads before the next looks.
    table: tokio::sync::Mutex<BTreeMap<String, Registered>>,
}

impl Service {
    /// The service of `settings`; `Err` names a directory that cannot be used.
    pub(crate) fn new(
        state: State,
        settings: Registry,
        stats: Arc<Stats>,
    ) -> Result<Service, Error> {
        let mut dirs = settings.endpoint_dirs.clone();
        if dirs.is_empty() {
            dirs.push(settings.path.parent().unwrap_or(Path::new(".")).to_owned());
        }
        let allowed = dirs
            .iter()
            .map(|dir| {
                dir.canonicalize().map_err(|e| Error::Config {
                    what: format!("registry endpoint directory {}", dir.display()),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Service {
            by: format!("registry {}", settings.path.display()),
            state,
            settings,
            allowed,
            stats,
            table: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn check_caller(&self, peer: Option<&Peer>) -> Result<u32, Status> {
        let Some((uid, pid)) = peer.and_then(|p| p.cred) else {
            return Err(Refusal::Caller.status(
                &self.stats,
                "the caller's credentials are unknown (registrations come over the registry's Unix socket)".into(),
            ));
        };
        let allowed = self.settings.uids();
        if !allowed.contains(&uid) {
            let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            return Err(Refusal::Caller.status(
                &self.stats,
                format!(
                    "a caller of uid {uid}{pid} may not register: allowed uids are {allowed:?}"
                ),
            ));
        }
        Ok(uid)
    }

    /// The endpoint as a socket path the caller may register.
    fn check_endpoint(&self, endpoint: &str, uid: u32) -> Result<PathBuf, Status> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let refuse = |message: String| Err(Refusal::Endpoint.status(&self.stats, message));
        let quoted = crate::text::printable(endpoint, 200);
        let path = endpoint
            .strip_prefix("unix://")
            .or_else(|| endpoint.strip_prefix("unix:"))
            .unwrap_or(endpoint);
        if path.contains("://") || !Path::new(path).is_absolute() {
            return refuse(format!(
                "endpoint `{quoted}`: endpoints are absolute Unix socket paths (TCP is not accepted)"
            ));
        }
        let path = Path::new(path);
        let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
            return refuse(format!("endpoint `{quoted}`: not a socket path"));
        };
        let dir = match parent.canonicalize() {
            Ok(dir) => dir,
            Err(e) => return refuse(format!("endpoint `{quoted}`: {e}")),
        };
        if !self.allowed.iter().any(|allowed| dir.starts_with(allowed)) {
            let allowed: Vec<String> = self
                .allowed
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return refuse(format!(
                "endpoint `{quoted}` is outside the allowed directories ({})",
                allowed.join(", ")
            ));
        }
        let real = dir.join(file);
        let meta = match std::fs::symlink_metadata(&real) {
            Ok(meta) => meta,
            Err(e) => return refuse(format!("endpoint `{quoted}`: {e}")),
        };
        if !meta.file_type().is_socket() {
            return refuse(format!(
                "endpoint `{quoted}` is not a Unix socket (links are not followed)"
            ));
        }
        if meta.uid() != uid {
            return refuse(format!(
                "endpoint `{quoted}` is owned by uid {}, not by the caller (uid {uid})",
                meta.uid()
            ));
        }
        Ok(real)
    }

    /// Dials the endpoint back and asks it for Ping.
    async fn probe(&self, endpoint: &Path) -> Result<(), String> {
        let link = Link::new(
            Wire::Grpc,
            Address::Unix(endpoint.to_owned()),
            &Arc::from("dynplug"),
        );
        link.ping(self.settings.probe_timeout.max(Duration::from_millis(200)))
            .await
            .map_err(|e| e.to_string())
    }

    fn manifest(
        &self,
        name: &str,
        endpoint: &Path,
        capabilities: &[&str],
        uid: u32,
    ) -> Result<Manifest, Error> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let json = serde_json::json!({
            "name": name,
            "version": "0.0.0",
            "description": format!("registered by uid {uid} with {}", self.by),
            "capabilities": capabilities,
            "source": {
                "mode": "socket",
                "path": endpoint,
                "protocol": "grpc",
                "health_interval_ms": ms(self.settings.probe_interval),
                "health_timeout_ms": ms(self.settings.probe_timeout),
                "health_misses": self.settings.probe_misses,
            },
        });
        Manifest::parse(json.to_string().as_bytes(), endpoint, name)
    }

    async fn unregister_name(&self, name: &str, reason: String) -> bool {
        let Some(registered) = self.table.lock().await.remove(name) else {
            return false;
        };
        self.stats.registered.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(plugin = name, "unregistered: {reason}");
        self.state.manager.emit(Event::Unregistered {
            plugin: name.to_owned(),
            endpoint: registered.endpoint.display().to_string(),
            reason,
        });
        let manager = self.state.manager.clone();
        let (name, by) = (name.to_owned(), self.by.clone());
        let _ = tokio::task::spawn_blocking(move || manager.unload_found(&name, &by)).await;
        true
    }
}

/// Capability numbers → names (`PluginCapability`).
fn capability_names(numbers: &[i32]) -> Result<Vec<&'static str>, String> {
    numbers
        .iter()
        .map(|&n| match PluginCapability::try_from(n) {
            Ok(PluginCapability::Connection) => Ok("CONNECTION"),
            Ok(PluginCapability::Exec) => Ok("EXEC"),
            Err(_) => Err(format!("unknown capability {n}")),
        })
        .collect()
}

#[tonic::async_trait]
impl plugin_registry_server::PluginRegistry for Arc<Service> {
    async fn register(&self, request: Request<PluginInfo>) -> Result<Response<()>, Status> {
        let uid = self.check_caller(request.extensions().get::<Peer>())?;
        let info = request.into_inner();
        let invalid = |message: String| Err(Refusal::Invalid.status(&self.stats, message));
        if info.name.is_empty() {
            return invalid("name is empty".into());
        }
        if !is_path_safe(&info.name) {
            return invalid(format!(
                "name `{}`: expected 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit",
                crate::text::printable(&info.name, 100)
            ));
        }
        if info.endpoint.is_empty() {
            return invalid(format!("{}: endpoint is empty", info.name));
        }
        if info.capabilities.is_empty() {
            return invalid(format!("{}: capabilities are empty", info.name));
        }
        let mut capabilities = match capability_names(&info.capabilities) {
            Ok(names) => names,
            Err(why) => return invalid(format!("{}: {why}", info.name)),
        };
        capabilities.sort_unstable();
        capabilities.dedup();
        let endpoint = self
            .check_endpoint(&info.endpoint, uid)
            .map_err(|s| Status::new(s.code(), format!("{}: {}", info.name, s.message())))?;
        let name = info.name;
        let mut table = self.table.lock().await;
        let serving = || {
            self.state
                .manager
                .info(&name)
                .is_some_and(|i| i.state.in_service())
        };
        if let Some(known) = table.get(&name)
            && known.endpoint == endpoint
            && known.capabilities == capabilities
            && serving()
        {
            // The same registration again: nothing to do (and no reload).
            return Ok(Response::new(()));
        }
        if let Some(known) = table.get(&name)
            && known.endpoint != endpoint
        {
            // Another endpoint has the name: it keeps it while it answers.
            if self.probe(&known.endpoint).await.is_ok() {
                return Err(Refusal::Taken.status(
                    &self.stats,
                    format!(
                        "{name}: registered with endpoint {}, which answers; unregister it first",
                        known.endpoint.display()
                    ),
                ));
            }
            tracing::info!(plugin = %name, old = %known.endpoint.display(), "replacing a registration whose endpoint no longer answers");
        }
        if let Err(why) = self.probe(&endpoint).await {
            return Err(Refusal::Unreachable.status(
                &self.stats,
                format!(
                    "{name}: dialled back unix:{} and it did not answer Ping: {why}",
                    endpoint.display()
                ),
            ));
        }
        let manifest = self
            .manifest(&name, &endpoint, &capabilities, uid)
            .map_err(|e| Refusal::Invalid.status(&self.stats, e.to_string()))?;
        let found = Found::new(
            self.by.clone(),
            endpoint.clone(),
            endpoint.parent().unwrap_or(Path::new("/")).to_owned(),
            manifest,
        );
        let manager = self.state.manager.clone();
        let loaded = tokio::task::spawn_blocking(move || manager.load_found(found))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(error) = loaded {
            let kind = match error {
                Error::NameTaken { .. } => Refusal::Taken,
                _ => Refusal::Unreachable,
            };
            return Err(kind.status(&self.stats, error.to_string()));
        }
        let registered = Registered {
            endpoint: endpoint.clone(),
            capabilities: capabilities.clone(),
        };
        if table.insert(name.clone(), registered).is_none() {
            self.stats.registered.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(plugin = %name, endpoint = %endpoint.display(), ?capabilities, uid, "registered");
        Ok(Response::new(()))
    }

    async fn unregister(&self, request: Request<PluginInfo>) -> Result<Response<()>, Status> {
        self.check_caller(request.extensions().get::<Peer>())?;
        let info = request.into_inner();
        if info.name.is_empty() {
            return Err(Refusal::Invalid.status(&self.stats, "name is empty".into()));
        }
        let known = self.table.lock().await.get(&info.name).cloned();
        let Some(known) = known else {
            return Err(Status::not_found(format!("{}: not registered", info.name)));
        };
        if !info.endpoint.is_empty() {
            // Compared as given (its socket may be gone already), links in
            // its directories resolved when they can be.
            let given = Path::new(
                info.endpoint
                    .strip_prefix("unix://")
                    .or_else(|| info.endpoint.strip_prefix("unix:"))
                    .unwrap_or(&info.endpoint),
            );
            let endpoint = match (given.parent().map(Path::canonicalize), given.file_name()) {
                (Some(Ok(dir)), Some(file)) => dir.join(file),
                _ => given.to_owned(),
            };
            if endpoint != known.endpoint {
                return Err(Refusal::Taken.status(
                    &self.stats,
                    format!(
                        "{}: registered with endpoint {}, not {}",
                        info.name,
                        known.endpoint.display(),
                        endpoint.display()
                    ),
                ));
            }
        }
        if self
            .unregister_name(&info.name, "it asked to (Unregister)".into())
            .await
        {
            self.stats
                .unregistered_request
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(()))
    }
}

/// Unregisters the plugins whose probes missed the threshold: the socket
/// kind reports them `Unreachable` (its health checks are the probes).
pub(crate) async fn reap(service: Arc<Service>) {
    let mut events = service.state.manager.subscribe();
    let mut shutdown = service.state.shutdown.clone();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            Ok(Event::Unreachable { plugin, reason, .. }) => {
                let known = service.table.lock().await.contains_key(&plugin);
                if known
                    && service
                        .unregister_name(&plugin, format!("missed its probes: {reason}"))
                        .await
                {
                    service
                        .stats
                        .unregistered_probe
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) | Err(EventsError::Lagged(_)) => {}
            Err(EventsError::Closed) => return,
        }
    }
}

/// The registry's lines of `/metrics`.
pub(crate) fn render(stats: &Stats, out: &mut String) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP dynplug_registry_plugins Plugins registered now.\n# TYPE dynplug_registry_plugins gauge\ndynplug_registry_plugins {}",
        load(&stats.registered)
    );
    let _ = writeln!(
        out,
        "# HELP dynplug_registry_registrations_total Registrations accepted.\n# TYPE dynplug_registry_registrations_total counter\ndynplug_registry_registrations_total {}",
        load(&stats.registrations)
    );
    let _ = writeln!(
        out,
        "# HELP dynplug_registry_refused_total Registrations refused, by reason.\n# TYPE dynplug_registry_refused_total counter"
    );
    for (kind, count) in Refusal::KINDS.iter().zip(&stats.refused) {
        let _ = writeln!(
            out,
            "dynplug_registry_refused_total{{reason=\"{kind}\"}} {}",
            load(count)
        );
    }
    let _ = writeln!(
        out,
        "# HELP dynplug_registry_unregistered_total Plugins unregistered: missed probes, or asked to.\n# TYPE dynplug_registry_unregistered_total counter\ndynplug_registry_unregistered_total{{reason=\"probes\"}} {}\ndynplug_registry_unregistered_total{{reason=\"request\"}} {}",
        load(&stats.unregistered_probe),
        load(&stats.unregistered_request)
    );
}
