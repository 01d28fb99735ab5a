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
//!   calls take longer than `QUICK` runs on the version's workers
//!   (`Placement::is_slow`), where a deadline returns the caller on time,
//!   and a runtime worker does not wait for it again.
//!
//! Wall time is noisy evidence: on these busy 2-core machines a thread is
//! preempted for several milliseconds now and then, mid-call (measured: one
//! 5.9 ms `hello.get` among hundreds of thousands of 1 µs ones, which
//! demoted the label for good when one slow call sufficed). So each label
//! has a score: a slow call adds its length in `QUICK`s (at most `SLOW`),
//! a quick call takes one away; the label is slow from `SLOW` until the
//! score is back to 0. A call that blocks for `SLOW` milliseconds or more
//! moves its label at once; a hiccup fades after a few quick calls. Calls
//! on the workers are timed too, so a label that became quick comes back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use compact_str::CompactString;

/// A call that took longer than this counts against its label. Tokio's own
/// guidance is 10–100 µs between awaits; a millisecond leaves room for real
/// work and catches every sleep and wait.
pub(crate) const QUICK: Duration = Duration::from_millis(1);

/// The score at which a label is slow (and the most one call adds).
const SLOW: u32 = 16;

/// The highest score: how many quick calls bring a slow label back.
const MOST: u32 = 64;

/// How often a call spins waiting for a runtime worker to leave plugin code
/// before it goes to the version's workers (~5 µs here).
const SPINS: u32 = 100;

/// A label's standing.
#[derive(Debug, Default, Clone, Copy)]
struct Score {
    value: u32,
    slow: bool,
}

type Scores = HashMap<CompactString, Score, foldhash::fast::RandomState>;

/// What one `auto` version learned about its labels.
#[derive(Default)]
pub(crate) struct Placement {
    /// Labels with a score above 0 (none, usually).
    scores: Mutex<Scores>,
    /// Whether `scores` has any: the common case reads one flag.
    any: AtomicBool,
}

impl Placement {
    /// Whether `label` runs on the version's workers.
    #[inline]
    pub(crate) fn is_slow(&self, label: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.lock().get(label).is_some_and(|s| s.slow)
    }

    /// A call of `label` took `elapsed` (in place or on a worker).
    #[inline]
    pub(crate) fn took(&self, label: &str, elapsed: Duration) {
        if elapsed > QUICK || self.any.load(Ordering::Acquire) {
            self.score(label, elapsed);
        }
    }

    #[cold]
    fn score(&self, label: &str, elapsed: Duration) {
        let mut scores = self.lock();
        if elapsed > QUICK {
            let weight = (elapsed.as_nanos() / QUICK.as_nanos()).min(u128::from(SLOW)) as u32;
            let score = scores.entry(CompactString::new(label)).or_default();
            score.value = (score.value + weight).min(MOST);
            if score.value >= SLOW && !score.slow {
                score.slow = true;
                tracing::debug!(
                    label,
                    ?elapsed,
                    "slow label: its calls run on the version's workers"
                );
            }
        } else if let Some(score) = scores.get_mut(label) {
            score.value -= 1;
            if score.value == 0 {
                if score.slow {
                    tracing::debug!(label, "quick again: its calls run in place");
                }
                scores.remove(label);
            }
        }
        self.any.store(!scores.is_empty(), Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scores> {
        self.scores.lock().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_long_block_makes_a_label_slow_at_once() {
        let placement = Placement::default();
        assert!(!placement.is_slow("a"));
        placement.took("a", 300 * MS);
        assert!(placement.is_slow("a"));
        assert!(!placement.is_slow("b"), "per label");
    }

    #[test]
    fn a_hiccup_fades_and_a_slow_label_comes_back_when_quick() {
        let placement = Placement::default();
        placement.took("a", 6 * MS);
        assert!(!placement.is_slow("a"), "one preempted call is not enough");
        for _ in 0..6 {
            placement.took("a", Duration::from_micros(2));
        }
        assert!(!placement.any.load(Ordering::Acquire), "faded away");
        // A label that keeps taking 2 ms becomes slow after a few calls.
        for _ in 0..8 {
            placement.took("a", 2 * MS + Duration::from_micros(10));
        }
        assert!(placement.is_slow("a"));
        for _ in 0..MOST {
            placement.took("a", Duration::from_micros(2));
        }
        assert!(!placement.is_slow("a"), "quick again on the workers");
    }
}
