//! Lifecycle events, broadcast to every [`PluginManager::subscribe`](crate::PluginManager::subscribe)r.

use serde::Serialize;

/// Something that happened to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A version was loaded and initialised and now takes calls.
    Loaded {
        /// The plugin.
        plugin: String,
        /// Its version.
        version: String,
    },
    /// A plugin that was not serving failed to load.
    Failed {
        /// The plugin.
        plugin: String,
        /// The error, as displayed.
        error: String,
    },
    /// A new version replaced the serving one (`from == to` for a reload).
    Upgraded {
        /// The plugin.
        plugin: String,
        /// The version replaced.
        from: String,
        /// The version now serving.
        to: String,
    },
    /// A new version was refused or failed before the swap; the old one keeps serving.
    UpgradeFailed {
        /// The plugin.
        plugin: String,
        /// Why, as displayed.
        reason: String,
        /// The version still serving.
        still_serving: String,
    },
    /// A version was drained, shut down, closed, and its copy is unmapped.
    Unloaded {
        /// The plugin.
        plugin: String,
        /// The version unloaded.
        version: String,
    },
    /// An `inline` version was taken out of service but stays mapped on purpose.
    Retained {
        /// The plugin.
        plugin: String,
        /// The version retained.
        version: String,
    },
    /// A version was taken out of service but its code stayed mapped.
    Leaked {
        /// The plugin.
        plugin: String,
        /// The version leaked.
        version: String,
        /// Why it is still mapped.
        reason: String,
    },
    /// The process is running out of pthread keys (glibc has 1024; plugin
    /// code calling `std::thread::current()` takes one per loaded copy and
    /// never gives it back). At 1024 the process aborts.
    TlsKeysLow {
        /// Keys in use after the last load.
        in_use: usize,
        /// The limit.
        limit: usize,
    },
}

impl Event {
    /// The plugin the event is about (`None` for process-wide events).
    pub fn plugin(&self) -> Option<&str> {
        match self {
            Event::Loaded { plugin, .. }
            | Event::Failed { plugin, .. }
            | Event::Upgraded { plugin, .. }
            | Event::UpgradeFailed { plugin, .. }
            | Event::Unloaded { plugin, .. }
            | Event::Retained { plugin, .. }
            | Event::Leaked { plugin, .. } => Some(plugin),
            Event::TlsKeysLow { .. } => None,
        }
    }
}
