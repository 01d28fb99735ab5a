//! [`Builder`]: the manager's settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::{Inner, PluginManager};
use crate::error::{Error, Result};
use crate::native::{NativeOptions, remove_stale};
use crate::version::LoadOptions;

/// Configures a [`PluginManager`].
#[derive(Debug, Clone)]
pub struct Builder {
    base: PathBuf,
    shadow_dir: Option<PathBuf>,
    pool_size: usize,
    queue_limit: Option<usize>,
    drain_timeout: Duration,
    event_capacity: usize,
    allow_downgrades: bool,
    settle: Duration,
}

impl Builder {
    pub(super) fn new(base: PathBuf) -> Builder {
        Builder {
            base,
            shadow_dir: None,
            pool_size: 2,
            queue_limit: None,
            drain_timeout: Duration::from_secs(30),
            event_capacity: 1024,
            allow_downgrades: false,
            settle: Duration::from_millis(25),
        }
    }

    /// Where shadow copies are written (default `<base>/.dynplug/shadow`).
    /// Must be on a filesystem that allows executable mappings.
    #[must_use]
    pub fn shadow_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shadow_dir = Some(dir.into());
        self
    }

    /// Worker threads per loaded version of a `pooled` plugin (default 2).
    #[must_use]
    pub fn pool_size(mut self, threads: usize) -> Self {
        self.pool_size = threads.max(1);
        self
    }

    /// At most this many calls wait for a worker of a `pooled` version
    /// (beyond the `pool_size` running); a call past that fails at once with
    /// [`Error::Overloaded`] (HTTP 503, gRPC `UNAVAILABLE`) instead of
    /// queueing. Default: no limit (calls queue until their deadline).
    #[must_use]
    pub fn queue_limit(mut self, calls: usize) -> Self {
        self.queue_limit = Some(calls);
        self
    }

    /// How long an unload waits for running calls before reporting the
    /// version as leaked (default 30 s).
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How many events a slow subscriber may lag behind (default 1024).
    #[must_use]
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Whether a version lower than the serving one may replace it (default
    /// `false`: such an upgrade is refused with [`Error::Downgrade`]).
    #[must_use]
    pub fn allow_downgrades(mut self, allow: bool) -> Self {
        self.allow_downgrades = allow;
        self
    }

    /// How long the watcher waits after the last change under a plugin
    /// directory before loading it (default 25 ms, at most an hour); a failed
    /// load is retried once after eight times as long, in case the file was
    /// still being written.
    #[must_use]
    pub fn settle_time(mut self, settle: Duration) -> Self {
        self.settle = settle.min(Duration::from_secs(3600));
        self
    }

    /// Creates the manager.
    ///
    /// # Errors
    /// [`Error::Io`] if the base directory is not a readable directory.
    pub fn build(self) -> Result<PluginManager> {
        let io = |source| Error::Io {
            plugin: String::new(),
            action: "opening plugins directory",
            path: self.base.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.base).map_err(io)?;
        if !meta.is_dir() {
            return Err(io(std::io::Error::other("not a directory")));
        }
        let shadow_dir = self
            .shadow_dir
            .unwrap_or_else(|| self.base.join(".dynplug").join("shadow"));
        remove_stale(&shadow_dir);
        let (events, _) = broadcast::channel(self.event_capacity);
        Ok(PluginManager {
            inner: Arc::new(Inner {
                base: self.base,
                options: LoadOptions {
                    native: NativeOptions {
                        shadow_dir,
                        pool_size: self.pool_size,
                        queue_limit: self.queue_limit,
                    },
                },
                drain_timeout: self.drain_timeout,
                allow_downgrades: self.allow_downgrades,
                settle: self.settle,
                tls_warned: AtomicUsize::new(0),
                slots: RwLock::new(BTreeMap::new()),
                events,
                loading: Mutex::new(()),
                routes: Mutex::new(()),
            }),
        })
    }
}
