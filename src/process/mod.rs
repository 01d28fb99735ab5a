//! `isolation: "process"`: a native plugin (the same `cdylib`) run in a
//! child process, crash-contained, supervised, and called over a lean
//! framed protocol on a Unix socket.
//!
//! Load sequence (see `docs/internals.md` §13d): the host reads the library
//! once and checks it as a native load would (checksum, header, before any
//! of its code runs) → writes the load (manifest, settings, those bytes)
//! into a sealed memfd (`spec.rs`) → starts a runner (`runner.rs`: the
//! `dynplug` binary, see [`runner_path`]) with the memfd as its standard
//! input, in its own process group with a parent-death signal, exactly as
//! exec plugins start (`exec/child.rs`) → the runner sets its limits
//! (`limits.rs`), loads the bytes with the native loader (checksum, header,
//! image, `dlopen`, layout, `init`) and binds its socket → the host's Ping
//! gets a Pong → serve. Supervision (restarts, backoff, crash loop, stop)
//! is the exec kind's (`exec/supervisor.rs`); calls go through `conns.rs`,
//! whose frames `wire.rs` defines; `crash.rs` says how a process died.

mod conns;
mod crash;
mod limits;
pub(crate) mod runner;
mod spec;
mod wire;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use conns::Conns;
use conns::Failed;

use crate::error::{Error, Result};
use crate::exec::child::Launch;
use crate::exec::settings::Settings;
use crate::exec::supervisor::{Failure, Shared};
use crate::exec::{ExecOptions, ExecVersion};
use crate::manifest::{Limits, Manifest};
use crate::native::NativeOptions;
use crate::slot::ProcessInfo;
use crate::version::{Ending, Outcome};
use crate::{Context, PluginState};

/// The environment variable naming the runner when no
/// [`Builder::process_runner`](crate::Builder::process_runner) is set.
pub const RUNNER_ENV: &str = "DYNPLUG_RUNNER";

/// Settings the manager passes to every process load.
#[derive(Debug, Clone)]
pub(crate) struct ProcessOptions {
    /// The runner set on the builder.
    pub(crate) runner: Option<PathBuf>,
    pub(crate) grace: Duration,
    /// The first restart delay after the immediate one, and the longest.
    pub(crate) backoff: (Duration, Duration),
}

pub(crate) struct ProcessVersion {
    core: ExecVersion,
    library: PathBuf,
    limits: Limits,
    grace: Duration,
}

impl ProcessVersion {
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        native: &NativeOptions,
        exec: &ExecOptions,
        options: &ProcessOptions,
        check: Option<&crate::native::ArtifactCheck<'_>>,
    ) -> Result<ProcessVersion> {
        let plugin: Arc<str> = Arc::from(manifest.name.as_str());
        // Everything a native load checks before running plugin code (the
        // signature too), so a bad library is refused here, with the
        // native errors, and the runner gets exactly the checked bytes.
        let (library, bytes) = crate::native::read_checked(manifest, dir, native, check)?;
        let runner = runner_path(options.runner.as_deref()).map_err(|reason| Error::Start {
            plugin: plugin.to_string(),
            path: library.clone(),
            reason,
            stderr: Vec::new(),
        })?;
        let io = |action, path: &Path| {
            let plugin = plugin.to_string();
            let path = path.to_owned();
            move |source| Error::Io {
                plugin,
                action,
                path,
                source,
            }
        };
        let limits = manifest.limits.clone().unwrap_or_default();
        let spec = spec::Spec {
            wire: wire::VERSION,
            abi: crate::ABI_VERSION,
            manifest: manifest.clone(),
            dir: dir.to_owned(),
            shadow_dir: native.shadow_dir.clone(),
            max_library_size: native.max_library_size,
            init_timeout_ms: millis(native.init_timeout),
            shutdown_timeout_ms: millis(native.shutdown_timeout),
            limits: limits.clone(),
        };
        let load = seal(&spec, &bytes).map_err(io("preparing the load of", &library))?;
        drop(bytes);
        crate::private_dir::ensure(&exec.work_dir, false).map_err(|e| Error::Insecure {
            plugin: plugin.to_string(),
            path: exec.work_dir.clone(),
            reason: e.to_string(),
        })?;
        // The runner's start includes the plugin's `init`; its stop, the
        // plugin's `shutdown`.
        let settings = Settings::process(
            native.init_timeout + Duration::from_secs(10),
            native.shutdown_timeout + Duration::from_secs(1),
            options.backoff,
        );
        let (address, socket) = crate::exec::address(&plugin, &settings, &exec.work_dir)
            .map_err(io("choosing an address for", &library))?;
        let launch = Launch {
            plugin: Arc::clone(&plugin),
            program: runner.clone(),
            arg0: runner,
            args: vec![runner::ARG.into(), OsString::from("--socket"), socket],
            dir: dir.to_owned(),
            stdin: Some(Arc::new(load)),
            // A crash's cause is then the last lines on its stderr, not
            // buried under a backtrace (the log keeps 50 lines).
            env: vec![("RUST_BACKTRACE".into(), "0".into())],
        };
        let shared = Arc::new(Shared::new(
            Arc::clone(&plugin),
            manifest.version.to_string(),
            settings,
            launch,
            address,
            Arc::clone(&exec.host_name),
            exec.events.clone(),
        ));
        let core = ExecVersion::supervised(shared, None)
            .map_err(|failure| start_error(&plugin, &library, failure))?;
        Ok(ProcessVersion {
            core,
            library,
            limits,
            grace: options.grace,
        })
    }

    fn shared(&self) -> &Shared {
        self.core.shared()
    }

    /// The connections to the running process, or why there is none.
    fn conns(&self) -> Result<(Arc<crate::remote::link::Link>, Arc<Conns>)> {
        let shared = self.shared();
        let link = shared.link.load_full().ok_or_else(|| Error::Unavailable {
            plugin: shared.plugin.to_string(),
            reason: shared.why_down(),
        })?;
        let conns = Arc::clone(link.process().expect("a runner's link"));
        Ok((link, conns))
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        if let Some(not_started) = not_started(ctx) {
            return Ok(not_started);
        }
        let mut retried = false;
        loop {
            let (link, conns) = self.conns()?;
            match conns.call(ctx, self.grace) {
                Err(Failed::Connect(_)) if !retried && self.replaced(&link) => retried = true,
                result => return self.settle(ctx, result),
            }
        }
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<Outcome> {
        if let Some(not_started) = not_started(ctx) {
            return Ok(not_started);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            // Another executor: the exec runtime carries the call, and
            // dropping this future aborts it (the watchdog takes over).
            let (_, conns) = self.conns()?;
            let grace = self.grace;
            let mut owned = std::mem::take(ctx);
            let task = crate::remote::runtime::handle().spawn(async move {
                let result = conns.call_async(&mut owned, grace).await;
                (result, owned)
            });
            let (result, back) = task.await.map_err(|_| Error::Unavailable {
                plugin: self.shared().plugin.to_string(),
                reason: "the call's task ended".into(),
            })?;
            *ctx = back;
            return self.settle(ctx, result);
        }
        let mut retried = false;
        loop {
            let (link, conns) = self.conns()?;
            match conns.call_async(ctx, self.grace).await {
                Err(Failed::Connect(_)) if !retried && self.replaced(&link) => retried = true,
                result => return self.settle(ctx, result),
            }
        }
    }

    /// Whether another process serves by now than the one `link` leads to.
    fn replaced(&self, link: &Arc<crate::remote::link::Link>) -> bool {
        self.shared()
            .link
            .load()
            .as_ref()
            .is_some_and(|now| !Arc::ptr_eq(now, link))
    }

    fn settle(
        &self,
        ctx: &Context,
        result: std::result::Result<(u8, String), Failed>,
    ) -> Result<Outcome> {
        let plugin = || self.shared().plugin.to_string();
        let label = || ctx.label().to_owned();
        match result {
            Ok((wire::status::OK, _)) => Ok(Outcome::Ok),
            Ok((wire::status::PANIC, message)) => Ok(Outcome::Panic(message)),
            Ok((_, message)) => Ok(Outcome::Error(message)),
            Err(Failed::Deadline) => Err(Error::DeadlineExceeded {
                plugin: plugin(),
                label: label(),
            }),
            Err(Failed::Connect(why)) => Err(Error::Unavailable {
                plugin: plugin(),
                reason: format!("cannot connect to its process: {why}"),
            }),
            Err(Failed::Bad(message)) => Err(Error::BadReply {
                plugin: plugin(),
                label: label(),
                message,
            }),
            Err(Failed::Lost { how, stderr }) => {
                let mut reason = how;
                if let Some(why) = limits::explain(&self.limits, &reason, stderr.as_deref()) {
                    reason = format!("{reason}: {why}");
                }
                if let Some(line) = stderr {
                    reason.push_str(&format!("; last line on stderr: «{line}»"));
                }
                reason.push_str("; it is being restarted");
                Err(Error::Crashed {
                    plugin: plugin(),
                    label: label(),
                    reason,
                })
            }
        }
    }

    /// Calls whose caller stopped waiting belong to watchdogs, which hold
    /// no part of the version.
    pub(crate) fn busy(&self) -> usize {
        0
    }

    pub(crate) fn artifact(&self) -> String {
        self.library.display().to_string()
    }

    pub(crate) fn process(&self) -> ProcessInfo {
        self.core.process()
    }

    pub(crate) fn down_state(&self) -> Option<PluginState> {
        self.core.down_state()
    }

    /// Stops the runner (SIGTERM: it runs the plugin's `shutdown` and
    /// exits; SIGKILL after the grace), reaped.
    pub(crate) fn unload(&mut self) -> Ending {
        self.core.unload()
    }
}

/// A call cancelled before it began is not sent, as a `pooled` worker does
/// not start one (the caller gets `Cancelled`).
fn not_started(ctx: &Context) -> Option<Outcome> {
    ctx.existing_cancel_token()
        .is_some_and(crate::CancelToken::is_cancelled)
        .then(|| Outcome::Error("not started: the call was cancelled".into()))
}

/// A failed start, in the words of the step that failed: the runner's
/// exit status says whether it was the plugin's `init`.
fn start_error(plugin: &str, library: &Path, failure: Failure) -> Error {
    let init_failed = format!("exited with status {}", runner::EXIT_INIT);
    if failure.reason.starts_with(&init_failed)
        && let Some(line) = failure.stderr.last()
    {
        let message = line
            .strip_prefix("dynplug runner: ")
            .unwrap_or(line)
            .strip_prefix(&format!("{plugin}: init failed: "))
            .unwrap_or(line);
        return Error::Init {
            plugin: plugin.to_owned(),
            message: message.to_owned(),
        };
    }
    Error::Start {
        plugin: plugin.to_owned(),
        path: library.to_owned(),
        reason: failure.reason,
        stderr: failure.stderr,
    }
}

#[cfg(target_os = "linux")]
fn seal(spec: &spec::Spec, bytes: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    spec::seal(spec, bytes)
}

#[cfg(not(target_os = "linux"))]
fn seal(_spec: &spec::Spec, _bytes: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    Err(std::io::Error::other(
        "isolation \"process\" needs Linux (memfds, the parent-death signal)",
    ))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The runner a host uses: `configured` (the builder's), else
/// [`RUNNER_ENV`], else a `dynplug` executable beside the running program
/// or in the directory above it (where cargo puts binaries, from its tests
/// and examples). The program itself counts when it is `dynplug`.
pub(crate) fn runner_path(configured: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let usable = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let chosen = configured
        .map(|p| (p.to_owned(), "Builder::process_runner"))
        .or_else(|| std::env::var_os(RUNNER_ENV).map(|p| (PathBuf::from(p), RUNNER_ENV)));
    if let Some((path, from)) = chosen {
        return if usable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "the process runner {} (from {from}) is not an executable file",
                path.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut looked = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("dynplug");
        if usable(&candidate) {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    Err(format!(
        "no process runner: isolation \"process\" runs the plugin in a `dynplug` binary; \
         install one (cargo install dynplug) and set Builder::process_runner or {RUNNER_ENV} \
         to it (looked for {})",
        looked.join(" and ")
    ))
}
