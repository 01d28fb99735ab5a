//! The plugin manager: scans the base directory, loads, serves and unloads plugins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::event::{Event, Events};
use crate::executor::Executor;
use crate::manifest::Manifest;
use crate::origin::Origin;

use crate::slot::{PluginInfo, Slot};
use crate::version::{LoadOptions, Version};

mod builder;
#[cfg(feature = "exec")]
mod found;
mod idle;
mod load;
mod retire;

pub use builder::Builder;
pub(crate) use load::Next;

/// What [`PluginManager::load_plugins`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct LoadReport {
    /// Plugins loaded, by name, sorted.
    pub loaded: Vec<String>,
    /// Plugins that failed, each with its error, sorted by name.
    pub failed: Vec<(String, Error)>,
}

/// Loads plugins from a base directory and hands out [`Executor`]s.
///
/// Cheap to clone: clones share the same plugins.
#[derive(Clone)]
pub struct PluginManager {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    base: PathBuf,
    /// Where packages are unpacked for a load (`<base>/.dynplug/unpacked`).
    unpack_root: PathBuf,
    /// Which plugin each package file holds.
    packages: crate::origin::PackageIndex,
    options: LoadOptions,
    drain_timeout: Duration,
    allow_downgrades: bool,
    pub(crate) settle: Duration,
    tls_warned: AtomicUsize,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    events: broadcast::Sender<Event>,
    /// Lifecycle events emitted so far: what a view built from the
    /// manager's state (the façades' route table) compares to know it is
    /// current.
    changes: AtomicU64,
    /// Held while a version is swapped in, so that parallel loads cannot
    /// both claim a route; holds the index of the routes served.
    routes: Mutex<load::ServedRoutes>,
    /// The thread unloading idle versions (`unload_idle_after`), woken to
    /// end with the manager.
    idle_reaper: std::sync::OnceLock<std::thread::Thread>,
}

impl std::fmt::Debug for PluginManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginManager")
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl PluginManager {
    /// A manager for the plugins under `base`, with default settings.
    ///
    /// # Errors
    /// [`Error::Io`] if `base` is not a readable directory.
    pub fn new(base: impl Into<PathBuf>) -> Result<PluginManager> {
        Self::builder(base).build()
    }

    /// A [`Builder`] for the plugins under `base`.
    pub fn builder(base: impl Into<PathBuf>) -> Builder {
        Builder::new(base.into())
    }

    /// The base directory.
    pub fn base_dir(&self) -> &Path {
        &self.inner.base
    }

    /// Receives every lifecycle event from now on.
    pub fn subscribe(&self) -> Events {
        Events::new(self.inner.events.subscribe())
    }

    /// pthread keys in use by the process (glibc only), against a limit of
    /// 1024. A lower bound: it is the lowest free key, so a key deleted below
    /// the highest one in use hides the keys above it.
    pub fn tls_keys_in_use(&self) -> Option<usize> {
        crate::native::pthread_keys_in_use()
    }

    /// Whether this process lets dynplug see what plugin code leaves on
    /// threads (see [`THREAD_TRACKING_LINK_ARG`](crate::THREAD_TRACKING_LINK_ARG)):
    /// then code that ran on callers' threads (`inline`, `auto`) is unloaded
    /// once no thread holds state of it, and replaced versions give their
    /// pthread keys back. Otherwise `auto` plugins run on their own workers,
    /// replaced `inline` versions are retained, and each version of a plugin
    /// calling `std::thread::current()` keeps one of glibc's 1,024 keys.
    pub fn tracks_threads(&self) -> bool {
        crate::native::thread_tracking().is_ok()
    }

    fn slot_or_insert(&self, name: &str, origin: Origin) -> Arc<Slot> {
        if let Some(slot) = self.slot(name) {
            return slot;
        }
        let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            slots
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Slot::new(name.to_owned(), origin))),
        )
    }

    pub(crate) fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(name).cloned()
    }

    /// The manifest and an executor of a loaded plugin.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown name, [`Error::Unavailable`] if the
    /// plugin is known but not serving (failed or unloaded).
    pub fn get_plugin(&self, name: &str) -> Result<(Arc<Manifest>, Executor)> {
        let slot = self.slot(name).ok_or_else(|| Error::NotFound {
            plugin: name.to_owned(),
        })?;
        let executor = Executor::new(slot);
        let manifest = executor.manifest().ok_or_else(|| {
            let info = self.info(name);
            Error::Unavailable {
                plugin: name.to_owned(),
                reason: info
                    .and_then(|i| i.error.or(Some(format!("plugin is {}", i.state.as_str()))))
                    .unwrap_or_default(),
            }
        })?;
        Ok((manifest, executor))
    }

    /// Every plugin the manager knows, sorted by name.
    pub fn list(&self) -> Vec<PluginInfo> {
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.values().map(|s| s.info()).collect()
    }

    /// One plugin's row of [`list`](Self::list).
    pub fn info(&self, name: &str) -> Option<PluginInfo> {
        self.slot(name).map(|s| s.info())
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> PluginManager {
        PluginManager { inner }
    }

    /// How many lifecycle events the manager has emitted: a view of its
    /// state built after reading this is current until it changes.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn changes(&self) -> u64 {
        self.inner.changes.load(Ordering::Acquire)
    }

    pub(crate) fn emit(&self, event: Event) {
        // Counted before it is sent: whoever hears the event sees the count.
        self.inner.changes.fetch_add(1, Ordering::AcqRel);
        // No subscriber is not an error.
        let _ = self.inner.events.send(event);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(reaper) = self.idle_reaper.get() {
            reaper.unpark();
        }
        // Every version ends here (drained by Arc: one with a call in flight
        // ends when that call returns). Executors that outlive the manager
        // answer Unavailable.
        let slots = std::mem::take(self.slots.get_mut().unwrap_or_else(|e| e.into_inner()));
        for slot in slots.into_values() {
            drop(slot.swap(None));
        }
    }
}

/// Checks a plugin directory without running the plugin: its manifest and
/// its artifact. For a native plugin, the artifact's checksum and header and
/// its ABI: the library is loaded from a private image and closed again;
/// neither `init` nor `execute` is called (the library's own constructors
/// run once its header passed the checks). For an exec plugin, the
/// executable (a regular file with an execute bit, within the size limit),
/// its checksums, and that it is an ELF for this machine or a `#!` script
/// whose interpreter exists; no process is started.
///
/// # Errors
/// The first problem found, as the manager would report it at load.
pub fn verify(dir: impl AsRef<Path>) -> Result<Manifest> {
    verify_report(dir).map(|verified| verified.manifest)
}

/// What [`verify_report`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Verified {
    /// The manifest, checked.
    pub manifest: Manifest,
    /// What was checked beyond the manifest, in words (what `dynplug
    /// verify` prints).
    pub checked: String,
}

/// [`verify`], saying what was checked.
///
/// # Errors
/// As [`verify`].
pub fn verify_report(dir: impl AsRef<Path>) -> Result<Verified> {
    let dir = dir.as_ref();
    let manifest = Manifest::from_dir(dir)?;
    // `verify .` must put a fallback copy beside the plugin, not inside it.
    let dir = &dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let parent = dir.parent().unwrap_or(Path::new("."));
    let options = PluginManager::builder(parent).load_options();
    let checked = Version::verify(&manifest, dir, &options)?;
    Ok(Verified { manifest, checked })
}
