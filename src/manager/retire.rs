//! Taking versions out of service: unload, drain, and how each one ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::PluginManager;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::slot::{PluginState, RetiredVersion, Slot};
use crate::version::Ending;
use crate::version::Version;

/// How many plugins `unload_all` drains at once.
const UNLOAD_THREADS: usize = 32;

impl PluginManager {
    /// Takes a plugin out of service: new calls fail with
    /// [`Error::Unavailable`], running calls finish, then the version is shut
    /// down and unloaded. Returns the state it reached:
    /// [`PluginState::Unloaded`]; [`PluginState::Pinned`] while threads hold
    /// state of its code (then [`Event::Unloaded`] follows once they let
    /// go); [`PluginState::Retained`] for `inline` code where dynplug does
    /// not see plugin threads; or [`PluginState::Leaked`].
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown name, [`Error::Unavailable`] if it
    /// is not serving.
    pub fn unload(&self, name: &str) -> Result<PluginState> {
        let slot = self.slot(name).ok_or_else(|| Error::NotFound {
            plugin: name.to_owned(),
        })?;
        self.unload_slot(&slot)
    }

    fn unload_slot(&self, slot: &Slot) -> Result<PluginState> {
        let _ops = slot.ops();
        // Loading the same content again must work after an unload.
        slot.status().attempted = None;
        let old = slot.swap(None).ok_or_else(|| Error::Unavailable {
            plugin: slot.name.clone(),
            reason: "not loaded".into(),
        })?;
        Ok(self.retire(slot, old))
    }

    /// The directory of `name` is gone: unload it if it serves, forget it if
    /// it never did (failed plugins are not listed forever).
    pub(crate) fn forget_or_unload(&self, name: &str) {
        let Some(slot) = self.slot(name) else { return };
        if !slot.origin().of_plugins_dir() {
            // A socket or registration of that name: not the directory's.
            return;
        }
        let _ops = slot.ops();
        // Restoring the same directory later must load it again.
        slot.status().attempted = None;
        match slot.swap(None) {
            Some(old) => {
                self.retire(&slot, old);
            }
            None if slot.status().state == PluginState::Failed => {
                let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
                slots.remove(name);
            }
            None => {}
        }
    }

    /// Unloads every plugin (e.g. at shutdown), several at a time, so that
    /// a plugin slow to drain or shut down does not hold up the others.
    pub fn unload_all(&self) {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
            slots.values().cloned().collect()
        };
        let next = AtomicUsize::new(0);
        let threads = slots.len().min(UNLOAD_THREADS);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some(slot) = slots.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let _ = self.unload_slot(slot);
                    }
                });
            }
        });
    }

    /// Drains a version taken out of service, then unloads it and reports how it ended.
    pub(super) fn retire(&self, slot: &Slot, old: Arc<Version>) -> PluginState {
        if slot.current.load().is_none() && old.manifest.parsed_routes().next().is_some() {
            // Its routes are no longer served (an upgrade has forgotten them already).
            self.inner
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget();
        }
        let plugin = slot.name.clone();
        let version = old.manifest.version.to_string();
        let serving = slot.current.load().is_some();
        if !serving {
            slot.status().state = PluginState::Draining;
        }
        // A timeout too large for the clock means no deadline, not a panic.
        let deadline = Instant::now().checked_add(self.inner.drain_timeout);
        // Every running call holds a clone of the Arc; calls whose caller
        // gave up still count as busy. Wait for both.
        let drained =
            crate::drain::wait_until(deadline, || Arc::strong_count(&old) == 1 && old.busy() == 0);
        if !drained {
            let running = (Arc::strong_count(&old) - 1).max(old.busy());
            let reason = format!(
                "drain timed out after {:?} with {running} call(s) running; it is unloaded when they return",
                self.inner.drain_timeout
            );
            // Never block loads on a plugin that ignores its deadline:
            // the last holder unloads the version, on a thread of its own.
            let name = format!("dynplug-retire-{plugin}");
            let _ = std::thread::Builder::new()
                .name(name)
                .spawn(move || drop(old));
            return self.ended(
                slot,
                serving,
                Event::Leaked {
                    plugin,
                    version,
                    reason,
                },
            );
        }
        let Ok(mut old) = Arc::try_unwrap(old) else {
            unreachable!("strong count was 1 and no new clone can appear after the swap");
        };
        let artifact = old.artifact();
        // Until `ended` has recorded how it ended, a late ending from the
        // reaper waits for it (`ended_late`).
        let retiring = version.clone();
        slot.status().ending.push(version.clone());
        let event = match old.unload() {
            Ending::Unloaded => Event::Unloaded { plugin, version },
            Ending::Retained => Event::Retained { plugin, version },
            Ending::Leaked(reason) => Event::Leaked {
                plugin,
                version,
                reason: format!("{reason} ({artifact})"),
            },
            Ending::Pinned(reason) => Event::Pinned {
                plugin,
                version,
                reason,
            },
        };
        let state = self.ended(slot, serving, event);
        let mut status = slot.status();
        if let Some(at) = status.ending.iter().position(|v| *v == retiring) {
            status.ending.remove(at);
        }
        state
    }

    /// A version reported pinned has ended (called on dynplug's reaper
    /// thread): its `retired` entry goes, and the ending is announced.
    pub(super) fn ended_late(&self, plugin: &str, version: &str, ending: Ending) {
        let Some(slot) = self.slot(plugin) else {
            return;
        };
        let serving = slot.current.load().is_some();
        let event = {
            let mut status = slot.status();
            let pinned = status
                .retired
                .iter()
                .position(|r| r.version == version && r.state == PluginState::Pinned);
            match pinned {
                Some(at) => {
                    status.retired.remove(at);
                }
                // The reaper was quicker than `retire`'s `ended`: that
                // records this right after the pinned report, so the events
                // come in order.
                None if status.ending.iter().any(|v| v == version) => {
                    status.ended_early.push((version.to_owned(), ending));
                    return;
                }
                None => {}
            }
            let (plugin, version) = (plugin.to_owned(), version.to_owned());
            let (state, error, event) = match ending {
                Ending::Unloaded => {
                    status.unloads += 1;
                    (
                        PluginState::Unloaded,
                        None,
                        Event::Unloaded { plugin, version },
                    )
                }
                Ending::Leaked(reason) => {
                    status.retired.push(RetiredVersion {
                        version: version.clone(),
                        state: PluginState::Leaked,
                        reason: Some(reason.clone()),
                    });
                    let event = Event::Leaked {
                        plugin,
                        version,
                        reason: reason.clone(),
                    };
                    (PluginState::Leaked, Some(reason), event)
                }
                Ending::Retained | Ending::Pinned(_) => return,
            };
            if !serving && status.state == PluginState::Pinned {
                status.state = state;
                status.error = error;
            }
            event
        };
        tracing::info!(plugin, version, "pinned version ended: {event:?}");
        self.emit(event);
    }

    /// Records how a retired version ended; the slot's state changes only if
    /// no newer version is serving.
    fn ended(&self, slot: &Slot, serving: bool, event: Event) -> PluginState {
        let (state, error) = match &event {
            Event::Unloaded { .. } => (PluginState::Unloaded, None),
            Event::Retained { .. } => (PluginState::Retained, None),
            Event::Leaked { reason, .. } => (PluginState::Leaked, Some(reason.clone())),
            Event::Pinned { reason, .. } => (PluginState::Pinned, Some(reason.clone())),
            _ => unreachable!("only ending events are passed"),
        };
        match &event {
            Event::Leaked { reason, .. } => tracing::warn!(plugin = %slot.name, "leaked: {reason}"),
            Event::Pinned { reason, .. } => tracing::info!(plugin = %slot.name, "pinned: {reason}"),
            _ => tracing::info!(plugin = %slot.name, "{}", state.as_str()),
        }
        let mut early = None;
        {
            let mut status = slot.status();
            match &event {
                Event::Unloaded { .. } => status.unloads += 1,
                Event::Retained { version, .. }
                | Event::Leaked { version, .. }
                | Event::Pinned { version, .. } => {
                    status.retired.push(RetiredVersion {
                        version: version.clone(),
                        state,
                        reason: error.clone(),
                    });
                }
                _ => {}
            }
            if let Event::Pinned { version, .. } = &event
                && let Some(at) = status.ended_early.iter().position(|(v, _)| v == version)
            {
                early = Some(status.ended_early.remove(at));
            }
            if !serving {
                status.state = state;
                status.error = error;
            }
        }
        self.emit(event);
        if let Some((version, ending)) = early {
            self.ended_late(&slot.name, &version, ending);
        }
        state
    }
}
