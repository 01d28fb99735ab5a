//! Exec plugins (`source.mode = "exec"`): a separate program, started and
//! supervised by the host, called over the goplugin REST or gRPC protocol.
//!
//! Load sequence (see `docs/exec-plugins.md` and `docs/internals.md`):
//! check the executable and copy exactly the checked bytes into a private
//! directory (`artifact.rs`) → start the copy in its own process group,
//! with a parent-death signal, from a thread that waits for it
//! (`child.rs`) → poll Ping until it answers (`supervisor.rs`) → serve.
//! Calls go through a `Link` to the running process (`crate::remote`,
//! shared with socket plugins); a supervisor task restarts a process that
//! exits or stops answering health pings. Unload: SIGTERM to the group, a
//! grace period, SIGKILL, reaped, copy and socket removed.

mod artifact;
pub(crate) mod child;
pub(crate) mod logs;
mod parent_death;
pub(crate) mod settings;
pub(crate) mod supervisor;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::Context;
use crate::error::{Error, Result};
use crate::event::EventSink;
use crate::manifest::{Listen, Manifest};
use crate::remote::call;
use crate::remote::link::Address;
use crate::remote::runtime;
use crate::slot::ProcessInfo;
use crate::version::{Ending, Outcome};
use artifact::Executable;
use settings::Settings;
use supervisor::{Phase, Shared};

/// Settings the manager passes to every exec load.
#[derive(Debug, Clone)]
pub(crate) struct ExecOptions {
    /// Private directory of the copies and Unix sockets.
    pub(crate) work_dir: PathBuf,
    /// The largest executable read.
    pub(crate) max_size: u64,
    /// What the goplugin `X-Host` header says.
    pub(crate) host_name: Arc<str>,
    pub(crate) events: EventSink,
}

/// The longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;

pub(crate) struct ExecVersion {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    executable: Option<Executable>,
    ending: Option<Ending>,
}

impl ExecVersion {
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        options: &ExecOptions,
        check: Option<&crate::native::ArtifactCheck<'_>>,
    ) -> Result<ExecVersion> {
        let plugin: Arc<str> = Arc::from(manifest.name.as_str());
        let settings =
            Settings::of(manifest).expect("Version::load sends only exec manifests here");
        let checked = artifact::check(manifest, dir, options.max_size, check)?;
        let executable = artifact::install(checked, &plugin, &options.work_dir)?;
        let (address, arg) =
            address(&plugin, &settings, &options.work_dir).map_err(|source| Error::Io {
                plugin: plugin.to_string(),
                action: "choosing an address for",
                path: executable.original.clone(),
                source,
            })?;
        let mut args: Vec<OsString> = settings.args.iter().map(OsString::from).collect();
        args.push(settings.flag.clone().into());
        args.push(arg);
        let launch = child::Launch {
            plugin: Arc::clone(&plugin),
            program: executable.copy.clone(),
            arg0: executable.original.clone(),
            args,
            dir: dir.to_owned(),
            stdin: None,
            env: Vec::new(),
        };
        let shared = Arc::new(Shared::new(
            Arc::clone(&plugin),
            manifest.version.to_string(),
            settings,
            launch,
            address,
            Arc::clone(&options.host_name),
            options.events.clone(),
        ));
        let original = executable.original.clone();
        ExecVersion::supervised(shared, Some(executable)).map_err(|failure| Error::Start {
            plugin: plugin.to_string(),
            path: original,
            reason: failure.reason,
            stderr: failure.stderr,
        })
    }

    /// Starts the first process of `shared` (ready: it answered Ping) and
    /// the task that supervises it. The exec kind and the `process`
    /// isolation of native plugins both start this way.
    pub(crate) fn supervised(
        shared: Arc<Shared>,
        executable: Option<Executable>,
    ) -> std::result::Result<ExecVersion, supervisor::Failure> {
        let starting = Arc::clone(&shared);
        let first = runtime::block(async move { starting.start().await })?;
        tracing::debug!(plugin = %shared.plugin, pid = first.0.pid, address = %shared.address, "ready");
        shared.serve(&first.0, &first.1);
        let (stop, stopped) = watch::channel(false);
        let supervisor =
            runtime::handle().spawn(supervisor::supervise(Arc::clone(&shared), first, stopped));
        Ok(ExecVersion {
            shared,
            stop,
            supervisor: Some(supervisor),
            executable,
            ending: None,
        })
    }

    /// What the version's calls and its supervisor share.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        call::execute(&self.shared, ctx)
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<Outcome> {
        call::execute_async(&self.shared, ctx).await
    }

    /// Calls whose caller stopped waiting never go on here (their request
    /// is aborted), so there is nothing to wait for beyond the callers.
    pub(crate) fn busy(&self) -> usize {
        0
    }

    pub(crate) fn artifact(&self) -> String {
        self.executable
            .as_ref()
            .map(|e| e.original.display().to_string())
            .unwrap_or_default()
    }

    pub(crate) fn process(&self) -> ProcessInfo {
        let status = self.shared.status();
        ProcessInfo {
            pid: status.pid,
            address: self.shared.address.to_string(),
            protocol: self.shared.settings.wire.as_str().to_owned(),
            rss_bytes: status.pid.and_then(resident_bytes),
            restarts: status.restarts,
            crashes_in_row: status.crashes_in_row,
            last_exit: status.last_exit.clone(),
            logs: self.shared.logs.last(),
        }
    }

    /// The state to show while the process is down.
    pub(crate) fn down_state(&self) -> Option<crate::PluginState> {
        match self.shared.status().phase {
            Phase::Restarting => Some(crate::PluginState::Restarting),
            Phase::CrashLoop => Some(crate::PluginState::CrashLoop),
            Phase::Running | Phase::Stopped => None,
        }
    }

    /// Stops the process (SIGTERM, grace, SIGKILL, reaped) and removes the
    /// copy and the socket. The caller has drained the calls.
    pub(crate) fn unload(&mut self) -> Ending {
        if let Some(ending) = &self.ending {
            return ending.clone();
        }
        let _ = self.stop.send(true);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = runtime::block(supervisor);
        }
        self.clean_up();
        self.ending = Some(Ending::Unloaded);
        Ending::Unloaded
    }

    fn clean_up(&mut self) {
        self.executable.take();
        if let Address::Unix(path, _) = &self.shared.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ExecVersion {
    fn drop(&mut self) {
        if self.ending.is_some() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.unload();
            return;
        }
        // On a runtime's thread: do not block it for the grace period. The
        // supervisor stops the process; the copy and socket go when it has.
        let _ = self.stop.send(true);
        let supervisor = self.supervisor.take();
        let executable = self.executable.take();
        let socket = match &self.shared.address {
            Address::Unix(path, _) => Some(path.clone()),
            Address::Tcp(_) => None,
        };
        runtime::handle().spawn(async move {
            if let Some(supervisor) = supervisor {
                let _ = supervisor.await;
            }
            drop(executable);
            if let Some(socket) = socket {
                let _ = std::fs::remove_file(socket);
            }
        });
    }
}

/// The resident memory of process `pid` (`/proc/<pid>/statm`).
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// The address of a version's processes, and the flag's argument.
pub(crate) fn address(
    plugin: &str,
    settings: &Settings,
    work_dir: &Path,
) -> std::io::Result<(Address, OsString)> {
    match settings.listen {
        Listen::Unix => {
            let mut path = work_dir.join(artifact::private_name(plugin, ".sock"));
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                // A deep plugins directory: the socket goes to a private
                // directory of the temporary directory instead.
                let uid = rustix::process::geteuid().as_raw();
                let dir = std::env::temp_dir().join(format!("dynplug-{uid}"));
                crate::private_dir::ensure(&dir, false)?;
                path = dir.join(artifact::private_name(plugin, ".sock"));
            }
            Ok((Address::Unix(path.clone(), None), path.into_os_string()))
        }
        _ => {
            // A free port now; another process could take it before the
            // plugin binds it (goplugin has the same window): the start
            // then fails and is retried like a crash.
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            let addr = probe.local_addr()?;
            Ok((Address::Tcp(addr), addr.port().to_string().into()))
        }
    }
}

impl call::Remote for Shared {
    fn plugin(&self) -> &str {
        &self.plugin
    }

    fn link(&self) -> &arc_swap::ArcSwapOption<crate::remote::link::Link> {
        &self.link
    }

    fn noun(&self) -> &'static str {
        "its process"
    }

    fn why_down(&self) -> String {
        Shared::why_down(self)
    }
    // A failed connect needs no nudge: the supervisor sees the process exit.
}

/// Checks an exec plugin without starting it: the manifest's settings, the
/// executable (regular, executable, size), its checksums, and what it is.
pub(crate) fn verify(manifest: &Manifest, dir: &Path, options: &ExecOptions) -> Result<String> {
    let checked = artifact::check(manifest, dir, options.max_size, None)?;
    Ok(format!(
        "{}: {}; not started (readiness is checked at load)",
        checked.path.display(),
        checked.what
    ))
}

/// Removes copies and sockets left by processes that are gone.
pub(crate) fn remove_stale(work_dir: &Path) {
    artifact::remove_stale(work_dir);
}
