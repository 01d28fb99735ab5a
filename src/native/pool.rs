//! Worker threads owned by one loaded version, started when calls come and
//! gone after a while without any, so a thousand loaded plugins at rest cost
//! no thread (measured before: 2 idle workers per plugin, 2,004 threads and
//! 278 MB RSS for 1,000 plugins); and the helper threads that run plugins'
//! `init` and `shutdown` for the host.
//!
//! A pooled version's code runs only on its own workers, so what it pins to
//! a thread is released when they are joined, before the library is closed:
//! `stop` joins every worker, including those that left when idle.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::ffi::Library;
use super::placement::Placement;
use crate::Context;
use crate::version::Outcome;

/// One idle worker and one job not taken yet, in `Crew::slots`.
const IDLE_WORKER: u64 = 1 << 32;
const PENDING: u64 = 1;

/// How long a worker waits for a call before it leaves. A worker started on
/// demand costs ~30–60 µs on these machines; it is paid once per burst.
const IDLE: Duration = Duration::from_secs(2);

/// Where a finished call's context and outcome go.
pub(crate) enum Reply {
    Blocking(Sender<(Context, Outcome)>),
    Async(tokio::sync::oneshot::Sender<(Context, Outcome)>),
}

enum Job {
    Execute { ctx: Context, reply: Reply },
    Control(Box<dyn FnOnce(&Library) + Send>),
}

/// Threads that run jobs of type `J`, started on demand up to a limit,
/// leaving after `IDLE` without a job.
struct Crew<J> {
    rx: Receiver<J>,
    handler: Box<dyn Fn(J) + Send + Sync>,
    /// Workers alive (counting one that decided to leave but has not yet).
    live: AtomicUsize,
    /// Workers waiting for a job (high half) and jobs sent but not taken
    /// yet (low half), in one word: a worker taking a job changes both at
    /// once, so a sender that finds at least as many idle workers as jobs
    /// knows each job has a worker of its own. (Two counters read apart let
    /// a job wait behind a worker that had just taken another one, and that
    /// job might hang: a plugin's `init` for 30 s.)
    slots: AtomicU64,
    limit: usize,
    name: String,
    /// Every worker ever started and not yet joined.
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl<J: Send + 'static> Crew<J> {
    fn new(
        name: String,
        limit: usize,
        handler: impl Fn(J) + Send + Sync + 'static,
    ) -> (Sender<J>, Arc<Crew<J>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let crew = Crew {
            rx,
            handler: Box::new(handler),
            live: AtomicUsize::new(0),
            slots: AtomicU64::new(0),
            limit: limit.max(1),
            name,
            handles: Mutex::new(Vec::new()),
        };
        (tx, Arc::new(crew))
    }

    /// Sends `job` and makes sure a worker will take it (an idle one not
    /// spoken for by another job, or one more started). The job comes back
    /// if the receiving side is gone; `Err(None)` with the error when no
    /// worker runs at all and none can be started (the job is queued).
    fn send(self: &Arc<Self>, jobs: &Sender<J>, job: J) -> Result<(), (Option<J>, std::io::Error)> {
        // Counted before it can be taken, so the count never goes below 0.
        self.slots.fetch_add(PENDING, Ordering::SeqCst);
        if let Err(e) = jobs.send(job) {
            self.slots.fetch_sub(PENDING, Ordering::SeqCst);
            return Err((Some(e.0), std::io::Error::other("the workers have stopped")));
        }
        self.wake().map_err(|e| (None, e))
    }

    /// A job still queued, taken back by the sender's side.
    fn take_back(&self) -> Option<J> {
        let job = self.rx.try_recv().ok()?;
        self.slots.fetch_sub(PENDING, Ordering::SeqCst);
        Some(job)
    }

    fn wake(self: &Arc<Self>) -> std::io::Result<()> {
        // Pairs with the fence of a worker that leaves: either it sees the
        // job sent, or this sees it gone.
        fence(Ordering::SeqCst);
        let slots = self.slots.load(Ordering::SeqCst);
        if slots / IDLE_WORKER >= slots % IDLE_WORKER {
            return Ok(());
        }
        let claimed = self
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| {
                (live < self.limit).then_some(live + 1)
            });
        if claimed.is_err() {
            // All workers are busy: the job waits for one.
            return Ok(());
        }
        let crew = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || crew.work());
        match spawned {
            Ok(handle) => {
                let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
                // Workers that left when idle are joined here, so the list
                // stays as short as the live workers.
                let (done, alive): (Vec<_>, Vec<_>) =
                    handles.drain(..).partition(JoinHandle::is_finished);
                *handles = alive;
                handles.push(handle);
                drop(handles);
                for handle in done {
                    let _ = handle.join();
                }
                Ok(())
            }
            Err(e) => {
                let left = self.live.fetch_sub(1, Ordering::SeqCst) - 1;
                if left == 0 { Err(e) } else { Ok(()) }
            }
        }
    }

    fn work(self: Arc<Self>) {
        loop {
            self.slots.fetch_add(IDLE_WORKER, Ordering::SeqCst);
            let error = match self.rx.recv_timeout(IDLE) {
                Ok(job) => {
                    self.slots
                        .fetch_sub(IDLE_WORKER + PENDING, Ordering::SeqCst);
                    (self.handler)(job);
                    continue;
                }
                Err(error) => error,
            };
            self.slots.fetch_sub(IDLE_WORKER, Ordering::SeqCst);
            match error {
                RecvTimeoutError::Disconnected => break,
                RecvTimeoutError::Timeout => {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    if self.rx.is_empty() {
                        return;
                    }
                    // A job came as this worker was leaving: stay for it if
                    // the limit allows (else a worker is there for it).
                    let stayed =
                        self.live
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| {
                                (live < self.limit).then_some(live + 1)
                            });
                    if stayed.is_err() {
                        return;
                    }
                }
            }
        }
        self.live.fetch_sub(1, Ordering::SeqCst);
    }

    /// Joins every worker started (the senders are gone, so they leave once
    /// the queue is empty).
    fn join(&self) {
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    /// Holds the library (in its handler) until `stop` lets it go.
    crew: Option<Arc<Crew<Job>>>,
    /// Most workers.
    size: usize,
    /// Calls queued or running, including those whose caller gave up (a
    /// deadline, a dropped future): draining waits for these too.
    calls: Arc<AtomicUsize>,
    /// Most calls waiting for a worker (`None`: no limit).
    queue_limit: Option<usize>,
}

/// Why plugin code run for the host (`init`, `shutdown`) gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stuck {
    /// The workers have stopped.
    Stopped,
    /// No answer within the time allowed; the worker is still in plugin code.
    TimedOut,
}

/// Why a call was not queued; the context comes back to the caller.
pub(crate) enum Refused {
    /// The pool has stopped.
    Stopped(Context),
    /// As many calls as the queue limit allows are already waiting.
    Full(Context),
}

impl Pool {
    /// At most `size` workers, none started yet; with `queue_limit`, at most
    /// that many calls wait for a worker (beyond the ones running). With
    /// `placement` (`auto`), how long each call takes is recorded there.
    pub(crate) fn new(
        plugin: &str,
        library: &Arc<Library>,
        size: usize,
        queue_limit: Option<usize>,
        placement: Option<Arc<Placement>>,
    ) -> Pool {
        let calls = Arc::new(AtomicUsize::new(0));
        let library = Arc::clone(library);
        let counted = Arc::clone(&calls);
        let (jobs, crew) = Crew::new(format!("dynplug-{plugin}"), size, move |job| {
            run_job(&library, &counted, placement.as_deref(), job);
        });
        Pool {
            jobs: Some(jobs),
            crew: Some(crew),
            size: size.max(1),
            calls,
            queue_limit,
        }
    }

    /// Queues a job; gives it back if the pool has stopped.
    fn send(&self, job: Job) -> Result<(), Box<Job>> {
        let (Some(jobs), Some(crew)) = (&self.jobs, &self.crew) else {
            return Err(Box::new(job));
        };
        match crew.send(jobs, job) {
            Ok(()) => Ok(()),
            Err((Some(job), _)) => Err(Box::new(job)),
            Err((None, e)) => {
                // No worker runs and none can start: answer what is queued.
                tracing::error!(worker = %crew.name, "cannot start a worker: {e}");
                while let Some(job) = crew.take_back() {
                    self.refuse(job, &e);
                }
                Ok(())
            }
        }
    }

    fn refuse(&self, job: Job, e: &std::io::Error) {
        if let Job::Execute { ctx, reply } = job {
            self.calls.fetch_sub(1, Ordering::AcqRel);
            reply.send(ctx, Outcome::Error(format!("no worker thread: {e}")));
        }
    }

    /// Queues a call, or gives the context back with the reason.
    pub(crate) fn submit(&self, ctx: Context, reply: Reply) -> Result<(), Refused> {
        if self.jobs.is_none() {
            return Err(Refused::Stopped(ctx));
        }
        // Counted only below capacity: refused callers never inflate the
        // count that other callers are checked against.
        let capacity = self
            .queue_limit
            .map_or(usize::MAX, |limit| self.size.saturating_add(limit));
        let counted = self
            .calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |calls| {
                (calls < capacity).then_some(calls + 1)
            });
        if counted.is_err() {
            return Err(Refused::Full(ctx));
        }
        self.send(Job::Execute { ctx, reply }).map_err(|job| {
            self.calls.fetch_sub(1, Ordering::AcqRel);
            match *job {
                Job::Execute { ctx, .. } => Refused::Stopped(ctx),
                Job::Control(_) => unreachable!("sent an Execute job"),
            }
        })
    }

    /// How many calls may wait for a worker, if limited.
    pub(crate) fn queue_limit(&self) -> Option<usize> {
        self.queue_limit
    }

    /// Calls queued or running.
    pub(crate) fn busy(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }

    /// Runs `f` on a worker and waits for its result (`init`, `shutdown`),
    /// at most `timeout`.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&Library) -> T + Send + 'static,
    ) -> Result<T, Stuck> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = Job::Control(Box::new(move |lib| {
            let _ = tx.send(f(lib));
        }));
        self.send(job).map_err(|_| Stuck::Stopped)?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => Stuck::TimedOut,
            RecvTimeoutError::Disconnected => Stuck::Stopped,
        })
    }

    /// Lets the workers finish the queued jobs, then joins every worker
    /// ever started.
    pub(crate) fn stop(&mut self) {
        self.jobs = None;
        if let Some(crew) = self.crew.take() {
            crew.join();
        }
    }

    /// Stops taking jobs and lets the workers go without joining them: one
    /// is stuck in plugin code. They keep the library referenced, so it is
    /// never closed under them.
    pub(crate) fn abandon(&mut self) {
        self.jobs = None;
        self.crew = None;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Reply {
    fn send(self, ctx: Context, outcome: Outcome) {
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send((ctx, outcome));
            }
            Reply::Async(tx) => {
                let _ = tx.send((ctx, outcome));
            }
        }
    }
}

fn run_job(library: &Library, calls: &AtomicUsize, placement: Option<&Placement>, job: Job) {
    match job {
        Job::Execute { mut ctx, reply } => {
            // A call whose caller gave up while it waited in the queue
            // (deadline passed, cancelled) is not started: under overload
            // the queue would otherwise fill with work nobody waits for.
            // The caller's result is DeadlineExceeded / Cancelled.
            let outcome = if ctx.is_cancelled() {
                Outcome::Error("not started: the call was cancelled or past its deadline".into())
            } else if let Some(placement) = placement {
                let started = std::time::Instant::now();
                let outcome = library.execute(&mut ctx);
                placement.took(ctx.label(), started.elapsed());
                outcome
            } else {
                library.execute(&mut ctx)
            };
            calls.fetch_sub(1, Ordering::AcqRel);
            reply.send(ctx, outcome);
        }
        Job::Control(f) => f(library),
    }
}

type HostJob = Box<dyn FnOnce() + Send>;

/// Runs `f` on one of the host's helper threads (`dynplug-host`, started on
/// demand, gone when idle) and waits at most `timeout` for its result. For
/// plugin code the host runs outside calls (`init`, `shutdown`) when the
/// process tracks plugin threads (`pins`): what that code leaves on a
/// helper is then released at the helper's next job or exit. A helper stuck
/// in plugin code stays so; the next job gets another helper.
pub(crate) fn on_helper<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Stuck> {
    static HELPERS: std::sync::OnceLock<(Sender<HostJob>, Arc<Crew<HostJob>>)> =
        std::sync::OnceLock::new();
    let (jobs, crew) = HELPERS.get_or_init(|| {
        Crew::new("dynplug-host".into(), usize::MAX, |job: HostJob| {
            super::pins::between_calls();
            job();
        })
    });
    let (tx, rx) = crossbeam_channel::bounded(1);
    let job: HostJob = Box::new(move || {
        let _ = tx.send(f());
    });
    if crew.send(jobs, job).is_err() {
        return Err(Stuck::Stopped);
    }
    rx.recv_timeout(timeout).map_err(|e| match e {
        RecvTimeoutError::Timeout => Stuck::TimedOut,
        RecvTimeoutError::Disconnected => Stuck::Stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two jobs sent back to back to one idle worker: the second gets a
    /// worker of its own, even though the first never returns.
    #[test]
    fn a_job_never_waits_behind_a_job_that_hangs() {
        type Job = Box<dyn FnOnce() + Send>;
        let (jobs, crew) = Crew::new("test-crew".into(), usize::MAX, |job: Job| job());
        for round in 0..300 {
            // One idle worker, as between two `init`s.
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            crew.send(&jobs, Box::new(move || ready_tx.send(()).unwrap()) as Job)
                .map_err(|(_, e)| e)
                .unwrap();
            ready_rx.recv().unwrap();
            let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
            let (done_tx, done_rx) = crossbeam_channel::bounded(1);
            // Back to back, the one that hangs first: the worker takes it.
            let hangs: Job = Box::new(move || {
                let _ = release_rx.recv();
            });
            let quick: Job = Box::new(move || done_tx.send(()).unwrap());
            for job in [hangs, quick] {
                crew.send(&jobs, job).map_err(|(_, e)| e).unwrap();
            }
            assert!(
                done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
                "round {round}: the quick job waited behind the hanging one"
            );
            drop(release_tx);
        }
    }
}
