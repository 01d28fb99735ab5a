//! Keeping an exec plugin's process up: readiness, health pings, restarts
//! with backoff, the crash-loop state, and the stop sequence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use super::child::{self, Child, Launch};
use super::logs::Logs;
use super::settings::Settings;
use crate::event::{Event, EventSink};
use crate::remote::link::{Address, CallError, Link, Wire};

/// Crashes in a row, each within `STABLE` of its start, that make a crash loop.
const CRASH_LOOP_AFTER: u32 = 5;
/// A process that ran this long ends a row of crashes: its next crash
/// restarts it at once again.
const STABLE: Duration = Duration::from_secs(10);
/// Readiness polls: the first pause, and the longest. A Rust plugin binds
/// its socket within a few milliseconds of its start.
const FIRST_POLL: Duration = Duration::from_millis(1);
const LONGEST_POLL: Duration = Duration::from_millis(20);
/// How long a process's stderr is read after it exits early, for the error.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// Lines of stderr quoted in a start error.
const QUOTED_LINES: usize = 10;

/// Where the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Restarting,
    CrashLoop,
    Stopped,
}

#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) pid: Option<u32>,
    pub(crate) restarts: u64,
    pub(crate) crashes_in_row: u32,
    pub(crate) last_exit: Option<String>,
    pub(crate) next_attempt: Option<Instant>,
}

/// What the version, its calls and its supervisor share.
pub(crate) struct Shared {
    pub(crate) plugin: Arc<str>,
    pub(crate) version: String,
    pub(crate) settings: Settings,
    pub(crate) launch: Launch,
    pub(crate) address: Address,
    pub(crate) host: Arc<str>,
    /// The way to the running process; `None` while it is down.
    pub(crate) link: ArcSwapOption<Link>,
    pub(crate) logs: Arc<Logs>,
    pub(crate) status: Mutex<Status>,
    pub(crate) events: EventSink,
}

/// Why a process could not be started.
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) stderr: Vec<String>,
}

impl Shared {
    /// A version's shared state, before its first process starts.
    pub(crate) fn new(
        plugin: Arc<str>,
        version: String,
        settings: Settings,
        launch: Launch,
        address: Address,
        host: Arc<str>,
        events: EventSink,
    ) -> Shared {
        Shared {
            plugin,
            version,
            settings,
            launch,
            address,
            host,
            link: ArcSwapOption::empty(),
            logs: Arc::default(),
            status: Mutex::new(Status {
                phase: Phase::Restarting,
                pid: None,
                restarts: 0,
                crashes_in_row: 0,
                last_exit: None,
                next_attempt: None,
            }),
            events,
        }
    }

    pub(crate) fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why calls fail now, for `Error::Unavailable`.
    pub(crate) fn why_down(&self) -> String {
        let status = self.status();
        let after = status
            .last_exit
            .as_deref()
            .map(|exit| format!(" after its process {exit}"))
            .unwrap_or_default();
        let next = status
            .next_attempt
            .map(|at| {
                format!(
                    "; next start in {:?}",
                    at.saturating_duration_since(Instant::now())
                )
            })
            .unwrap_or_default();
        match status.phase {
            Phase::Running => "its process is being replaced".into(),
            Phase::Restarting => format!("restarting{after}{next}"),
            Phase::CrashLoop => format!(
                "crash loop: {} crashes in a row{after}{next}",
                status.crashes_in_row
            ),
            Phase::Stopped => "its process is stopped".into(),
        }
    }

    /// Starts a process and waits until it answers Ping, at most the start
    /// timeout; an early exit is noticed at once.
    pub(crate) async fn start(&self) -> Result<(Child, Arc<Link>), Failure> {
        if let Address::Unix(path, _) = &self.address {
            // Left by a previous process of this version.
            let _ = std::fs::remove_file(path);
        }
        let mut child = Child::spawn(&self.launch, &self.logs).map_err(|e| Failure {
            reason: format!("cannot run {}: {e}", self.launch.program.display()),
            stderr: Vec::new(),
        })?;
        let link = Arc::new(match self.settings.wire {
            Wire::Process => Link::runner(crate::process::Conns::new(
                self.address.clone(),
                child.handle(),
                Arc::clone(&self.logs),
            )),
            wire => Link::new(wire, self.address.clone(), &self.host),
        });
        let timeout = self.settings.start_timeout;
        let deadline = Instant::now() + timeout;
        let mut pause = FIRST_POLL;
        let mut last: Option<CallError> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let stopped = child.stop(self.settings.stop_grace).await;
                let last = last.map(|e| format!(" (last: {e})")).unwrap_or_default();
                return Err(self
                    .failure(
                        &mut child,
                        format!(
                            "did not answer Ping within {timeout:?}{last}; {}",
                            child::describe(stopped)
                        ),
                    )
                    .await);
            }
            let attempt = tokio::select! {
                status = child.exited() => Err(status),
                result = link.ping(left.min(Duration::from_secs(1))) => Ok(result),
            };
            match attempt {
                Ok(Ok(())) => return Ok((child, link)),
                // The last attempt is cut short by the start timeout: the
                // error before it says more.
                Ok(Err(CallError::Deadline)) if last.is_some() => {}
                Ok(Err(e)) => last = Some(e),
                Err(status) => {
                    let reason = format!("{} before answering Ping", child::describe(status));
                    return Err(self.failure(&mut child, reason).await);
                }
            }
            tokio::select! {
                status = child.exited() => {
                    let reason = format!("{} before answering Ping", child::describe(status));
                    return Err(self.failure(&mut child, reason).await);
                }
                () = tokio::time::sleep(pause.min(left)) => {}
            }
            pause = (pause * 3 / 2).min(LONGEST_POLL);
        }
    }

    async fn failure(&self, child: &mut Child, reason: String) -> Failure {
        child.stderr_read(STDERR_GRACE).await;
        Failure {
            reason,
            stderr: self.logs.stderr_of(child.pid, QUOTED_LINES),
        }
    }

    /// Puts a ready process in service.
    pub(crate) fn serve(&self, child: &Child, link: &Arc<Link>) {
        {
            let mut status = self.status();
            status.phase = Phase::Running;
            status.pid = Some(child.pid);
            status.next_attempt = None;
        }
        self.link.store(Some(Arc::clone(link)));
    }

    /// Takes the process out of service after it went down with `reason`;
    /// returns how long to wait before the next start.
    fn crashed(&self, pid: Option<u32>, reason: String, ran: Duration) -> Duration {
        self.link.store(None);
        let (delay, crashes, entered_loop) = {
            let mut status = self.status();
            if ran >= STABLE {
                status.crashes_in_row = 0;
            }
            status.crashes_in_row += 1;
            let crashes = status.crashes_in_row;
            let delay = self.settings.backoff(crashes);
            let looping = crashes >= CRASH_LOOP_AFTER;
            let entered_loop = looping && status.phase != Phase::CrashLoop;
            status.phase = if looping {
                Phase::CrashLoop
            } else {
                Phase::Restarting
            };
            status.pid = None;
            status.last_exit = Some(reason.clone());
            status.next_attempt = Some(Instant::now() + delay);
            (delay, crashes, entered_loop)
        };
        let restart_in_ms = delay.as_millis().try_into().unwrap_or(u64::MAX);
        tracing::warn!(plugin = %self.plugin, ?pid, crashes, ?delay, "process down: {reason}");
        self.events.emit(Event::Crashed {
            plugin: self.plugin.to_string(),
            version: self.version.clone(),
            pid,
            reason,
            restart_in_ms,
        });
        if entered_loop {
            tracing::error!(plugin = %self.plugin, crashes, "crash loop: restarting with backoff");
            self.events.emit(Event::CrashLoop {
                plugin: self.plugin.to_string(),
                version: self.version.clone(),
                crashes,
                restart_in_ms,
            });
        }
        delay
    }

    fn restarted(&self, pid: u32) {
        let restarts = {
            let mut status = self.status();
            status.restarts += 1;
            status.restarts
        };
        tracing::info!(plugin = %self.plugin, pid, restarts, "process restarted");
        self.events.emit(Event::Restarted {
            plugin: self.plugin.to_string(),
            version: self.version.clone(),
            pid,
            restarts,
        });
    }

    /// Health pings on the interval; returns why the process is deemed
    /// dead once the threshold of misses in a row is reached.
    async fn unhealthy(&self, link: &Link) -> String {
        let Some(interval) = self.settings.health_interval else {
            return std::future::pending().await;
        };
        let mut misses = 0;
        loop {
            tokio::time::sleep(interval).await;
            match link.ping(self.settings.health_timeout).await {
                Ok(()) => misses = 0,
                Err(e) => {
                    misses += 1;
                    tracing::debug!(plugin = %self.plugin, misses, "health ping failed: {e}");
                    if misses >= self.settings.health_misses {
                        return format!("missed {misses} health pings in a row (last: {e})");
                    }
                }
            }
        }
    }
}

/// Supervises the version's processes, from the first (ready) one until
/// `stop` says true; then stops the one running.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    first: (Child, Arc<Link>),
    mut stop: watch::Receiver<bool>,
) {
    let (mut child, mut link) = first;
    shared.serve(&child, &link);
    loop {
        let down = tokio::select! {
            status = child.exited() => child.explain(status),
            why = shared.unhealthy(&link) => {
                let status = child.stop(shared.settings.stop_grace).await;
                format!("{why}; stopped: {}", child::describe(status))
            }
            () = stopped(&mut stop) => {
                shared.link.store(None);
                child.stop(shared.settings.stop_grace).await;
                shared.status().phase = Phase::Stopped;
                return;
            }
        };
        let mut pid = Some(child.pid);
        let mut reason = down;
        let mut ran = child.started.elapsed();
        loop {
            let delay = shared.crashed(pid, reason, ran);
            let started = tokio::select! {
                () = tokio::time::sleep(delay) => shared.start(),
                () = stopped(&mut stop) => {
                    shared.status().phase = Phase::Stopped;
                    return;
                }
            };
            // A start in progress finishes (bounded by the start timeout)
            // before a stop is seen: its process must not be left running.
            match started.await {
                Ok((next, next_link)) => {
                    // In service before it is announced: whoever reacts to
                    // `Restarted` by calling must reach the new process.
                    shared.serve(&next, &next_link);
                    shared.restarted(next.pid);
                    (child, link) = (next, next_link);
                    break;
                }
                Err(failure) => {
                    pid = None;
                    ran = Duration::ZERO;
                    reason = failure.reason;
                    let stopping = *stop.borrow();
                    if stopping {
                        shared.status().phase = Phase::Stopped;
                        return;
                    }
                }
            }
        }
    }
}

/// Resolves once a stop is asked for (or the version is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
