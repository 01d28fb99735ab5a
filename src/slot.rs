//! A plugin name and the version currently serving it.
//!
//! Executors hold the slot, not a version: every call loads the current
//! version (an `arc-swap` read, a few nanoseconds) and keeps it alive until
//! the call returns, so swapping in a new version never fails a call and the
//! old one is dropped once its last call ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use serde::Serialize;

use crate::manifest::Isolation;
use crate::origin::Origin;
use crate::version::Version;

/// Where a plugin is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PluginState {
    /// Serving calls.
    Loaded,
    /// In service, its library not loaded yet: the first call loads it
    /// (the manager loads on first call).
    Deferred,
    /// Never loaded successfully (see the error).
    Failed,
    /// Being taken out of service: no new calls, waiting for running ones.
    Draining,
    /// Taken out of service and unmapped.
    Unloaded,
    /// Taken out of service; an `inline` plugin's code stays mapped on purpose.
    Retained,
    /// Taken out of service, but its code is still mapped (see the error).
    Leaked,
    /// Taken out of service; closed once the threads that hold state of its
    /// code (named in the error) let go.
    Pinned,
    /// In service, but its process is down and being started again: calls
    /// fail with `Unavailable` meanwhile.
    Restarting,
    /// In service, but its process crashed several times in a row soon
    /// after starting: it is restarted with a growing delay, and calls
    /// fail with `Unavailable` meanwhile.
    CrashLoop,
    /// In service, but its socket does not answer (a socket plugin):
    /// calls fail with `Unavailable` meanwhile, and reconnection is tried
    /// with a growing delay.
    Unreachable,
}

impl PluginState {
    /// The name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginState::Loaded => "loaded",
            PluginState::Deferred => "deferred",
            PluginState::Failed => "failed",
            PluginState::Draining => "draining",
            PluginState::Unloaded => "unloaded",
            PluginState::Retained => "retained",
            PluginState::Leaked => "leaked",
            PluginState::Pinned => "pinned",
            PluginState::Restarting => "restarting",
            PluginState::CrashLoop => "crash_loop",
            PluginState::Unreachable => "unreachable",
        }
    }

    /// Whether a version is in service (routes mounted, listed as the
    /// plugin's): loaded, to be loaded by its first call, or loaded with its
    /// process restarting.
    pub fn in_service(self) -> bool {
        matches!(
            self,
            PluginState::Loaded
                | PluginState::Deferred
                | PluginState::Restarting
                | PluginState::CrashLoop
                | PluginState::Unreachable
        )
    }
}

/// A row of [`PluginManager::list`](crate::PluginManager::list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PluginInfo {
    /// The plugin's name.
    pub name: String,
    /// The version serving (or last known).
    pub version: Option<String>,
    /// `source.mode` (the kind of plugin).
    pub mode: Option<String>,
    /// `isolation`.
    pub isolation: Option<Isolation>,
    /// The state.
    pub state: PluginState,
    /// The last error: why it failed, or why its last load or unload went wrong.
    pub error: Option<String>,
    /// The plugin directory, or the package it was last loaded from.
    pub dir: PathBuf,
    /// Versions swapped in after the first (upgrades and reloads).
    pub upgrades: u64,
    /// Versions taken out of service and unmapped.
    pub unloads: u64,
    /// Call counters, across versions.
    pub calls: CallCounts,
    /// Versions taken out of service whose code stays mapped: `inline`
    /// versions (retained on purpose) and leaked ones, oldest first.
    pub retired: Vec<RetiredVersion>,
    /// What the serving version offers to fan-outs (its manifest's
    /// `capabilities`, or those it registered with).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// For plugins that run as a process (`exec`, or `isolation:
    /// "process"`): that process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,
    /// For plugins served by a socket dynplug did not start (`socket`,
    /// found in a sockets directory, or registered): that socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketInfo>,
}

impl PluginInfo {
    /// Whether the plugin's handshake said it implements `interface`:
    /// `Group` matches `Group/0.1.0`, as does `Group/0.1.0` itself.
    pub fn implements(&self, interface: &str) -> bool {
        self.socket.as_ref().is_some_and(|socket| {
            socket.interfaces.iter().any(|have| {
                have == interface
                    || have
                        .split_once('/')
                        .is_some_and(|(name, _)| name == interface)
            })
        })
    }

    /// Whether the plugin offers `capability` to fan-outs.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|have| have == capability)
    }
}

/// A socket plugin's server, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SocketInfo {
    /// Where it listens: `unix:PATH` or `HOST:PORT`.
    pub address: String,
    /// The protocol it is spoken to in: `jsonrpc`, `docker`, `rest` or `grpc`.
    pub protocol: String,
    /// Whether it answers now.
    pub connected: bool,
    /// What its handshake said it implements (`Group/0.1.0`,
    /// `VolumeDriver`); empty when it implements nothing in particular.
    pub interfaces: Vec<String>,
    /// How it was found: `manifest`, `sockets directory DIR`, `registry`.
    pub found_by: String,
    /// Times it answered again after being unreachable.
    pub reconnects: u64,
    /// Failed connection attempts in a row (0 while it answers).
    pub failures_in_row: u32,
    /// Why it was last unreachable.
    pub last_error: Option<String>,
}

/// One plugin process, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ProcessInfo {
    /// The running process, if one is up.
    pub pid: Option<u32>,
    /// Where it listens: `127.0.0.1:PORT` or `unix:PATH`.
    pub address: String,
    /// `rest` or `grpc`; `dynplug` for a native plugin's runner
    /// (`isolation: "process"`).
    pub protocol: String,
    /// Its resident memory, in bytes, when it runs (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Times the process was started again after going down.
    pub restarts: u64,
    /// Crashes in a row (0 once a process runs long enough).
    pub crashes_in_row: u32,
    /// How the last process ended, e.g. `killed by SIGKILL`.
    pub last_exit: Option<String>,
    /// The last lines the processes wrote (`[pid stream] text`), oldest first.
    pub logs: Vec<String>,
}

/// A version taken out of service that is still mapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RetiredVersion {
    /// The version.
    pub version: String,
    /// [`PluginState::Retained`], [`PluginState::Leaked`] or [`PluginState::Pinned`].
    pub state: PluginState,
    /// Why it is still mapped.
    pub reason: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) state: PluginState,
    pub(crate) error: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) mode: Option<String>,
    pub(crate) isolation: Option<Isolation>,
    pub(crate) upgrades: u64,
    pub(crate) unloads: u64,
    pub(crate) retired: Vec<RetiredVersion>,
    /// What the watcher last tried to load, so an unchanged directory is not
    /// loaded (or reported) again.
    pub(crate) attempted: Option<u64>,
    /// Versions being unloaded by `retire` now, until their ending is recorded.
    pub(crate) ending: Vec<String>,
    /// Versions whose late ending (the reaper's) came before their pinned
    /// report was recorded: recorded, and announced, right after it.
    pub(crate) ended_early: Vec<(String, crate::version::Ending)>,
}

pub(crate) struct Slot {
    pub(crate) name: String,
    /// Where the plugin was last loaded from (a newer package moves it).
    origin: Mutex<Origin>,
    pub(crate) current: ArcSwapOption<Version>,
    pub(crate) stats: CallStats,
    status: Mutex<Status>,
    /// Held by every load, reload and unload of this plugin, so its
    /// versions swap in order. Per plugin: a plugin whose `init` hangs
    /// holds up only itself (until `init_timeout`), never the others.
    ops: Mutex<()>,
    /// Held while a version is swapped in and announced, and while a
    /// deferred version's first load is announced: that announcement
    /// follows the registration's, and is made only for the version in
    /// service. Never held while waiting for anything.
    announce: Mutex<()>,
}

/// Call counters of one plugin, across its versions. Two relaxed atomic
/// increments per successful call: cheap next to the call itself. On a cache
/// line of their own, so counting never invalidates the line every call
/// reads the serving version from.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct CallStats {
    pub(crate) started: AtomicU64,
    pub(crate) finished: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) panics: AtomicU64,
}

/// A snapshot of a plugin's call counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[non_exhaustive]
pub struct CallCounts {
    /// Calls made (finished or running).
    pub calls: u64,
    /// Calls that returned an error (panics included).
    pub errors: u64,
    /// Calls in which the plugin panicked.
    pub panics: u64,
    /// Calls running now.
    pub in_flight: u64,
}

impl CallStats {
    pub(crate) fn record<T>(&self, result: &crate::Result<T>) {
        if let Err(error) = result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(error, crate::Error::Panic { .. }) {
                self.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CallCounts {
        let finished = self.finished.load(Ordering::Relaxed);
        let started = self.started.load(Ordering::Relaxed).max(finished);
        CallCounts {
            calls: started,
            errors: self.errors.load(Ordering::Relaxed),
            panics: self.panics.load(Ordering::Relaxed),
            in_flight: started - finished,
        }
    }
}

impl Slot {
    pub(crate) fn new(name: String, origin: Origin) -> Slot {
        Slot {
            name,
            origin: Mutex::new(origin),
            current: ArcSwapOption::empty(),
            stats: CallStats::default(),
            status: Mutex::new(Status {
                state: PluginState::Failed,
                error: None,
                version: None,
                mode: None,
                isolation: None,
                upgrades: 0,
                unloads: 0,
                retired: Vec::new(),
                attempted: None,
                ending: Vec::new(),
                ended_early: Vec::new(),
            }),
            ops: Mutex::new(()),
            announce: Mutex::new(()),
        }
    }

    pub(crate) fn origin(&self) -> Origin {
        self.origin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_origin(&self, origin: Origin) {
        *self.origin.lock().unwrap_or_else(|e| e.into_inner()) = origin;
    }

    /// Serialises loads and unloads of this plugin (see `ops`).
    pub(crate) fn ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Orders announcements of this plugin's versions (see `announce`).
    pub(crate) fn announce(&self) -> MutexGuard<'_, ()> {
        self.announce.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn status(&self) -> MutexGuard<'_, Status> {
        // A panic while holding this lock leaves plain data behind: keep going.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn info(&self) -> PluginInfo {
        let current = self.current.load();
        let status = self.status();
        let mut info = PluginInfo {
            name: self.name.clone(),
            version: status.version.clone(),
            mode: status.mode.clone(),
            isolation: status.isolation,
            state: status.state,
            error: status.error.clone(),
            dir: self.origin().path().to_owned(),
            upgrades: status.upgrades,
            unloads: status.unloads,
            calls: self.stats.snapshot(),
            retired: status.retired.clone(),
            capabilities: Vec::new(),
            process: None,
            socket: None,
        };
        if let Some(version) = current.as_ref() {
            info.capabilities.clone_from(&version.manifest.capabilities);
            info.process = version.process();
            info.socket = version.socket();
            if let (Some(socket), Origin::Found(found)) = (&mut info.socket, &self.origin()) {
                socket.found_by.clone_from(&found.by);
            }
            if info.state == PluginState::Loaded
                && let Some(state) = version.down_state()
            {
                info.state = state;
            }
            if let Some(error) = version.load_error() {
                // An upgrade that failed meanwhile keeps its cause beside it.
                info.error = Some(match info.error.take() {
                    Some(other) if other != error => format!("{error}; also: {other}"),
                    _ => error.to_owned(),
                });
            }
        }
        info
    }

    /// Records `version` as serving.
    pub(crate) fn mark_loaded(&self, version: &Version) {
        let mut status = self.status();
        status.state = PluginState::Loaded;
        status.error = None;
        status.version = Some(version.manifest.version.to_string());
        status.mode = Some(version.manifest.source.mode().to_owned());
        status.isolation = Some(version.manifest.isolation);
    }

    pub(crate) fn swap(&self, version: Option<Arc<Version>>) -> Option<Arc<Version>> {
        self.current.swap(version)
    }
}
