//! Unloading versions nobody calls (`Builder::unload_idle_after`): a loaded
//! native version whose call count has not moved for the idle time, with no
//! call in flight, is replaced by a deferred version of the same files and
//! unloaded; its next call loads it again. With loading on first call, what
//! a host maps follows what is being called, not what was ever called.
//!
//! One `dynplug-idle` thread looks every quarter of the idle time (10 ms to
//! 30 s); between looks it holds the manager weakly, so it ends with the
//! manager. Idleness is read from the call counters the calls keep anyway,
//! so calls pay nothing for it. A version is replaced under the plugin's
//! operation lock, as an upgrade is: a call arriving meanwhile is served by
//! one version or the other. The replacement is marked as replacing a
//! loaded version (`Defer::AfterIdle`): an upgrade of it is loaded before
//! it serves, as the upgrade of the version it replaced would have been;
//! its load refuses a library file other than the one registered; and if
//! that load fails (a passing error: descriptors, memory, `init` timing
//! out), it is replaced again after the idle time, so a plugin that worked
//! does not stay failed. Skipped: plugins whose files changed since they
//! were loaded (the watcher or a reload upgrades them), plugins with a
//! retired version still mapped (a `thread_local!` pinning each copy would
//! otherwise pile copies up), and versions whose unload would not unmap
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Inner, PluginManager};
use crate::slot::Slot;

/// What the reaper last saw of a plugin: which version served, its
/// finished calls, whether it was a replacement whose load failed, and
/// since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// `Version::serial` (0: none).
    version: u64,
    finished: u64,
    failed: bool,
    since: Instant,
}

/// Starts the thread that unloads idle versions of the manager `inner`.
pub(super) fn start(inner: Weak<Inner>, idle: Duration) -> std::io::Result<std::thread::Thread> {
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    let handle = std::thread::Builder::new()
        .name("dynplug-idle".into())
        .spawn(move || {
            let mut seen = HashMap::new();
            loop {
                std::thread::park_timeout(tick);
                let Some(inner) = inner.upgrade() else { return };
                PluginManager::from_inner(inner).unload_idle(&mut seen, idle);
            }
        })?;
    Ok(handle.thread().clone())
}

impl PluginManager {
    /// One look at every plugin: unloads the versions idle for `idle`.
    fn unload_idle(&self, seen: &mut HashMap<String, Seen>, idle: Duration) {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
            slots.values().cloned().collect()
        };
        let now = Instant::now();
        seen.retain(|name, _| slots.iter().any(|s| &s.name == name));
        for slot in slots {
            // The manager was dropped (this pass holds the last reference):
            // unloading is its `Drop`'s now.
            if Arc::strong_count(&self.inner) == 1 {
                return;
            }
            let calls = slot.stats.snapshot();
            let current = slot.current.load_full();
            // A replacement whose load failed is tried again `idle` after
            // the failure, called or not.
            let failed = current.as_ref().is_some_and(|v| v.failed_after_idle());
            let now_seen = Seen {
                version: current.as_ref().map_or(0, |v| v.serial()),
                finished: calls.calls - calls.in_flight,
                failed,
                since: now,
            };
            let entry = seen.entry(slot.name.clone()).or_insert(now_seen);
            // Another version, a load that failed since the last look, or
            // calls since then: not idle (a fresh upgrade gets its own idle
            // time, a failure its own wait).
            if entry.version != now_seen.version
                || entry.failed != failed
                || !failed && (entry.finished != now_seen.finished || calls.in_flight > 0)
            {
                *entry = now_seen;
                continue;
            }
            let due = now.duration_since(entry.since) >= idle
                && (failed || current.as_ref().is_some_and(|v| v.may_idle_out()));
            // Not held while it is replaced: draining waits for every holder.
            drop(current);
            let finished = (!failed).then_some(now_seen.finished);
            if due {
                if self.idle_out(&slot, now_seen.version, finished) {
                    // Its replacement is another version: it starts its own.
                    seen.remove(&slot.name);
                } else {
                    // Not now (a call came, or its files cannot be
                    // registered again): another try one idle time later,
                    // not at every tick.
                    entry.since = now;
                }
            }
        }
    }

    /// Replaces the slot's version seen idle (`version`, by serial:
    /// loaded, or a replacement whose load failed) by a deferred one and
    /// unloads it, if it still serves, no call finished since `finished`
    /// (`None`: a failed replacement, whose failing calls count), and its
    /// files are those it was loaded from.
    fn idle_out(&self, slot: &Slot, version: u64, finished: Option<u64>) -> bool {
        let _ops = slot.ops();
        let calls = slot.stats.snapshot();
        if let Some(finished) = finished
            && (calls.in_flight > 0 || calls.calls - calls.in_flight != finished)
        {
            return false;
        }
        let files = match slot.current.load().as_ref() {
            Some(serving) if serving.serial() == version => serving.files,
            _ => return false,
        };
        if !slot.status().retired.is_empty() {
            return false;
        }
        // Only from the very files the serving version was loaded from: a
        // change is the watcher's (or a reload's) to load, checked first.
        // (`prepare_deferred` checks again, on what it reads.)
        let Some(files) = files.filter(|files| {
            self.locate(&slot.name)
                .is_some_and(|origin| origin.fingerprint() == *files)
        }) else {
            return false;
        };
        let version = match self.prepare_deferred(slot, files) {
            Ok(version) => version,
            Err(error) => {
                tracing::warn!(plugin = %slot.name, "not unloaded when idle: {error}");
                return false;
            }
        };
        let Some(old) = slot.swap(Some(Arc::new(version))) else {
            return false;
        };
        if old.failed_after_idle() {
            tracing::info!(plugin = %slot.name, "loading it again failed: another try at its next call");
        } else {
            tracing::info!(plugin = %slot.name, "idle: unloading; its next call loads it again");
        }
        self.retire(slot, old);
        true
    }
}
