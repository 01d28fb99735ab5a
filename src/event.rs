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
    /// Loading failed; if an older version was serving, it still is.
    Failed {
        /// The plugin.
        plugin: String,
        /// The error, as displayed.
        error: String,
        /// Whether a previous version keeps serving.
        still_serving: bool,
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
}

impl Event {
    /// The plugin the event is about.
    pub fn plugin(&self) -> &str {
        match self {
            Event::Loaded { plugin, .. }
            | Event::Failed { plugin, .. }
            | Event::Unloaded { plugin, .. }
            | Event::Retained { plugin, .. }
            | Event::Leaked { plugin, .. } => plugin,
        }
    }
}
