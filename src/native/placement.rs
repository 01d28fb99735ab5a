//! Where a call of an `auto` version runs: in place, on the caller's thread,
//! while that is both cheap and harmless; on the version's own workers
//! otherwise.
//!
//! A hop to a worker and back costs two cross-thread wake-ups: measured on
//! these 2-core machines, ~50 µs under load, 0.68× a bare axum handler's
//! throughput, against 0.92× in place. In place is harmful in two cases:
//! * a call that blocks (sleeps, waits on I/O) holds the caller's thread,
//!   and on an async runtime that thread is one of few workers (2 here): the
//!   plugin would stall every other request. So, at most `workers − 1`
//!   runtime workers are in plugin code at once (`Claim`); a call that
//!   finds none free waits a few microseconds for one (calls in place take
//!   ~1 µs), then goes to the version's workers. At least one worker always
//!   serves other requests, whatever a plugin does.
//! * a call in place cannot be abandoned at its deadline. So a label whose
//!   call once took longer than `QUICK` runs on the version's workers from
//!   then on (`Placement::is_slow`), where a deadline returns the caller on
//!   time, and a runtime worker never waits for it again.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use compact_str::CompactString;

/// A call that took longer than this moves its label off callers' threads.
/// Tokio's own guidance is 10–100 µs between awaits; a millisecond leaves
/// room for real work and catches every sleep and wait.
pub(crate) const QUICK: Duration = Duration::from_millis(1);

/// How often a call spins waiting for a runtime worker to leave plugin code
/// before it goes to the version's workers (~5 µs here).
const SPINS: u32 = 100;

/// What one `auto` version learned about its labels.
#[derive(Default)]
pub(crate) struct Placement {
    /// Labels that once took longer than `QUICK`.
    slow: Mutex<HashSet<CompactString, foldhash::fast::RandomState>>,
    /// Whether `slow` has any: the common case reads one flag.
    any_slow: AtomicBool,
}

impl Placement {
    /// Whether `label` runs on the version's workers.
    #[inline]
    pub(crate) fn is_slow(&self, label: &str) -> bool {
        self.any_slow.load(Ordering::Acquire) && self.lock().contains(label)
    }

    /// A call of `label` took `elapsed`: remember it if it was slow.
    #[inline]
    pub(crate) fn took(&self, label: &str, elapsed: Duration) {
        if elapsed > QUICK {
            self.mark_slow(label, elapsed);
        }
    }

    #[cold]
    fn mark_slow(&self, label: &str, elapsed: Duration) {
        if self.lock().insert(CompactString::new(label)) {
            tracing::debug!(
                label,
                ?elapsed,
                "slow label: its calls now run on the version's workers"
            );
        }
        self.any_slow.store(true, Ordering::Release);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashSet<CompactString, foldhash::fast::RandomState>> {
        self.slow.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runtime worker threads in plugin code now (every runtime of the process).
static ON_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// One runtime worker in plugin code; released when dropped.
pub(crate) struct Claim(());

impl Drop for Claim {
    #[inline]
    fn drop(&mut self) {
        ON_WORKERS.fetch_sub(1, Ordering::Release);
    }
}

/// A worker for an `auto` call in place, if fewer than `allowed` are in
/// plugin code (waiting briefly for one to come back).
#[inline]
pub(crate) fn claim(allowed: usize) -> Option<Claim> {
    if allowed == 0 {
        return None;
    }
    let mut spins = 0;
    loop {
        let taken = ON_WORKERS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < allowed).then_some(n + 1)
        });
        if taken.is_ok() {
            return Some(Claim(()));
        }
        spins += 1;
        if spins > SPINS {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// An `inline` call on a runtime worker: it runs whatever the count, and
/// counts, so `auto` calls see the worker busy.
#[inline]
pub(crate) fn occupy() -> Claim {
    ON_WORKERS.fetch_add(1, Ordering::AcqRel);
    Claim(())
}

/// How many runtime workers `auto` calls made from this thread may hold at
/// once: the workers of its tokio runtime less one, 0 outside a
/// multi-thread runtime (a current-thread runtime has one worker, which
/// must stay free). Learned once per thread: a tokio worker stays in its
/// runtime for life.
pub(crate) fn allowed_here() -> usize {
    use std::cell::Cell;
    thread_local! {
        static ALLOWED: Cell<Option<usize>> = const { Cell::new(None) };
    }
    if let Some(allowed) = ALLOWED.get() {
        return allowed;
    }
    let allowed = runtime_allowance();
    ALLOWED.set(Some(allowed));
    allowed
}

#[cfg(feature = "server")]
fn runtime_allowance() -> usize {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            handle.metrics().num_workers().saturating_sub(1)
        }
        _ => 0,
    }
}

/// Without the `server` feature this crate does not know tokio's runtime:
/// async calls go to the version's workers.
#[cfg(not(feature = "server"))]
fn runtime_allowance() -> usize {
    0
}
