//! Draining: waiting until a version out of service has no call left.
//!
//! Calls hold the version they run on (an `Arc` clone per call, and a count
//! of the calls a pooled version still runs for callers that gave up), and
//! neither notifies anyone when it drops: a notification would cost every
//! call an atomic read-modify-write on a shared line, to speed up only the
//! rare unload. So draining polls, with a backoff from 50 µs to 5 ms: a
//! version is unloaded at most 5 ms after its last call, and calls pay
//! nothing for it.

use std::time::{Duration, Instant};

/// Waits until `drained()` holds (`true`) or `deadline` passes (`false`;
/// `None` waits for as long as it takes).
pub(crate) fn wait_until(deadline: Option<Instant>, mut drained: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_micros(50);
    loop {
        if drained() {
            return true;
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}
