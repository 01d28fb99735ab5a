//! One process of an exec plugin: spawned in its own process group, killed
//! with its parent, reaped, and stopped with SIGTERM then SIGKILL.
//!
//! Each process has a thread of its own that spawns it and then waits for
//! it. Linux sends the parent-death signal when the *thread* that forked
//! the child exits, so that thread must outlive the child; waiting is all
//! it does, and it is also what reaps the child, so there are no zombies.
//! The thread sees the exit without reaping first (`waitid` with
//! `WNOWAIT`): while the child is an unreaped zombie its pid, and so its
//! group id, cannot be reused, so signals sent to the group before the
//! reap can never reach a stranger. It then kills what is left of the
//! group (grandchildren) and reaps.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::sync::watch;

use super::logs::{Logs, Stream};

/// How to start the plugin's process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) plugin: Arc<str>,
    /// The private copy.
    pub(crate) program: PathBuf,
    /// What the process sees as its name: the file the manifest names.
    pub(crate) arg0: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// The plugin directory.
    pub(crate) dir: PathBuf,
    /// Its standard input (a `process` plugin's load); none: `/dev/null`.
    pub(crate) stdin: Option<Arc<OwnedFd>>,
    /// Environment variables set for it, beyond the host's.
    pub(crate) env: Vec<(OsString, OsString)>,
}

/// A running (or exited, not yet observed) process.
pub(crate) struct Child {
    pub(crate) pid: u32,
    pub(crate) started: Instant,
    /// `true` once reaped: the group may no longer be signalled.
    reaped: Arc<Mutex<bool>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    stderr: Option<tokio::task::JoinHandle<()>>,
    /// Why the host killed it, when it did (said with its exit).
    note: Arc<Mutex<Option<String>>>,
}

/// What calls keep of a running process: its pid, its exit, and the
/// right to kill it (saying why) while it is not reaped.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) pid: u32,
    reaped: Arc<Mutex<bool>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    note: Arc<Mutex<Option<String>>>,
}

impl Handle {
    /// SIGKILL to the process group, unless it was reaped; `why` is said
    /// with its exit.
    pub(crate) fn kill(&self, why: String) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if *reaped {
            return;
        }
        self.note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        if let Some(pid) = Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }

    /// Its exit, once it exited (and was reaped), waiting at most `limit`.
    pub(crate) async fn exit_within(&self, limit: Duration) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let wait = exit.wait_for(Option::is_some);
        crate::timer::within(Some(Instant::now() + limit), wait)
            .await
            .and_then(|status| status.ok().and_then(|s| *s))
    }

    /// How it ended, as [`Child::explain`] says it.
    pub(crate) fn explain(&self, status: ExitStatus) -> String {
        explain(status, &self.note)
    }
}

/// A spawn refused with ETXTBSY is retried this many times: another
/// thread's fork may hold a copy of a descriptor on the executable for the
/// moment between its fork and its exec.
const TEXT_BUSY_RETRIES: u32 = 20;

impl Child {
    /// Starts the process on a thread of its own; its output goes to `logs`.
    pub(crate) fn spawn(launch: &Launch, logs: &Arc<Logs>) -> io::Result<Child> {
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let (exit_tx, exit) = watch::channel(None);
        let reaped = Arc::new(Mutex::new(false));
        let plugin = Arc::clone(&launch.plugin);
        let launch = launch.clone();
        let reaping = Arc::clone(&reaped);
        std::thread::Builder::new()
            .name(format!("dynplug-child-{plugin}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut child = match spawn_retrying(&launch) {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let pid = child.id();
                let pipes = (child.stdout.take(), child.stderr.take());
                let _ = started_tx.send(Ok((pid, pipes)));
                let status = wait(&mut child, &reaping);
                let _ = exit_tx.send(Some(status));
            })?;
        let (pid, (stdout, stderr)) = started_rx
            .recv()
            .map_err(|_| io::Error::other("the spawning thread ended without a word"))??;
        let follow = |pipe: Option<OwnedPipe>, stream| {
            pipe.and_then(|pipe| {
                super::logs::follow(
                    pipe.into(),
                    stream,
                    Arc::clone(&plugin),
                    pid,
                    Arc::clone(logs),
                )
                .ok()
            })
        };
        follow(stdout.map(OwnedPipe::Out), Stream::Stdout);
        let stderr = follow(stderr.map(OwnedPipe::Err), Stream::Stderr);
        Ok(Child {
            pid,
            started: Instant::now(),
            reaped,
            exit,
            stderr,
            note: Arc::default(),
        })
    }

    /// A handle for calls: the pid, the exit, and killing.
    pub(crate) fn handle(&self) -> Handle {
        Handle {
            pid: self.pid,
            reaped: Arc::clone(&self.reaped),
            exit: self.exit.clone(),
            note: Arc::clone(&self.note),
        }
    }

    /// How it ended, with why the host killed it if it did.
    pub(crate) fn explain(&self, status: ExitStatus) -> String {
        explain(status, &self.note)
    }

    /// Sends `signal` to the process group, unless the process was reaped.
    pub(crate) fn signal(&self, signal: Signal) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped && let Some(pid) = Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pid, signal);
        }
    }

    /// The exit status, once the process has exited and been reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Resolves when the process has exited and been reaped.
    pub(crate) async fn exited(&self) -> ExitStatus {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(status) => status.expect("waited for Some"),
            // The waiting thread is gone without a status: it cannot
            // happen short of a panic there; report a kill.
            Err(_) => ExitStatus::from_raw(libc::SIGKILL),
        }
    }

    /// Waits (at most `limit`) until everything the process wrote to
    /// stderr has been read, so that an error can quote its last lines.
    pub(crate) async fn stderr_read(&mut self, limit: Duration) {
        if let Some(task) = self.stderr.as_mut() {
            let _ = tokio::time::timeout(limit, task).await;
        }
    }

    /// SIGTERM to the group, `grace` to exit, then SIGKILL; returns once
    /// the process is reaped.
    pub(crate) async fn stop(&self, grace: Duration) -> ExitStatus {
        if let Some(status) = self.status() {
            return status;
        }
        self.signal(Signal::TERM);
        if let Ok(status) = tokio::time::timeout(grace, self.exited()).await {
            return status;
        }
        self.signal(Signal::KILL);
        self.exited().await
    }
}

/// A pipe of the child, to be read by `logs`.
enum OwnedPipe {
    Out(std::process::ChildStdout),
    Err(std::process::ChildStderr),
}

impl From<OwnedPipe> for std::os::fd::OwnedFd {
    fn from(pipe: OwnedPipe) -> Self {
        match pipe {
            OwnedPipe::Out(p) => p.into(),
            OwnedPipe::Err(p) => p.into(),
        }
    }
}

fn spawn_retrying(launch: &Launch) -> io::Result<std::process::Child> {
    let mut command = Command::new(&launch.program);
    command
        .arg0(&launch.arg0)
        .args(&launch.args)
        .current_dir(&launch.dir)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(match &launch.stdin {
            Some(fd) => Stdio::from(fd.try_clone()?),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: stop signals reach what it starts, and a
        // terminal's Ctrl-C reaches the host only, which stops it in order.
        .process_group(0);
    super::parent_death::kill_with_parent(&mut command);
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < TEXT_BUSY_RETRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(u64::from(tries)));
            }
            result => return result,
        }
    }
}

/// Waits for the child's exit without reaping it, kills the rest of its
/// group, then reaps it (see the module docs).
fn wait(child: &mut std::process::Child, reaped: &Mutex<bool>) -> ExitStatus {
    use rustix::process::{WaitIdOptions, waitid};
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        // EINTR: wait again; anything else (ECHILD cannot happen: the child
        // is ours and unreaped) falls through to the reap.
        while let Err(rustix::io::Errno::INTR) = waitid(
            rustix::process::WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {}
        let mut reaped = reaped.lock().unwrap_or_else(|e| e.into_inner());
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        let status = child.wait();
        *reaped = true;
        return status.unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
    }
    child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
}

fn explain(status: ExitStatus, note: &Mutex<Option<String>>) -> String {
    let described = describe(status);
    match note.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(why) => format!("{described} ({why})"),
        None => described,
    }
}

/// How an exit reads in messages: `exit status 3`, `killed by SIGKILL`.
pub(crate) fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(signal) => format!("killed by {}", signal_name(signal)),
        None => status.to_string(),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}
