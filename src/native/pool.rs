//! Worker threads owned by one loaded version of a `pooled` plugin.
//!
//! Plugin code only ever runs on these threads, so everything it pins to a
//! thread (thread-locals with destructors, `std::thread::current()`'s key) is
//! released when they are joined, before the library is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::ffi::Library;
use crate::Context;
use crate::version::Outcome;

/// Where a finished call's context and outcome go.
pub(crate) enum Reply {
    Blocking(Sender<(Context, Outcome)>),
    Async(tokio::sync::oneshot::Sender<(Context, Outcome)>),
}

enum Job {
    Execute { ctx: Context, reply: Reply },
    Control(Box<dyn FnOnce(&Library) + Send>),
}

pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// Calls queued or running, including those whose caller gave up (a
    /// deadline, a dropped future): draining waits for these too.
    calls: Arc<AtomicUsize>,
    /// Workers started (the vector empties when they are joined).
    size: usize,
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
    /// `size` workers; with `queue_limit`, at most that many calls wait for
    /// a worker (beyond the ones running).
    pub(crate) fn start(
        plugin: &str,
        library: &Arc<Library>,
        size: usize,
        queue_limit: Option<usize>,
    ) -> std::io::Result<Pool> {
        let (jobs, rx) = crossbeam_channel::unbounded();
        let size = size.max(1);
        let mut pool = Pool {
            jobs: Some(jobs),
            workers: Vec::with_capacity(size),
            calls: Arc::new(AtomicUsize::new(0)),
            size,
            queue_limit,
        };
        for i in 0..size {
            let rx: Receiver<Job> = rx.clone();
            let library = Arc::clone(library);
            let calls = Arc::clone(&pool.calls);
            let worker = std::thread::Builder::new()
                .name(format!("dynplug-{plugin}-{i}"))
                .spawn(move || work(&library, &rx, &calls))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// Queues a call, or gives the context back with the reason.
    pub(crate) fn submit(&self, ctx: Context, reply: Reply) -> Result<(), Refused> {
        let Some(jobs) = &self.jobs else {
            return Err(Refused::Stopped(ctx));
        };
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
        jobs.send(Job::Execute { ctx, reply }).map_err(|e| {
            self.calls.fetch_sub(1, Ordering::AcqRel);
            match e.0 {
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
        timeout: std::time::Duration,
        f: impl FnOnce(&Library) -> T + Send + 'static,
    ) -> Result<T, Stuck> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = Job::Control(Box::new(move |lib| {
            let _ = tx.send(f(lib));
        }));
        let jobs = self.jobs.as_ref().ok_or(Stuck::Stopped)?;
        jobs.send(job).map_err(|_| Stuck::Stopped)?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => Stuck::TimedOut,
            crossbeam_channel::RecvTimeoutError::Disconnected => Stuck::Stopped,
        })
    }

    /// Lets the workers finish the queued jobs, then joins them.
    pub(crate) fn stop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }

    /// Stops taking jobs and lets the workers go without joining them: one
    /// is stuck in plugin code. They keep the library referenced, so it is
    /// never closed under them.
    pub(crate) fn abandon(&mut self) {
        self.jobs = None;
        self.workers.clear();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn work(library: &Library, jobs: &Receiver<Job>, calls: &AtomicUsize) {
    for job in jobs {
        match job {
            Job::Execute { mut ctx, reply } => {
                // A call whose caller gave up while it waited in the queue
                // (deadline passed, cancelled) is not started: under overload
                // the queue would otherwise fill with work nobody waits for.
                // The caller's result is DeadlineExceeded / Cancelled.
                let outcome = if ctx.is_cancelled() {
                    Outcome::Error(
                        "not started: the call was cancelled or past its deadline".into(),
                    )
                } else {
                    library.execute(&mut ctx)
                };
                calls.fetch_sub(1, Ordering::AcqRel);
                match reply {
                    Reply::Blocking(tx) => {
                        let _ = tx.send((ctx, outcome));
                    }
                    Reply::Async(tx) => {
                        let _ = tx.send((ctx, outcome));
                    }
                }
            }
            Job::Control(f) => f(library),
        }
    }
}
