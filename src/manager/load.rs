//! The load path: from a plugin's entry in the plugins directory to a
//! version serving calls. `load_plugins` and `load_plugin` (and the watcher,
//! through `sync_entry`) all go `slot_for` → `prepare` (manifest, version
//! policy, routes, `Version::load`: checked, started, ready) → `install`
//! (the swap; the version it replaces goes down the unload path in
//! `retire.rs`), or `record_failure`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{LoadReport, PluginManager};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::manifest::{Manifest, is_path_safe};
use crate::origin::Origin;
use crate::slot::{PluginState, Slot};
use crate::version::{Defer, Version};

/// How many plugins `load_plugins` loads at once.
const LOADERS: usize = 16;

/// The routes of every serving plugin, indexed by owner, kept as plugins are
/// installed: checking a new plugin's routes against it costs about its own
/// routes plus the index's, once, where building the index for every load
/// made loading 1,000 plugins quadratic (370 µs per load at 1,000 plugins,
/// twice per load). Dropped (rebuilt on demand) when a version with routes
/// goes out of service or is replaced.
#[derive(Default)]
pub(crate) struct ServedRoutes {
    index: Option<crate::route::RouteIndex<String>>,
}

impl ServedRoutes {
    /// A version with routes stopped serving: the index no longer says
    /// what is served.
    pub(crate) fn forget(&mut self) {
        self.index = None;
    }
}

/// What the watcher does after syncing a plugin.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Done,
    /// Try again once the files had time to settle (this was attempt N).
    Retry(u32),
}

impl PluginManager {
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
        // More loaders than cores: a load mostly waits (on the disk, on
        // dlopen's lock, on an `init` that may hang until `init_timeout`),
        // and a few slow plugins must not hold up all the others.
        let threads = LOADERS.min(names.len());
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

    /// The plugins the entries of the base directory hold, sorted.
    fn scan(&self) -> Result<Vec<String>> {
        let base = &self.inner.base;
        let entries = Origin::scan(base).map_err(|source| Error::Io {
            plugin: String::new(),
            action: "reading plugins directory",
            path: base.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|entry| self.plugin_of_entry(entry))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The plugin an entry of the base directory holds, or held.
    pub(crate) fn plugin_of_entry(&self, entry: &str) -> Option<String> {
        self.inner.packages.plugin_of(&self.inner.base, entry)
    }

    /// Whether the plugins directory holds `name` (a directory or a package).
    #[cfg(feature = "server")]
    pub(crate) fn holds(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    /// Where the plugin `name` comes from now (see [`Origin::locate`]).
    pub(super) fn locate(&self, name: &str) -> Option<Origin> {
        Origin::locate(&self.inner.base, name, &self.inner.packages)
    }

    /// Loads (or reloads) the plugin `name`: the directory `<base>/<name>`,
    /// or its newest package `<base>/<name>-VERSION.plg`. On a reload the new
    /// version is fully loaded and initialised before it replaces the old one,
    /// which is then drained and unloaded; if the new one fails, the old one
    /// keeps serving.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such directory or package; otherwise why
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
        let slot = match self.locate(name) {
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
        let slot = self.slot_or_insert(name, origin.clone());
        let held = slot.origin();
        if !held.same_source(&origin) {
            return Err(Error::NameTaken {
                plugin: name.to_owned(),
                by: held.describe(),
            });
        }
        Ok(slot)
    }

    /// Reads, checks and loads the version in the slot's directory, without
    /// touching the serving one.
    pub(crate) fn prepare(&self, slot: &Slot) -> Result<Version> {
        self.prepare_as(slot, None)
    }

    /// [`prepare`](Self::prepare) of the replacement of a loaded version
    /// that was idle: deferred to its next call, and upgraded as a loaded
    /// version is; only from the files with the fingerprint `files` (those
    /// the idle version was loaded from).
    pub(super) fn prepare_deferred(&self, slot: &Slot, files: u64) -> Result<Version> {
        self.prepare_as(slot, Some(files))
    }

    /// `after_idle`: see [`prepare_deferred`](Self::prepare_deferred).
    fn prepare_as(&self, slot: &Slot, after_idle: Option<u64>) -> Result<Version> {
        // A found plugin keeps its finder's origin; the plugins directory's
        // are located anew (a directory or its newest package).
        let origin = match slot.origin() {
            found @ Origin::Found(_) => found,
            _ => self.locate(&slot.name).ok_or_else(|| Error::NotFound {
                plugin: slot.name.clone(),
            })?,
        };
        slot.set_origin(origin.clone());
        // What is tried now is not tried again by the watcher until it
        // changes, whoever tries it (a scan, `load_plugin`, the watcher).
        let fingerprint = origin.fingerprint();
        if after_idle.is_some_and(|files| files != fingerprint) {
            // Changed since: the watcher's (or a reload's) to load, eagerly.
            return Err(Error::Unavailable {
                plugin: slot.name.clone(),
                reason: "its files changed since it was loaded".into(),
            });
        }
        slot.status().attempted = Some(fingerprint);
        let limits =
            crate::package::Limits::for_library(self.inner.options.native.max_library_size);
        let opened = origin.open(&self.inner.unpack_root, limits)?;
        let manifest = opened.manifest.clone();
        if manifest.name != slot.name {
            return Err(Error::Package {
                plugin: slot.name.clone(),
                path: origin.path().to_owned(),
                message: format!("holds plugin `{}`, not `{}`", manifest.name, slot.name),
            });
        }
        if let Some(serving) = slot.current.load().as_ref()
            && manifest.version < serving.manifest.version
            && !self.inner.allow_downgrades
        {
            return Err(Error::Downgrade {
                plugin: slot.name.clone(),
                path: origin.manifest_path(),
                serving: serving.manifest.version.to_string(),
                found: manifest.version.to_string(),
            });
        }
        // Checked early to avoid a useless load, and again at the swap.
        self.check_routes(slot, &manifest)?;
        let started = Instant::now();
        // An upgrade of a version that has served calls is loaded before
        // it replaces it (which keeps serving if the new one fails); where
        // nothing was loaded yet (a first load, or a version still waiting
        // for its first call or whose first load failed), nothing working
        // can be lost, and the new version is deferred as well.
        let defer = if after_idle.is_some() {
            Defer::AfterIdle
        } else if self.inner.options.load_on_first_call
            && slot
                .current
                .load()
                .as_ref()
                .is_none_or(|serving| serving.awaits_first_load())
        {
            Defer::FirstCall
        } else {
            Defer::No
        };
        let mut version = Version::load(
            manifest,
            &opened.seal,
            opened.dir(),
            &self.inner.options,
            defer,
        )?;
        // Registered again after an idle unload, it serves as proven: what
        // it registered must be the files it was loaded from, not ones
        // that replaced them while it read them.
        if after_idle.is_some() && origin.fingerprint() != fingerprint {
            return Err(Error::Unavailable {
                plugin: slot.name.clone(),
                reason: "its files changed while they were registered again".into(),
            });
        }
        version.files = Some(fingerprint);
        // A native version runs from its own image: the package's unpacked
        // copy goes now. An exec version keeps it (its working directory).
        version.keep_files(opened.into_unpacked());
        tracing::debug!(plugin = %slot.name, elapsed = ?started.elapsed(), "loaded and initialised");
        Ok(version)
    }

    /// Refuses a manifest with an HTTP route that overlaps one served by
    /// another serving plugin (the first one keeps it): overlap as the
    /// route table matches, so no request another plugin serves can move.
    /// The plugin's own serving version is not compared: an upgrade may
    /// change its routes.
    fn check_routes(&self, slot: &Slot, manifest: &Manifest) -> Result<()> {
        let mut served = self.inner.routes.lock().unwrap_or_else(|e| e.into_inner());
        self.check_routes_locked(slot, manifest, &mut served)
    }

    fn check_routes_locked(
        &self,
        slot: &Slot,
        manifest: &Manifest,
        served: &mut ServedRoutes,
    ) -> Result<()> {
        let mut new = crate::route::RouteIndex::new();
        for (method, pattern, route) in manifest.parsed_routes() {
            new.insert(method, &pattern, route);
        }
        if new.is_empty() {
            return Ok(());
        }
        let serving_routes = slot
            .current
            .load()
            .as_ref()
            .is_some_and(|v| v.manifest.parsed_routes().next().is_some());
        // One walk of both indexes: about linear in the two route counts,
        // where comparing every pair stalled the watcher for 17 s on one
        // large manifest.
        let overlap = if serving_routes {
            // An upgrade of a plugin that serves routes: its own must not
            // count, and the shared index has them.
            let others = self.served_index(Some(&slot.name));
            new.first_overlap(&others)
                .map(|(route, owner)| (format!("{} {}", route.method, route.route), owner.clone()))
        } else {
            let index = served.index.get_or_insert_with(|| self.served_index(None));
            new.first_overlap(index)
                .map(|(route, owner)| (format!("{} {}", route.method, route.route), owner.clone()))
        };
        match overlap {
            Some((route, owner)) => Err(Error::RouteConflict {
                plugin: slot.name.clone(),
                path: slot.origin().manifest_path(),
                route,
                owner,
            }),
            None => Ok(()),
        }
    }

    /// The routes of every serving plugin but `except`, indexed by owner.
    fn served_index(&self, except: Option<&str>) -> crate::route::RouteIndex<String> {
        let serving: Vec<(String, Arc<Manifest>)> = {
            let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .values()
                .filter(|s| Some(s.name.as_str()) != except)
                .filter_map(|s| {
                    Some((s.name.clone(), Arc::clone(&s.current.load_full()?.manifest)))
                })
                .collect()
        };
        let mut index = crate::route::RouteIndex::new();
        for (owner, manifest) in &serving {
            for (method, pattern, _) in manifest.parsed_routes() {
                index.insert(method, &pattern, owner.clone());
            }
        }
        index
    }

    /// Swaps `version` in; the one it replaces is drained and unloaded.
    pub(crate) fn install(&self, slot: &Slot, version: Version) -> Result<Arc<Manifest>> {
        let manifest = Arc::clone(&version.manifest);
        let to = manifest.version.to_string();
        // Until this version is announced: its first load, which may end
        // any time after the swap, is announced after it.
        let announcing = slot.announce();
        let old = {
            // Parallel loads (load_plugins) must not both claim a route.
            let mut served = self.inner.routes.lock().unwrap_or_else(|e| e.into_inner());
            self.check_routes_locked(slot, &manifest, &mut served)?;
            slot.mark_loaded(&version);
            let old = slot.swap(Some(Arc::new(version)));
            let had_routes = old
                .as_ref()
                .is_some_and(|v| v.manifest.parsed_routes().next().is_some());
            match &mut served.index {
                _ if had_routes => served.forget(),
                Some(index) => {
                    for (method, pattern, _) in manifest.parsed_routes() {
                        index.insert(method, &pattern, slot.name.clone());
                    }
                }
                None => {}
            }
            old
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
                drop(announcing);
                self.retire(slot, old);
            }
            None => {
                let deferred = slot
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|v| v.needs_loading());
                if deferred {
                    tracing::info!(plugin = %slot.name, version = %to, "registered; loads on its first call");
                } else {
                    tracing::info!(plugin = %slot.name, version = %to, "loaded");
                }
                self.emit(Event::Loaded {
                    plugin: slot.name.clone(),
                    version: to,
                });
            }
        }
        Ok(manifest)
    }

    pub(crate) fn record_failure(&self, slot: &Slot, error: &Error) {
        // A version never loaded whose library the failed upgrade replaced
        // in place could never load: nothing working is kept, and the
        // plugin is listed with this failure, not as deferred.
        if slot
            .current
            .load()
            .as_ref()
            .is_some_and(|v| v.lost_its_file())
            && let Some(old) = slot.swap(None)
        {
            self.retire(slot, old);
        }
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

    /// A deferred version's first call has loaded it (announced as
    /// `Loaded`, with the pthread-key check every load makes) or failed to
    /// (`Failed`). Only for the version in service (`which`): one replaced
    /// while it loaded is no news.
    pub(crate) fn loaded_on_first_call(
        &self,
        plugin: &str,
        version: &str,
        error: Option<&str>,
        which: usize,
    ) {
        let Some(slot) = self.slot(plugin) else {
            return;
        };
        let _announcing = slot.announce();
        if !slot
            .current
            .load()
            .as_ref()
            .is_some_and(|serving| serving.is_deferred(which))
        {
            tracing::debug!(plugin, version, "replaced while it loaded: not announced");
            return;
        }
        let plugin = plugin.to_owned();
        match error {
            None => {
                self.check_tls_budget();
                self.emit(Event::Loaded {
                    plugin,
                    version: version.to_owned(),
                });
            }
            Some(error) => self.emit(Event::Failed {
                plugin,
                error: error.to_owned(),
            }),
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

    /// Brings the plugins an entry of the plugins directory holds (or held)
    /// in line with it.
    pub(crate) fn sync_entry(&self, entry: &str, attempt: u32) -> Next {
        let Some(name) = self.plugin_of_entry(entry) else {
            return Next::Done;
        };
        if name != entry {
            // A package first seen half-written was listed under its file
            // name; now that its manifest names the plugin, forget that.
            self.forget_or_unload(entry);
        }
        self.sync_plugin(&name, attempt)
    }

    /// Loads, upgrades or unloads `name` as its directory and packages say.
    fn sync_plugin(&self, name: &str, attempt: u32) -> Next {
        let Some(origin) = self.locate(name) else {
            self.forget_or_unload(name);
            return Next::Done;
        };
        let fingerprint = origin.fingerprint();
        let Ok(slot) = self.slot_for(name, origin) else {
            return Next::Done;
        };
        let _ops = slot.ops();
        if attempt == 0 && slot.status().attempted == Some(fingerprint) {
            return Next::Done;
        }
        match self
            .prepare(&slot)
            .and_then(|version| self.install(&slot, version))
        {
            Ok(_) => Next::Done,
            Err(error) if attempt == 0 && error.may_be_partial_write() => {
                tracing::debug!(
                    plugin = name,
                    "load failed, retrying once the files settle: {error}"
                );
                // Not concluded: a change noticed meanwhile must try again, not
                // be skipped as already tried.
                slot.status().attempted = None;
                Next::Retry(attempt)
            }
            Err(error) => {
                self.record_failure(&slot, &error);
                Next::Done
            }
        }
    }
}
