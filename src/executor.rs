//! The handle host code calls plugins through.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Context;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::slot::Slot;

/// Calls one plugin. Cheap to clone, `Send + Sync`.
///
/// An executor is bound to the plugin's name, not to one version: each call
/// goes to the version serving at that moment and keeps it alive until the
/// call returns, so upgrades and reloads never fail a call.
#[derive(Clone)]
pub struct Executor {
    slot: Arc<Slot>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("plugin", &self.slot.name)
            .finish()
    }
}

impl Executor {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        Self { slot }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// The manifest of the version serving now, if any.
    pub fn manifest(&self) -> Option<Arc<Manifest>> {
        self.slot
            .current
            .load()
            .as_ref()
            .map(|v| Arc::clone(&v.manifest))
    }

    /// Runs one call, blocking until the plugin answers (or, for `pooled`
    /// plugins, until the context's deadline passes).
    ///
    /// # Errors
    /// [`Error::Plugin`] with the plugin's message, [`Error::Panic`] if it
    /// panicked, [`Error::DeadlineExceeded`] / [`Error::Cancelled`], and
    /// [`Error::Unavailable`] if no version is serving.
    ///
    /// What `ctx` holds afterwards depends only on how far the call got:
    /// * it ran and returned (success, `Plugin`, `Panic`, or `Cancelled` /
    ///   `DeadlineExceeded` reported when the plugin returned): your values
    ///   plus whatever the plugin set;
    /// * it never started (`Unavailable`, `Overloaded`, a deadline already
    ///   past): unchanged, so it can be retried;
    /// * it was abandoned while a worker of a `pooled` plugin ran it
    ///   (`DeadlineExceeded` at the deadline, or a dropped
    ///   [`execute_async`](Self::execute_async) future): only its label,
    ///   cancel token (now cancelled) and deadline; the values stay with the
    ///   call, which ends when the plugin notices the cancellation.
    ///
    /// # Examples
    /// ```no_run
    /// # fn main() -> Result<(), dynplug::Error> {
    /// let manager = dynplug::PluginManager::new("plugins")?;
    /// manager.load_plugins()?;
    /// let (_spec, hello) = manager.get_plugin("hello")?;
    /// let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
    /// hello.execute(&mut ctx)?;
    /// assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
    /// # Ok(()) }
    /// ```
    pub fn execute(&self, ctx: &mut Context) -> Result<()> {
        let current = self.slot.current.load();
        self.counted(|| match current.as_ref() {
            // A deferred version's first calls: loaded here, or on a thread
            // of its own while a caller with a deadline waits until then.
            Some(version) if version.needs_loading() && !version.loaded_within(ctx.deadline()) => {
                Err(Error::DeadlineExceeded {
                    plugin: version.name().to_owned(),
                    label: ctx.label().to_owned(),
                })
            }
            Some(version) => version.execute(ctx),
            None => Err(self.unavailable()),
        })
    }

    /// Runs `call` with the plugin's call counters around it.
    fn counted(&self, call: impl FnOnce() -> Result<()>) -> Result<()> {
        let stats = &self.slot.stats;
        stats.started.fetch_add(1, Ordering::Relaxed);
        let result = call();
        stats.record(&result);
        result
    }

    /// Runs one call without blocking the async runtime: a `pooled` plugin
    /// runs on its workers while this future waits, at most until the
    /// context's deadline (with any executor: the timer is not the
    /// runtime's). `inline` plugins run on the polling thread, by
    /// definition. An `auto` plugin (the default) runs on the polling
    /// thread while its calls of this label have been quick and another
    /// worker of the tokio runtime stays free, on its workers otherwise.
    /// Dropping the future cancels a call on the workers.
    ///
    /// # Errors
    /// As [`execute`](Self::execute), which also says what `ctx` holds
    /// after an error.
    pub async fn execute_async(&self, ctx: &mut Context) -> Result<()> {
        if let Some(result) = self.try_in_place(ctx) {
            return result;
        }
        let stats = &self.slot.stats;
        stats.started.fetch_add(1, Ordering::Relaxed);
        // A dropped future still counts as finished (as an error).
        let guard = AbandonedCall(stats);
        let result = match self.slot.current.load_full() {
            Some(version) if version.needs_loading() => {
                // Boxed: only a deferred version's first calls wait for its
                // load, and every call's future would carry that state.
                let loading = crate::timer::within(ctx.deadline(), version.loaded_off_runtime());
                match Box::pin(loading).await {
                    None => Err(Error::DeadlineExceeded {
                        plugin: version.name().to_owned(),
                        label: ctx.label().to_owned(),
                    }),
                    // Loaded: in place where a loaded version's call would
                    // run (not on workers started for one call).
                    Some(()) => match version.in_place(ctx) {
                        Some(leave) => version.run_in_place(ctx, leave),
                        None => version.execute_async(ctx).await,
                    },
                }
            }
            Some(version) => version.execute_async(ctx).await,
            None => Err(self.unavailable()),
        };
        std::mem::forget(guard);
        stats.record(&result);
        result
    }

    /// Runs the call here and now if the serving version lets it run in
    /// place; `None` leaves `ctx` untouched for the async path. No `Arc`
    /// clone, no future state: the hottest path of the façades.
    fn try_in_place(&self, ctx: &mut Context) -> Option<Result<()>> {
        let current = self.slot.current.load();
        let version = current.as_ref()?;
        let leave = version.in_place(ctx)?;
        Some(self.counted(|| version.run_in_place(ctx, leave)))
    }

    /// Calls handed to the serving version's workers and not finished yet:
    /// queued or running, including calls whose caller gave up (0 for an
    /// `inline` plugin). What `queue_limit` is checked against, with the
    /// workers' own calls.
    pub fn busy(&self) -> usize {
        self.slot.current.load().as_ref().map_or(0, |v| v.busy())
    }

    /// The plugin's call counters.
    pub fn calls(&self) -> crate::CallCounts {
        self.slot.stats.snapshot()
    }

    fn unavailable(&self) -> Error {
        let status = self.slot.status();
        Error::Unavailable {
            plugin: self.slot.name.clone(),
            reason: status
                .error
                .clone()
                .unwrap_or_else(|| format!("plugin is {}", status.state.as_str())),
        }
    }
}

struct AbandonedCall<'a>(&'a crate::slot::CallStats);

impl Drop for AbandonedCall<'_> {
    fn drop(&mut self) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}
