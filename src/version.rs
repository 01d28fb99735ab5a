//! One loaded version of a plugin, whatever its kind: the seam between the
//! manager (and everything above it: watcher, façades, metrics, CLI) and the
//! plugin kinds.
//!
//! A kind is one [`Backend`] variant, implemented in its own module, with
//! the same few operations: load (checked, started, ready), execute
//! (blocking and async), how many calls it still runs (`busy`, for
//! draining), unload (stop, and say how it ended), and what it runs from
//! (`artifact`, for messages). Everything else (routes, version policy,
//! draining, events, metrics) is the manager's and is the same for every
//! kind. `Version::load` is the one place that decides which kind a
//! manifest asks for, and refuses what this host does not do.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::Context;
use crate::error::{Error, Result};
#[cfg(feature = "exec")]
use crate::exec::{ExecOptions, ExecVersion};
use crate::manifest::{Isolation, Manifest, Source};
use crate::native::{self, Deferred, NativeOptions, NativeVersion};
#[cfg(feature = "exec")]
use crate::process::{ProcessOptions, ProcessVersion};
use crate::signing::{Seal, Trust};
use crate::slot::{PluginState, ProcessInfo, SocketInfo};
#[cfg(feature = "exec")]
use crate::socket::{SocketOptions, SocketVersion};

/// What a plugin's entry reported.
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok,
    Error(String),
    Panic(String),
}

/// How a version ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Stopped and, for native code, verified unmapped.
    Unloaded,
    /// Kept mapped on purpose (`inline`, where plugin threads are not tracked).
    Retained,
    /// Closed once the threads holding state of its code let go; the
    /// reason names them. How it finally ended is reported later.
    Pinned(String),
    /// Still mapped after `dlclose`, or never closed; the reason says why.
    Leaked(String),
}

/// Leave to run one call in place, by kind.
pub(crate) enum InPlace<'a> {
    Native(native::InPlace<'a>),
}

/// How a version's calls are carried out: one variant per plugin kind.
// Without the exec kinds the boxed deferred variant is the only other one;
// the native variant, on every call's path, stays unboxed.
#[cfg_attr(not(feature = "exec"), allow(clippy::large_enum_variant))]
pub(crate) enum Backend {
    Native(NativeVersion),
    /// A native plugin loaded on its first call (`load_on_first_call`);
    /// boxed: it keeps the manifest and settings to load with (a kilobyte).
    Deferred(Box<Deferred>),
    #[cfg(feature = "exec")]
    Exec(ExecVersion),
    /// A native plugin in a child process (`isolation: "process"`).
    #[cfg(feature = "exec")]
    Process(ProcessVersion),
    #[cfg(feature = "exec")]
    Socket(SocketVersion),
}

pub(crate) struct Version {
    pub(crate) manifest: Arc<Manifest>,
    backend: Backend,
    /// The unpacked package an exec version runs in (its program's working
    /// directory, also at restarts), or a deferred version will load from;
    /// removed when the version goes.
    _files: Option<crate::package::Unpacked>,
    /// The fingerprint of the files it was loaded from (see
    /// `Origin::fingerprint`), when loaded from the plugins directory.
    pub(crate) files: Option<u64>,
    /// Which version this is, never reused in the process (an address
    /// can be, once a version is freed).
    serial: u64,
}

/// The next [`Version::serial`].
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// When a native version's library is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Defer {
    /// Now: checked, started and ready before it serves.
    No,
    /// By its first call (`load_on_first_call`).
    FirstCall,
    /// By its next call: it replaces a loaded version that was idle (and is
    /// upgraded as a loaded version is).
    AfterIdle,
}

/// What the manager needs to load any kind of plugin.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub(crate) native: NativeOptions,
    #[cfg(feature = "exec")]
    pub(crate) exec: ExecOptions,
    /// Which signatures loads require and accept.
    pub(crate) trust: Arc<Trust>,
    /// Native plugins not yet serving are loaded by their first call.
    pub(crate) load_on_first_call: bool,
    /// Where `remote_git` plugins are built.
    pub(crate) build: crate::build::BuildOptions,
    #[cfg(feature = "exec")]
    pub(crate) process: ProcessOptions,
    #[cfg(feature = "exec")]
    pub(crate) socket: SocketOptions,
}

/// The kinds this host runs; which one a manifest asks for is decided once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Native,
    #[cfg(feature = "exec")]
    Exec,
    /// Built from a git repository, then run as `Native`.
    RemoteGit,
    #[cfg(feature = "exec")]
    Process,
    #[cfg(feature = "exec")]
    Socket,
}

impl Kind {
    fn of(manifest: &Manifest, dir: &Path) -> Result<Kind> {
        let unsupported = |what: String| Error::Unsupported {
            plugin: manifest.name.clone(),
            path: dir.join(crate::manifest::MANIFEST_FILE),
            what,
        };
        match (&manifest.source, manifest.isolation) {
            #[cfg(feature = "exec")]
            (Source::LocalSo { .. }, Isolation::Process) => Ok(Kind::Process),
            #[cfg(not(feature = "exec"))]
            (Source::LocalSo { .. }, Isolation::Process) => Err(unsupported(
                "isolation \"process\" (this build of dynplug lacks its cargo feature \"exec\")"
                    .into(),
            )),
            (Source::LocalSo { .. }, _) => Ok(Kind::Native),
            (Source::RemoteGit { .. }, Isolation::Process) => {
                Err(unsupported("isolation \"process\"".into()))
            }
            (Source::RemoteGit { .. }, _) => Ok(Kind::RemoteGit),
            #[cfg(feature = "exec")]
            (Source::Exec { .. }, _) => Ok(Kind::Exec),
            #[cfg(not(feature = "exec"))]
            (Source::Exec { .. }, _) => Err(unsupported(
                "source.mode \"exec\" (this build of dynplug lacks its cargo feature \"exec\")"
                    .into(),
            )),
            #[cfg(feature = "exec")]
            (Source::Socket { .. }, _) => Ok(Kind::Socket),
            #[cfg(not(feature = "exec"))]
            (Source::Socket { .. }, _) => Err(unsupported(
                "source.mode \"socket\" (this build of dynplug lacks its cargo feature \"exec\")"
                    .into(),
            )),
        }
    }
}

fn compatible() -> String {
    format!(
        "compatible with this host's plugin ABI {}.{}",
        crate::ABI_VERSION.0,
        crate::ABI_VERSION.1
    )
}

impl Version {
    /// Loads what `manifest` asks for, from the plugin directory `dir`:
    /// checked, started and ready to serve.
    /// `seal` is checked against the artifact's bytes as they are read for
    /// the load, when the host checks signatures. With `defer`, a native
    /// plugin is only registered here and loaded by its first call (see
    /// `native::Deferred`).
    pub(crate) fn load(
        manifest: Manifest,
        seal: &Seal,
        dir: &Path,
        options: &LoadOptions,
        defer: Defer,
    ) -> Result<Version> {
        let plugin = manifest.name.as_str();
        let signature = options.trust.artifact_check(plugin, seal);
        let check = signature
            .as_ref()
            .map(|c| c as &crate::native::ArtifactCheck<'_>);
        let backend = match Kind::of(&manifest, dir)? {
            Kind::Native if defer != Defer::No => Backend::Deferred(Box::new(Deferred::new(
                &manifest,
                dir,
                &options.native,
                (&options.trust, seal),
                defer == Defer::AfterIdle,
            )?)),
            Kind::Native => {
                Backend::Native(NativeVersion::load(&manifest, dir, &options.native, check)?)
            }
            #[cfg(feature = "exec")]
            Kind::Exec => Backend::Exec(ExecVersion::load(&manifest, dir, &options.exec, check)?),
            Kind::RemoteGit => {
                // The signature covers the manifest (which pins `rev`):
                // the library is built here, so it has no signed digest.
                if options.trust.is_on() {
                    options.trust.check(plugin, seal, None)?;
                }
                let built = crate::build::build(&manifest, dir, &options.build)?;
                Backend::Native(NativeVersion::load(
                    &built.manifest,
                    &built.dir,
                    &options.native,
                    None,
                )?)
            }
            #[cfg(feature = "exec")]
            Kind::Process => Backend::Process(ProcessVersion::load(
                &manifest,
                dir,
                &options.native,
                &options.exec,
                &options.process,
                check,
            )?),
            #[cfg(feature = "exec")]
            Kind::Socket => Backend::Socket(SocketVersion::load(&manifest, dir, &options.socket)?),
        };
        // It borrows the manifest's name (an opaque type may need dropping).
        drop(signature);
        Ok(Version {
            manifest: Arc::new(manifest),
            backend,
            _files: None,
            files: None,
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Which version this is: distinct for every version of the process.
    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    /// Keeps the unpacked package the version was loaded from, if its kind
    /// runs from files; a native version runs from its own image and lets
    /// the copy go at once.
    pub(crate) fn keep_files(&mut self, unpacked: Option<crate::package::Unpacked>) {
        match &self.backend {
            Backend::Native(_) => drop(unpacked),
            // Its first call loads from the unpacked copy.
            Backend::Deferred(_) => self._files = unpacked,
            // A child process may run in the plugin's directory, also after
            // a restart.
            #[cfg(feature = "exec")]
            Backend::Exec(_) | Backend::Process(_) => self._files = unpacked,
            // Found plugins come from no files.
            #[cfg(feature = "exec")]
            Backend::Socket(_) => drop(unpacked),
        }
    }

    /// Checks a plugin as far as can be done without serving it (see
    /// [`crate::verify`]); says what was checked.
    pub(crate) fn verify(manifest: &Manifest, dir: &Path, options: &LoadOptions) -> Result<String> {
        match Kind::of(manifest, dir)? {
            #[cfg(feature = "exec")]
            Kind::Process => {
                crate::native::verify(manifest, dir, &options.native)?;
                let runner = crate::process::runner_path(options.process.runner.as_deref())
                    .map_or_else(
                        |why| format!("none found: {why}"),
                        |p| p.display().to_string(),
                    );
                Ok(format!(
                    "compatible with this host's plugin ABI {}.{}; runs in a child process (runner: {runner})",
                    crate::ABI_VERSION.0,
                    crate::ABI_VERSION.1
                ))
            }
            Kind::Native => {
                crate::native::verify(manifest, dir, &options.native)?;
                Ok(compatible())
            }
            #[cfg(feature = "exec")]
            Kind::Exec => crate::exec::verify(manifest, dir, &options.exec),
            Kind::RemoteGit => {
                let built = crate::build::build(manifest, dir, &options.build)?;
                crate::native::verify(&built.manifest, &built.dir, &options.native)?;
                Ok(format!("built from source, {}", compatible()))
            }
            #[cfg(feature = "exec")]
            Kind::Socket => crate::socket::verify(manifest, dir),
        }
    }

    /// Whether this call may run in place on the (async runtime) thread
    /// asking, now; `None` sends it down the async path.
    #[inline]
    pub(crate) fn in_place(&self, ctx: &Context) -> Option<InPlace<'_>> {
        match &self.backend {
            Backend::Native(native) => native.in_place(ctx).map(InPlace::Native),
            // Not loaded yet: the async path loads it off the runtime.
            Backend::Deferred(deferred) => deferred.version()?.in_place(ctx).map(InPlace::Native),
            #[cfg(feature = "exec")]
            Backend::Exec(_) | Backend::Process(_) | Backend::Socket(_) => None,
        }
    }

    /// Runs a call `in_place` allowed.
    pub(crate) fn run_in_place(&self, ctx: &mut Context, leave: InPlace<'_>) -> Result<()> {
        self.check_not_expired(ctx)?;
        ctx.begin_call();
        let outcome = match (&self.backend, leave) {
            (Backend::Native(native), InPlace::Native(leave)) => native.run_in_place(ctx, leave)?,
            (Backend::Deferred(deferred), InPlace::Native(leave)) => {
                deferred.load()?.run_in_place(ctx, leave)?
            }
            #[cfg(feature = "exec")]
            (Backend::Exec(_) | Backend::Process(_) | Backend::Socket(_), _) => {
                unreachable!("`in_place` gives no leave to exec, process and socket versions")
            }
        };
        self.settle(ctx, outcome)
    }

    pub(crate) fn name(&self) -> &str {
        &self.manifest.name
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        ctx.begin_call();
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute(ctx)?,
            Backend::Deferred(deferred) => deferred.load()?.execute(ctx)?,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.execute(ctx)?,
            #[cfg(feature = "exec")]
            Backend::Process(process) => process.execute(ctx)?,
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.execute(ctx)?,
        };
        self.settle(ctx, outcome)
    }

    /// The async path, for calls `in_place` did not take.
    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        ctx.begin_call();
        // The calls over a wire are boxed: their futures (a tonic or hyper
        // exchange) are kilobytes, and every caller's future would carry
        // that much and copy it, even for a native plugin called in place.
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute_async(ctx).await?,
            // The executor had it loaded off the runtime (`loaded_off_runtime`).
            Backend::Deferred(deferred) => deferred.load()?.execute_async(ctx).await?,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => Box::pin(exec.execute_async(ctx)).await?,
            #[cfg(feature = "exec")]
            Backend::Process(process) => Box::pin(process.execute_async(ctx)).await?,
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => Box::pin(socket.execute_async(ctx)).await?,
        };
        self.settle(ctx, outcome)
    }

    fn check_not_expired(&self, ctx: &Context) -> Result<()> {
        if ctx.is_expired() {
            return Err(Error::DeadlineExceeded {
                plugin: self.name().to_owned(),
                label: ctx.label().to_owned(),
            });
        }
        Ok(())
    }

    /// Turns an entry's outcome into the caller's result. An error returned by
    /// a plugin that saw its deadline pass or its call cancelled is reported
    /// as that, not as a plugin failure.
    fn settle(&self, ctx: &Context, outcome: Outcome) -> Result<()> {
        // The success path is the hot one: build names only for errors.
        let names = || (self.name().to_owned(), ctx.label().to_owned());
        match outcome {
            Outcome::Ok => Ok(()),
            Outcome::Panic(message) => {
                let (plugin, label) = names();
                Err(Error::Panic {
                    plugin,
                    label,
                    message,
                })
            }
            Outcome::Error(_) if ctx.is_expired() => {
                let (plugin, label) = names();
                Err(Error::DeadlineExceeded { plugin, label })
            }
            Outcome::Error(_)
                if ctx
                    .existing_cancel_token()
                    .is_some_and(|t| t.is_cancelled()) =>
            {
                let (plugin, label) = names();
                Err(Error::Cancelled { plugin, label })
            }
            Outcome::Error(message) => {
                let (plugin, label) = names();
                Err(Error::Plugin {
                    plugin,
                    label,
                    message,
                    code: None,
                    data: None,
                })
            }
        }
    }

    /// Ends the version (the caller has drained its calls).
    pub(crate) fn unload(&mut self) -> Ending {
        match &mut self.backend {
            Backend::Native(native) => native.unload(),
            Backend::Deferred(deferred) => deferred.unload(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.unload(),
            #[cfg(feature = "exec")]
            Backend::Process(process) => process.unload(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.unload(),
        }
    }

    /// Calls still running that no caller holds the version for (abandoned
    /// at a deadline); draining waits for them too.
    pub(crate) fn busy(&self) -> usize {
        match &self.backend {
            Backend::Native(native) => native.busy(),
            Backend::Deferred(deferred) => deferred.busy(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.busy(),
            #[cfg(feature = "exec")]
            Backend::Process(process) => process.busy(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.busy(),
        }
    }

    /// What the version runs from, as messages name it (the image, for
    /// native plugins).
    pub(crate) fn artifact(&self) -> String {
        match &self.backend {
            Backend::Native(native) => native.artifact(),
            Backend::Deferred(deferred) => deferred.artifact(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.artifact(),
            #[cfg(feature = "exec")]
            Backend::Process(process) => process.artifact(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.artifact(),
        }
    }

    /// The plugin's process, for kinds that run one.
    pub(crate) fn process(&self) -> Option<ProcessInfo> {
        match &self.backend {
            Backend::Native(_) | Backend::Deferred(_) => None,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => Some(exec.process()),
            #[cfg(feature = "exec")]
            Backend::Process(process) => Some(process.process()),
            #[cfg(feature = "exec")]
            Backend::Socket(_) => None,
        }
    }

    /// The plugin's socket, for kinds served by one dynplug did not start.
    pub(crate) fn socket(&self) -> Option<SocketInfo> {
        #[cfg(feature = "exec")]
        if let Backend::Socket(socket) = &self.backend {
            return Some(socket.info());
        }
        None
    }

    /// The state to show instead of `Loaded` while the version's process
    /// (or socket) is down.
    pub(crate) fn down_state(&self) -> Option<PluginState> {
        match &self.backend {
            Backend::Native(_) => None,
            Backend::Deferred(deferred) if deferred.is_pending() => Some(PluginState::Deferred),
            Backend::Deferred(deferred) => deferred.error().map(|_| PluginState::Failed),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.down_state(),
            #[cfg(feature = "exec")]
            Backend::Process(process) => process.down_state(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.down_state(),
        }
    }

    /// Whether a call would load the version first: a deferred version no
    /// call has loaded yet.
    #[inline]
    pub(crate) fn needs_loading(&self) -> bool {
        matches!(&self.backend, Backend::Deferred(deferred) if deferred.is_pending())
    }

    /// Whether unloading this version now and loading it again on its next
    /// call gives memory back: a loaded native version whose unload unmaps
    /// its code (see `Builder::unload_idle_after`). Not one built from a
    /// `remote_git` source: registering it again would fetch and build.
    pub(crate) fn may_idle_out(&self) -> bool {
        if !matches!(self.manifest.source, Source::LocalSo { .. }) {
            return false;
        }
        let native = match &self.backend {
            Backend::Native(native) => native,
            Backend::Deferred(deferred) => match deferred.version() {
                Some(native) => native,
                None => return false,
            },
            #[cfg(feature = "exec")]
            Backend::Exec(_) | Backend::Process(_) | Backend::Socket(_) => return false,
        };
        native.unloads_fully()
    }

    /// Whether this is a deferred version that has never been loaded: no
    /// call came yet, or the first load failed (a version replacing an idle
    /// one was loaded before).
    pub(crate) fn awaits_first_load(&self) -> bool {
        matches!(&self.backend, Backend::Deferred(deferred)
            if deferred.version().is_none() && !deferred.is_proven())
    }

    /// Whether this is the deferred version a first-load hook was told of.
    pub(crate) fn is_deferred(&self, which: usize) -> bool {
        matches!(&self.backend, Backend::Deferred(deferred) if deferred.is(which))
    }

    /// Whether this is a version never loaded whose library file is no
    /// longer the one registered (an upgrade replaced it in place): it
    /// could never load.
    ///
    /// A load under way is left to finish: it may have opened the old file
    /// before it was replaced (and fails with its own cause otherwise).
    pub(crate) fn lost_its_file(&self) -> bool {
        self.awaits_first_load()
            && matches!(&self.backend, Backend::Deferred(deferred)
                if (!deferred.load_claimed() || deferred.error().is_some())
                    && !deferred.file_still_there())
    }

    /// Whether this version replaced an idle one and failed to load again:
    /// the idle thread tries again with a new one.
    pub(crate) fn failed_after_idle(&self) -> bool {
        matches!(&self.backend, Backend::Deferred(deferred)
            if deferred.is_proven() && deferred.error().is_some())
    }

    /// Returns once a deferred version no call has loaded yet is loaded
    /// (or failed to), having the load done on a thread of its own: a load
    /// takes about a millisecond and its `init` up to `init_timeout`, too
    /// long for an async runtime's worker. Callers arriving meanwhile wait
    /// for the same load. The thread holds the version, so draining waits
    /// for the load.
    pub(crate) async fn loaded_off_runtime(self: &Arc<Self>) {
        if let Some(deferred) = self.load_on_own_thread() {
            deferred.loaded().await;
        }
    }

    /// The blocking [`loaded_off_runtime`](Self::loaded_off_runtime), for a
    /// blocking call: it waits for the load at most until `deadline`
    /// (`false`: the deadline passed first; the load goes on for the next
    /// calls). The load never runs on the caller's thread, where the
    /// library's constructors could leave thread-locals behind.
    pub(crate) fn loaded_within(self: &Arc<Self>, deadline: Option<Instant>) -> bool {
        self.load_on_own_thread()
            .is_none_or(|deferred| deferred.wait_until(deadline))
    }

    /// Has the first caller to ask start the load of a deferred version on
    /// a `dynplug-load` thread (holding the version, so draining waits for
    /// the load); the version to wait on.
    fn load_on_own_thread(self: &Arc<Self>) -> Option<&Deferred> {
        let Backend::Deferred(deferred) = &self.backend else {
            return None;
        };
        if deferred.claim_load() {
            let version = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("dynplug-load".into())
                .spawn(move || version.load_deferred());
            if let Err(e) = spawned {
                // Never on the caller's thread (perhaps a runtime worker).
                deferred.cannot_load(&e);
            }
        }
        Some(deferred)
    }

    fn load_deferred(&self) {
        if let Backend::Deferred(deferred) = &self.backend {
            deferred.load_and_wake();
        }
    }

    /// Why a deferred version failed to load on its first call.
    pub(crate) fn load_error(&self) -> Option<&str> {
        match &self.backend {
            Backend::Deferred(deferred) => deferred.error(),
            _ => None,
        }
    }
}
