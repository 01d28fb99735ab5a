//! The plugin manager: scans the base directory, loads, serves and unloads plugins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::executor::Executor;
use crate::manifest::{Manifest, is_path_safe};
use crate::origin::Origin;

use crate::slot::{PluginInfo, PluginState, Slot};
use crate::version::{LoadOptions, Version};

mod builder;
mod retire;

pub use builder::Builder;

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
    options: LoadOptions,
    drain_timeout: Duration,
    allow_downgrades: bool,
    pub(crate) settle: Duration,
    tls_warned: AtomicUsize,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    events: broadcast::Sender<Event>,
    /// Held while a version is swapped in, so that parallel loads cannot
    /// both claim a route.
    routes: Mutex<()>,
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
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Loads every plugin directory under the base directory, in parallel.
    /// One plugin failing never stops the others; already loaded plugins are reloaded.
    ///
    /// # Errors
    /// [`Error::Io`] only if the base directory cannot be read; per-plugin
    /// failures are in the report (and emitted as [`Event::Failed`] or
    /// [`Event::UpgradeFailed`]).
    pub fn load_plugins(&self) -> Result<LoadReport> {
        let names = self.scan()?;
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(names.len()));
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(names.len());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some(name) = names.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let result = self.load_one(name);
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((name.clone(), result));
                    }
                });
            }
        });
        let mut report = LoadReport::default();
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, result) in results {
            match result {
                Ok(_) => report.loaded.push(name),
                Err(e) => report.failed.push((name, e)),
            }
        }
        Ok(report)
    }

    /// The entries of the base directory that hold plugins.
    fn scan(&self) -> Result<Vec<String>> {
        let base = &self.inner.base;
        Origin::scan(base).map_err(|source| Error::Io {
            plugin: String::new(),
            action: "reading plugins directory",
            path: base.clone(),
            source,
        })
    }

    /// Loads (or reloads) the plugin in `<base>/<name>`. On a reload the new
    /// version is fully loaded and initialised before it replaces the old one,
    /// which is then drained and unloaded; if the new one fails, the old one
    /// keeps serving.
    ///
    /// # Errors
    /// [`Error::NotFound`] if `<base>/<name>` is not a directory; otherwise why
    /// the plugin could not be loaded (also emitted as [`Event::Failed`], or
    /// [`Event::UpgradeFailed`] when a version keeps serving).
    pub fn load_plugin(&self, name: &str) -> Result<Arc<Manifest>> {
        self.load_one(name)
    }

    fn load_one(&self, name: &str) -> Result<Arc<Manifest>> {
        // A typo must not leave a failed plugin in the listing.
        let not_found = || Error::NotFound {
            plugin: name.to_owned(),
        };
        let slot = match Origin::of_entry(&self.inner.base, name) {
            Some(origin) => self.slot_for(name, origin)?,
            None => self.slot(name).ok_or_else(not_found)?,
        };
        let _ops = slot.ops();
        match self
            .prepare(&slot)
            .and_then(|version| self.install(&slot, version))
        {
            Ok(manifest) => Ok(manifest),
            Err(error) => {
                self.record_failure(&slot, &error);
                Err(error)
            }
        }
    }

    /// The slot of `name`, created for `origin` if new.
    pub(crate) fn slot_for(&self, name: &str, origin: Origin) -> Result<Arc<Slot>> {
        if !is_path_safe(name) {
            return Err(Error::NotFound {
                plugin: name.to_owned(),
            });
        }
        Ok(self.slot_or_insert(name, origin))
    }

    /// Reads, checks and loads the version in the slot's directory, without
    /// touching the serving one.
    pub(crate) fn prepare(&self, slot: &Slot) -> Result<Version> {
        // What is tried now is not tried again by the watcher until it
        // changes, whoever tries it (a scan, `load_plugin`, the watcher).
        slot.status().attempted = Some(slot.origin.fingerprint());
        let manifest = slot.origin.manifest()?;
        if let Some(serving) = slot.current.load().as_ref()
            && manifest.version < serving.manifest.version
            && !self.inner.allow_downgrades
        {
            return Err(Error::Downgrade {
                plugin: slot.name.clone(),
                path: slot.origin.manifest_path(),
                serving: serving.manifest.version.to_string(),
                found: manifest.version.to_string(),
            });
        }
        // Checked early to avoid a useless load, and again at the swap.
        self.check_routes(slot, &manifest)?;
        let started = Instant::now();
        let version = Version::load(manifest, slot.origin.dir(), &self.inner.options)?;
        tracing::debug!(plugin = %slot.name, elapsed = ?started.elapsed(), "loaded and initialised");
        Ok(version)
    }

    /// Refuses a manifest with an HTTP route that overlaps one served by
    /// another serving plugin (the first one keeps it): overlap as the
    /// route table matches, so no request another plugin serves can move.
    /// The plugin's own serving version is not compared: an upgrade may
    /// change its routes.
    fn check_routes(&self, slot: &Slot, manifest: &Manifest) -> Result<()> {
        let mut new = crate::route::RouteIndex::new();
        for (method, pattern, route) in manifest.parsed_routes() {
            new.insert(method, &pattern, route);
        }
        if new.is_empty() {
            return Ok(());
        }
        let serving: Vec<(String, Arc<Manifest>)> = {
            let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .values()
                .filter(|s| s.name != slot.name)
                .filter_map(|s| {
                    Some((s.name.clone(), Arc::clone(&s.current.load_full()?.manifest)))
                })
                .collect()
        };
        // One index of every route served, then one walk of both: about
        // linear in the two route counts, where comparing every pair stalled
        // the watcher for 17 s on one large manifest.
        let mut served = crate::route::RouteIndex::new();
        for (owner, other) in &serving {
            for (method, pattern, _) in other.parsed_routes() {
                served.insert(method, &pattern, owner);
            }
        }
        match new.first_overlap(&served) {
            Some((route, owner)) => Err(Error::RouteConflict {
                plugin: slot.name.clone(),
                path: slot.origin.manifest_path(),
                route: format!("{} {}", route.method, route.route),
                owner: owner.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Swaps `version` in; the one it replaces is drained and unloaded.
    pub(crate) fn install(&self, slot: &Slot, version: Version) -> Result<Arc<Manifest>> {
        let manifest = Arc::clone(&version.manifest);
        let to = manifest.version.to_string();
        let old = {
            // Parallel loads (load_plugins) must not both claim a route.
            let _routes = self.inner.routes.lock().unwrap_or_else(|e| e.into_inner());
            self.check_routes(slot, &manifest)?;
            slot.mark_loaded(&version);
            slot.swap(Some(Arc::new(version)))
        };
        self.check_tls_budget();
        match old {
            Some(old) => {
                let from = old.manifest.version.to_string();
                slot.status().upgrades += 1;
                tracing::info!(plugin = %slot.name, %from, %to, "upgraded");
                self.emit(Event::Upgraded {
                    plugin: slot.name.clone(),
                    from,
                    to,
                });
                self.retire(slot, old);
            }
            None => {
                tracing::info!(plugin = %slot.name, version = %to, "loaded");
                self.emit(Event::Loaded {
                    plugin: slot.name.clone(),
                    version: to,
                });
            }
        }
        Ok(manifest)
    }

    pub(crate) fn record_failure(&self, slot: &Slot, error: &Error) {
        let serving = slot
            .current
            .load()
            .as_ref()
            .map(|v| v.manifest.version.to_string());
        {
            let mut status = slot.status();
            status.error = Some(error.to_string());
            if serving.is_none() {
                status.state = PluginState::Failed;
            }
        }
        match serving {
            Some(still_serving) => {
                tracing::warn!(plugin = %slot.name, %still_serving, "upgrade failed: {error}");
                self.emit(Event::UpgradeFailed {
                    plugin: slot.name.clone(),
                    reason: error.to_string(),
                    still_serving,
                });
            }
            None => {
                tracing::warn!(plugin = %slot.name, "load failed: {error}");
                self.emit(Event::Failed {
                    plugin: slot.name.clone(),
                    error: error.to_string(),
                });
            }
        }
    }

    /// Warns (event and log) when pthread keys run low, every 32 keys past 7/8 of the limit.
    fn check_tls_budget(&self) {
        let Some(in_use) = crate::native::pthread_keys_in_use() else {
            return;
        };
        let limit = crate::native::PTHREAD_KEYS_MAX;
        if in_use < limit - limit / 8 {
            return;
        }
        let step = in_use / 32;
        if self.inner.tls_warned.fetch_max(step, Ordering::Relaxed) < step {
            tracing::warn!(
                in_use,
                limit,
                "pthread keys running low: the process aborts when they run out"
            );
            self.emit(Event::TlsKeysLow { in_use, limit });
        }
    }

    /// pthread keys in use by the process (glibc only), against a limit of
    /// 1024. A lower bound: it is the lowest free key, so a key deleted below
    /// the highest one in use hides the keys above it.
    pub fn tls_keys_in_use(&self) -> Option<usize> {
        crate::native::pthread_keys_in_use()
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

    pub(crate) fn emit(&self, event: Event) {
        // No subscriber is not an error.
        let _ = self.inner.events.send(event);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
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
