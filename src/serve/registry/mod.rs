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
//!
//! `service.rs` has the service and its checks; this file its settings,
//! the refusals and the counters `/metrics` shows.

mod service;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::Status;

pub(crate) use service::{Service, reap};

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
