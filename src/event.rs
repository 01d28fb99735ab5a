//! Lifecycle events, broadcast to every [`PluginManager::subscribe`](crate::PluginManager::subscribe)r.

use serde::Serialize;

/// Something that happened to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A version was loaded and initialised and now takes calls (with
    /// `load_on_first_call`: registered, and its first call loads it).
    Loaded {
        /// The plugin.
        plugin: String,
        /// Its version.
        version: String,
    },
    /// A plugin that was not serving failed to load (also: a deferred
    /// version's load on its first call failed).
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
    /// A version was taken out of service, but threads still hold state of
    /// its code (thread-locals with destructors, values of its pthread
    /// keys): it is closed once they let go, then [`Event::Unloaded`] (or
    /// [`Event::Leaked`]) follows.
    Pinned {
        /// The plugin.
        plugin: String,
        /// The version pinned.
        version: String,
        /// Which threads hold it.
        reason: String,
    },
    /// A plugin's process went down (it exited, was killed, or stopped
    /// answering health pings), or a restart of it failed; calls fail with
    /// `Unavailable` until it is back.
    Crashed {
        /// The plugin.
        plugin: String,
        /// The version whose process it was.
        version: String,
        /// The process, if one was running.
        pid: Option<u32>,
        /// How it went down, e.g. `killed by SIGKILL`.
        reason: String,
        /// When the next start is tried.
        restart_in_ms: u64,
    },
    /// A plugin's process was started again and answers Ping.
    Restarted {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The new process.
        pid: u32,
        /// Restarts of this version so far.
        restarts: u64,
    },
    /// A plugin's process crashed several times in a row, each soon after
    /// its start: it is restarted with a growing delay (see
    /// [`PluginState::CrashLoop`](crate::PluginState::CrashLoop)).
    CrashLoop {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// Crashes in a row.
        crashes: u32,
        /// When the next start is tried.
        restart_in_ms: u64,
    },
    /// A socket plugin stopped answering (or never answered since its
    /// load): calls fail with `Unavailable` until it answers again;
    /// reconnection is tried with backoff.
    Unreachable {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// Why, e.g. `cannot connect: unix:/run/p.sock: Connection refused`.
        reason: String,
        /// When the next attempt is made.
        retry_in_ms: u64,
    },
    /// A socket plugin answers (again), or says it implements something
    /// else than before: what its handshake said.
    Reachable {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The protocol it answered in (`jsonrpc`, `docker`, `rest`, `grpc`).
        protocol: String,
        /// What it implements (`Group/0.1.0`, `VolumeDriver`); empty for a
        /// plugin that implements nothing in particular.
        interfaces: Vec<String>,
    },
    /// A registered plugin left the registry: it asked to (`Unregister`),
    /// or missed its probes. It is unloaded next.
    Unregistered {
        /// The plugin.
        plugin: String,
        /// The endpoint it had registered.
        endpoint: String,
        /// Why.
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
            | Event::Leaked { plugin, .. }
            | Event::Pinned { plugin, .. }
            | Event::Crashed { plugin, .. }
            | Event::Restarted { plugin, .. }
            | Event::CrashLoop { plugin, .. }
            | Event::Unreachable { plugin, .. }
            | Event::Reachable { plugin, .. }
            | Event::Unregistered { plugin, .. } => Some(plugin),
            Event::TlsKeysLow { .. } => None,
        }
    }
}

/// The lifecycle events of one manager, from the moment of
/// [`PluginManager::subscribe`](crate::PluginManager::subscribe). Readable
/// with or without an async runtime.
#[derive(Debug)]
pub struct Events {
    inner: tokio::sync::broadcast::Receiver<Event>,
}

/// Why no event was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventsError {
    /// The subscriber fell more than `event_capacity` events behind: this
    /// many were dropped for it. The next receive goes on with the oldest
    /// one kept.
    #[error("{0} event(s) missed: the subscriber fell behind")]
    Lagged(u64),
    /// The manager is gone: no event will come any more.
    #[error("the manager is gone")]
    Closed,
}

impl From<tokio::sync::broadcast::error::RecvError> for EventsError {
    fn from(error: tokio::sync::broadcast::error::RecvError) -> Self {
        use tokio::sync::broadcast::error::RecvError;
        match error {
            RecvError::Lagged(missed) => EventsError::Lagged(missed),
            RecvError::Closed => EventsError::Closed,
        }
    }
}

impl Events {
    pub(crate) fn new(inner: tokio::sync::broadcast::Receiver<Event>) -> Events {
        Events { inner }
    }

    /// The next event, waiting for it (any async runtime).
    ///
    /// # Errors
    /// [`EventsError::Lagged`] after falling behind, [`EventsError::Closed`]
    /// once the manager is gone.
    pub async fn recv(&mut self) -> Result<Event, EventsError> {
        Ok(self.inner.recv().await?)
    }

    /// The next event if one is waiting, `None` otherwise (never blocks).
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub fn try_recv(&mut self) -> Result<Option<Event>, EventsError> {
        use tokio::sync::broadcast::error::TryRecvError;
        match self.inner.try_recv() {
            Ok(event) => Ok(Some(event)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Lagged(missed)) => Err(EventsError::Lagged(missed)),
            Err(TryRecvError::Closed) => Err(EventsError::Closed),
        }
    }

    /// The next event, blocking the thread until it comes. Not for use
    /// inside an async runtime (use [`recv`](Self::recv) there).
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub fn blocking_recv(&mut self) -> Result<Event, EventsError> {
        Ok(self.inner.blocking_recv()?)
    }

    #[cfg(feature = "server")]
    pub(crate) fn into_inner(self) -> tokio::sync::broadcast::Receiver<Event> {
        self.inner
    }
}

/// Where a plugin kind reports what happens to a version after its load
/// (crashes, restarts): the manager's event channel, or nowhere.
#[cfg(feature = "exec")]
#[derive(Debug, Clone, Default)]
pub(crate) struct EventSink(Option<tokio::sync::broadcast::Sender<Event>>);

#[cfg(feature = "exec")]
impl EventSink {
    pub(crate) fn new(sender: tokio::sync::broadcast::Sender<Event>) -> EventSink {
        EventSink(Some(sender))
    }

    pub(crate) fn emit(&self, event: Event) {
        if let Some(sender) = &self.0 {
            // No subscriber is not an error.
            let _ = sender.send(event);
        }
    }
}
