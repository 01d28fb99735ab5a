//! [`Builder`]: the manager's settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::broadcast;

use super::{Inner, PluginManager};
use crate::error::{Error, Result};
use crate::native::{FirstLoad, LateEnding, NativeOptions, remove_stale};
use crate::version::LoadOptions;

/// Configures a [`PluginManager`].
#[derive(Debug, Clone)]
pub struct Builder {
    base: PathBuf,
    shadow_dir: Option<PathBuf>,
    pool_size: usize,
    queue_limit: Option<usize>,
    drain_timeout: Duration,
    event_capacity: usize,
    allow_downgrades: bool,
    settle: Duration,
    max_library_size: u64,
    init_timeout: Duration,
    shutdown_timeout: Duration,
    trusted_keys: Vec<crate::signing::PublicKey>,
    trusted_keys_file: Option<PathBuf>,
    require_signatures: bool,
    build_cache: Option<PathBuf>,
    build_timeout: Duration,
    host_name: String,
    process_runner: Option<PathBuf>,
    process_grace: Duration,
    process_backoff: (Duration, Duration),
    load_on_first_call: bool,
    unload_idle_after: Option<Duration>,
}

impl Builder {
    pub(super) fn new(base: PathBuf) -> Builder {
        Builder {
            base,
            shadow_dir: None,
            pool_size: 2,
            queue_limit: None,
            drain_timeout: Duration::from_secs(30),
            event_capacity: 1024,
            allow_downgrades: false,
            settle: Duration::from_millis(25),
            max_library_size: crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES,
            init_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            trusted_keys: Vec::new(),
            trusted_keys_file: None,
            require_signatures: false,
            build_cache: None,
            build_timeout: Duration::from_secs(600),
            host_name: "dynplug".into(),
            process_runner: None,
            process_grace: Duration::from_secs(1),
            process_backoff: (Duration::from_millis(100), Duration::from_secs(30)),
            load_on_first_call: false,
            unload_idle_after: None,
        }
    }

    /// Where private copies of libraries are written when they cannot be
    /// loaded from memory (default `<base>/.dynplug/shadow`; on Linux a
    /// sealed memfd is used and nothing is written). Created `0700`; a
    /// directory owned by another user or writable by others is refused.
    /// Must be on a filesystem that allows executable mappings. Exec
    /// plugins' private copies (and Unix sockets) go in its `exec`
    /// subdirectory (default `<base>/.dynplug/exec`).
    #[must_use]
    pub fn shadow_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shadow_dir = Some(dir.into());
        self
    }

    /// Worker threads per loaded version of a `pooled` plugin (default 2).
    #[must_use]
    pub fn pool_size(mut self, threads: usize) -> Self {
        self.pool_size = threads.max(1);
        self
    }

    /// At most this many calls wait for a worker of a `pooled` version
    /// (beyond the `pool_size` running); a call past that fails at once with
    /// [`Error::Overloaded`] (HTTP 503, gRPC `UNAVAILABLE`) instead of
    /// queueing. Default: no limit (calls queue until their deadline).
    #[must_use]
    pub fn queue_limit(mut self, calls: usize) -> Self {
        self.queue_limit = Some(calls);
        self
    }

    /// How long an unload waits for running calls before reporting the
    /// version as leaked (default 30 s).
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How many events a slow subscriber may lag behind (default 1024).
    #[must_use]
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Whether a version lower than the serving one may replace it (default
    /// `false`: such an upgrade is refused with [`Error::Downgrade`]).
    #[must_use]
    pub fn allow_downgrades(mut self, allow: bool) -> Self {
        self.allow_downgrades = allow;
        self
    }

    /// How long the watcher waits after the last change under a plugin
    /// directory before loading it (default 25 ms, at most an hour); a failed
    /// load is retried once after eight times as long, in case the file was
    /// still being written.
    #[must_use]
    pub fn settle_time(mut self, settle: Duration) -> Self {
        self.settle = settle.min(Duration::from_secs(3600));
        self
    }

    /// The largest library or exec plugin executable loaded (default 256
    /// MiB); a larger one is refused with [`Error::Io`] before it is read.
    #[must_use]
    pub fn max_library_size(mut self, bytes: u64) -> Self {
        self.max_library_size = bytes;
        self
    }

    /// How long a plugin's `init` may run (default 30 s). Past it the load
    /// fails with [`Error::Init`]; the version cannot be unloaded (its thread
    /// is still in plugin code) and is reported leaked. Only that plugin
    /// waits: loads of other plugins go on.
    #[must_use]
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    /// How long a plugin's `shutdown` may run (default 10 s). Past it the
    /// version is reported leaked and its code stays mapped.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Trusts signatures by these keys: a signed plugin is then loaded only
    /// if its signature verifies over the bytes loaded and its key is one
    /// of these (see [`require_signatures`](Self::require_signatures) for
    /// unsigned ones). Default: none, and signatures are not checked.
    #[must_use]
    pub fn trusted_keys(
        mut self,
        keys: impl IntoIterator<Item = crate::signing::PublicKey>,
    ) -> Self {
        self.trusted_keys.extend(keys);
        self
    }

    /// Trusts the keys in `path` (a file of `dynplug-ed25519-public` lines,
    /// or a directory of `*.pub` files), read by [`build`](Self::build).
    #[must_use]
    pub fn trusted_keys_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.trusted_keys_file = Some(path.into());
        self
    }

    /// Refuses unsigned plugins, with [`Error::Signature`] (default `false`).
    #[must_use]
    pub fn require_signatures(mut self, required: bool) -> Self {
        self.require_signatures = required;
        self
    }

    /// Where `remote_git` plugins are cloned and built, one directory per
    /// repository, builds kept per commit (default
    /// `$XDG_CACHE_HOME/dynplug/builds`, else `~/.cache/dynplug/builds`).
    /// Created `0700`. Cargo's target directory is `$CARGO_TARGET_DIR` when
    /// set, else one per repository in here.
    #[must_use]
    pub fn build_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.build_cache = Some(dir.into());
        self
    }

    /// How long each git or cargo step of a `remote_git` build may take
    /// before it is killed (default 10 minutes).
    #[must_use]
    pub fn build_timeout(mut self, timeout: Duration) -> Self {
        self.build_timeout = timeout;
        self
    }

    /// The name exec plugins see as the caller: goplugin's `X-Host` header
    /// (REST) and `x-host` metadata (gRPC), which goplugin plugins may check
    /// against their list of allowed hosts (default `dynplug`).
    #[must_use]
    pub fn host_name(mut self, name: impl Into<String>) -> Self {
        self.host_name = name.into();
        self
    }

    /// The program that runs plugins with `isolation: "process"`: a
    /// `dynplug` binary of this version (it has the hidden runner command),
    /// or a host program that calls [`run_if_runner`](crate::run_if_runner)
    /// first in `main`. Default: the environment variable `DYNPLUG_RUNNER`,
    /// else a `dynplug` beside the running program or in the directory
    /// above it. Without one, such plugins fail to load with
    /// [`Error::Start`], saying where it was looked for.
    #[must_use]
    pub fn process_runner(mut self, program: impl Into<PathBuf>) -> Self {
        self.process_runner = Some(program.into());
        self
    }

    /// How long a call of an `isolation: "process"` plugin may go on past
    /// its deadline before its process is killed and restarted (default
    /// 1 s). The caller gets [`Error::DeadlineExceeded`] at the deadline
    /// either way.
    #[must_use]
    pub fn process_grace(mut self, grace: Duration) -> Self {
        self.process_grace = grace;
        self
    }

    /// The restart delays of `isolation: "process"` plugins' processes:
    /// the first restart after a crash is immediate, the next ones in a
    /// row wait `first`, doubling up to `max` (default 100 ms and 30 s,
    /// as exec plugins).
    #[must_use]
    pub fn process_restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.process_backoff = (first.min(max), max);
        self
    }

    /// Registers native plugins without loading them; each one's library
    /// is loaded (checked, mapped, initialised) by its first call (default
    /// off). Registration still checks the manifest, the routes and the
    /// library file (where it is, what it is, who can write it, its size,
    /// and its header: a complete library exporting a dynplug root of a
    /// compatible ABI, read without running any of it); what only the load
    /// can find (checksum, signature, `dlopen`, the ABI's layout, `init`)
    /// fails that call and every later one with the reason, and the plugin
    /// is listed `failed`, until it is loaded again. A plugin waiting for
    /// its first call is listed `deferred`. Upgrades are loaded before they
    /// serve, as without this setting. For hosts with many plugins of which
    /// few are called: 1,000 plugins are ready in about 0.1 s and only the
    /// plugins called are mapped.
    #[must_use]
    pub fn load_on_first_call(mut self, deferred: bool) -> Self {
        self.load_on_first_call = deferred;
        self
    }

    /// Unloads a native plugin's loaded version once no call has come for
    /// `idle`, leaving it registered as with
    /// [`load_on_first_call`](Self::load_on_first_call) (which this turns
    /// on): its next call loads it again, from the same files, with every
    /// check. Its state goes with it (a counter starts over, `init` runs
    /// again). A version whose unload would not unmap its code is kept
    /// (`inline` without thread tracking), as is a plugin with an older
    /// version still mapped (see [`PluginInfo::retired`](crate::PluginInfo)).
    /// Off by default; one `dynplug-idle` thread when on.
    #[must_use]
    pub fn unload_idle_after(mut self, idle: Duration) -> Self {
        self.unload_idle_after = Some(idle);
        self.load_on_first_call = true;
        self
    }

    /// What every load of the manager needs (nobody hears how a pinned
    /// version ends: for `verify`).
    pub(crate) fn load_options(&self) -> LoadOptions {
        self.load_options_with(LateEnding::ignored(), FirstLoad::ignored())
    }

    fn load_options_with(&self, late: LateEnding, first_load: FirstLoad) -> LoadOptions {
        LoadOptions {
            native: self.native_options(late, first_load),
            trust: Arc::new(crate::signing::Trust::default()),
            load_on_first_call: self.load_on_first_call,
            build: crate::build::BuildOptions {
                cache: self
                    .build_cache
                    .clone()
                    .unwrap_or_else(|| crate::build::BuildOptions::default_cache(&self.base)),
                timeout: self.build_timeout,
            },
            #[cfg(feature = "exec")]
            exec: crate::exec::ExecOptions {
                // Copies are executed from here: it must allow it (not noexec).
                // Absolute: the program starts in its plugin directory, where
                // a relative path to its copy would not resolve.
                work_dir: absolute(match &self.shadow_dir {
                    Some(shadow) => shadow.join("exec"),
                    None => self.base.join(".dynplug").join("exec"),
                }),
                max_size: self.max_library_size,
                host_name: self.host_name.as_str().into(),
                events: crate::event::EventSink::default(),
            },
            #[cfg(feature = "exec")]
            process: crate::process::ProcessOptions {
                runner: self.process_runner.clone(),
                grace: self.process_grace,
                backoff: self.process_backoff,
            },
            #[cfg(feature = "exec")]
            socket: crate::socket::SocketOptions {
                host_name: self.host_name.as_str().into(),
                events: crate::event::EventSink::default(),
            },
        }
    }

    /// The trust policy, with the key file read.
    fn trust(&self) -> Result<crate::signing::Trust> {
        let mut keys = self.trusted_keys.clone();
        let mut source = format!("{} key(s) given", keys.len());
        if let Some(path) = &self.trusted_keys_file {
            keys.extend(crate::signing::PublicKey::load_all(path)?);
            source = path.display().to_string();
        }
        Ok(crate::signing::Trust::new(
            keys,
            self.require_signatures,
            source,
        ))
    }

    fn native_options(&self, late: LateEnding, first_load: FirstLoad) -> NativeOptions {
        NativeOptions {
            shadow_dir: self
                .shadow_dir
                .clone()
                .unwrap_or_else(|| self.base.join(".dynplug").join("shadow")),
            pool_size: self.pool_size,
            queue_limit: self.queue_limit,
            max_library_size: self.max_library_size,
            init_timeout: self.init_timeout,
            shutdown_timeout: self.shutdown_timeout,
            late,
            first_load,
        }
    }

    /// Creates the manager.
    ///
    /// # Errors
    /// [`Error::Io`] if the base directory is not a readable directory,
    /// [`Error::Insecure`] if every user can write to it, [`Error::Io`] or
    /// [`Error::Config`] if the trusted keys file cannot be read.
    pub fn build(self) -> Result<PluginManager> {
        let io = |source| Error::Io {
            plugin: String::new(),
            action: "opening plugins directory",
            path: self.base.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.base).map_err(io)?;
        if !meta.is_dir() {
            return Err(io(std::io::Error::other("not a directory")));
        }
        if let Some(reason) = crate::private_dir::world_writable(&self.base) {
            return Err(Error::Insecure {
                plugin: String::new(),
                path: self.base.clone(),
                reason,
            });
        }
        if let Some(warning) = crate::private_dir::group_writable(&self.base) {
            tracing::warn!("{warning}");
        }
        report_thread_tracking();
        let trust = Arc::new(self.trust()?);
        let unpack_root = self.base.join(".dynplug").join("unpacked");
        crate::package::remove_stale(&unpack_root);
        let packages = crate::origin::PackageIndex::new(crate::package::Limits::for_library(
            self.max_library_size,
        ));
        let (events, _) = broadcast::channel(self.event_capacity);
        let inner = Arc::new_cyclic(|manager: &Weak<Inner>| {
            // A version reported pinned ends later, on dynplug's reaper
            // thread; the manager may be gone by then.
            let weak = manager.clone();
            let late = LateEnding::new(move |plugin, version, ending| {
                if let Some(inner) = weak.upgrade() {
                    PluginManager::from_inner(inner).ended_late(plugin, version, ending);
                }
            });
            // A deferred version's load ends on a `dynplug-load` thread.
            let weak = manager.clone();
            let first_load = FirstLoad::new(move |plugin, version, error, which| {
                if let Some(inner) = weak.upgrade() {
                    PluginManager::from_inner(inner)
                        .loaded_on_first_call(plugin, version, error, which);
                }
            });
            let mut options = self.load_options_with(late, first_load);
            options.trust = trust;
            remove_stale(&options.native.shadow_dir);
            #[cfg(feature = "exec")]
            {
                crate::exec::remove_stale(&options.exec.work_dir);
                options.exec.events = crate::event::EventSink::new(events.clone());
                options.socket.events = crate::event::EventSink::new(events.clone());
            }
            Inner {
                base: self.base.clone(),
                unpack_root,
                packages,
                options,
                drain_timeout: self.drain_timeout,
                allow_downgrades: self.allow_downgrades,
                settle: self.settle,
                tls_warned: AtomicUsize::new(0),
                slots: RwLock::new(BTreeMap::new()),
                events,
                changes: std::sync::atomic::AtomicU64::new(0),
                routes: Mutex::new(super::load::ServedRoutes::default()),
                idle_reaper: std::sync::OnceLock::new(),
            }
        });
        // Started once the manager exists: it only ever holds it weakly.
        if let Some(idle) = self.unload_idle_after {
            match super::idle::start(Arc::downgrade(&inner), idle) {
                Ok(reaper) => drop(inner.idle_reaper.set(reaper)),
                Err(e) => tracing::warn!("idle versions will not be unloaded: {e}"),
            }
        }
        Ok(PluginManager { inner })
    }
}

/// Says once per process, at the first manager, when the executable does
/// not let dynplug see what plugin code leaves on threads, and what that
/// costs.
fn report_thread_tracking() {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| {
        if let Err(why) = crate::native::thread_tracking() {
            tracing::warn!(
                "{why}: dynplug cannot see what plugin code leaves on threads, so `auto` \
                 plugins run on their own workers and replaced `inline` versions are never \
                 unloaded. A host binary exports them with one line in its crate's build.rs: \
                 println!(\"cargo:rustc-link-arg-bins={}\");",
                crate::THREAD_TRACKING_LINK_ARG
            );
        }
    });
}

/// `path` made absolute against the current directory (as it is).
#[cfg(feature = "exec")]
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}
