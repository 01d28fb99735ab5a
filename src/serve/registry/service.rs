//! The registry service: `Register` and `Unregister` with their checks,
//! and the reaper that unregisters plugins whose probes failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Refusal, Registry, Stats};
use crate::error::Error;
use crate::manifest::{Manifest, is_path_safe};
use crate::origin::Found;
use crate::remote::link::{Address, Link, Wire};
use crate::serve::State;
use crate::serve::conn::Peer;
use crate::serve::proto::registry::{PluginCapability, PluginInfo, plugin_registry_server};
use crate::{Event, EventsError};

/// One registered plugin.
#[derive(Debug, Clone)]
struct Registered {
    endpoint: PathBuf,
    capabilities: Vec<&'static str>,
    /// Who registered it: only that user may unregister or replace it (the
    /// management API can still unload it).
    uid: u32,
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

    /// Dials the endpoint back (its server must run as `uid`) and asks it
    /// for Ping.
    async fn probe(&self, endpoint: &Path, uid: u32) -> Result<(), String> {
        let link = Link::new(
            Wire::Grpc,
            Address::Unix(endpoint.to_owned(), Some(uid)),
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
                "peer_uid": uid,
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

impl Service {
    /// `Register` from `uid`, once its caller is checked.
    async fn register_as(&self, uid: u32, info: PluginInfo) -> Result<Response<()>, Status> {
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
            && known.uid != uid
        {
            // Another user's name stays theirs until it is unregistered
            // (by them, or by the probes once its endpoint stops answering).
            return Err(Refusal::Taken.status(
                &self.stats,
                format!(
                    "{name}: registered by uid {}, not by the caller (uid {uid})",
                    known.uid
                ),
            ));
        }
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
            if self.probe(&known.endpoint, known.uid).await.is_ok() {
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
        if let Err(why) = self.probe(&endpoint, uid).await {
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
            uid,
        };
        if table.insert(name.clone(), registered).is_none() {
            self.stats.registered.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(plugin = %name, endpoint = %endpoint.display(), ?capabilities, uid, "registered");
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl plugin_registry_server::PluginRegistry for Arc<Service> {
    async fn register(&self, request: Request<PluginInfo>) -> Result<Response<()>, Status> {
        let uid = self.check_caller(request.extensions().get::<Peer>())?;
        let info = request.into_inner();
        // On a task of its own: a caller that goes away mid-registration
        // does not cancel it, so a plugin loaded is always in the table.
        let service = Arc::clone(self);
        tokio::spawn(async move { service.register_as(uid, info).await })
            .await
            .map_err(|e| Status::internal(format!("registering: {e}")))?
    }

    async fn unregister(&self, request: Request<PluginInfo>) -> Result<Response<()>, Status> {
        let uid = self.check_caller(request.extensions().get::<Peer>())?;
        let info = request.into_inner();
        if info.name.is_empty() {
            return Err(Refusal::Invalid.status(&self.stats, "name is empty".into()));
        }
        let known = self.table.lock().await.get(&info.name).cloned();
        let Some(known) = known else {
            return Err(Status::not_found(format!("{}: not registered", info.name)));
        };
        if known.uid != uid {
            return Err(Status::permission_denied(format!(
                "{}: registered by uid {}, not by the caller (uid {uid})",
                info.name, known.uid
            )));
        }
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
                // A late report about an endpoint replaced since (the one
                // serving now answers) unregisters nothing.
                let answers = service
                    .state
                    .manager
                    .info(&plugin)
                    .and_then(|info| info.socket)
                    .is_some_and(|socket| socket.connected);
                if known
                    && !answers
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
