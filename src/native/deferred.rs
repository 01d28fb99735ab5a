//! Native plugins loaded on their first call (the manager's
//! `load_on_first_call`): registering one costs its manifest and a look at
//! its library file, so a host with a thousand plugins is ready in tens of
//! milliseconds and maps only the plugins it calls.
//!
//! At registration the library is opened with the same checks as a load
//! (inside the plugin directory, a regular file, writable by nobody else,
//! within `max_library_size`) and closed again. The first call runs the
//! whole checked load (`NativeVersion::load`: image, checksum, signature,
//! header, `dlopen`, ABI, `init`) on the bytes read then; what is verified is
//! still exactly what is loaded. Its outcome is kept: a failed load fails
//! every call with the reason until the plugin is loaded again (a reload, or
//! its files change). The manager defers only where nothing loaded serves:
//! an upgrade of a loaded version is loaded before it replaces it, so a
//! broken upgrade never takes the place of a working one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::{NativeOptions, NativeVersion};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::signing::{Seal, Trust};
use crate::version::Ending;

pub(crate) struct Deferred {
    manifest: Manifest,
    dir: PathBuf,
    options: NativeOptions,
    trust: Arc<Trust>,
    seal: Seal,
    /// Set once, by the first call: the loaded version or why it failed.
    loaded: OnceLock<std::result::Result<NativeVersion, String>>,
    /// A caller with a deadline, or an async one, started a load on a
    /// thread of its own.
    started: AtomicBool,
    /// Wakes the async callers waiting for that load.
    done: tokio::sync::Notify,
    /// Wakes the blocking callers waiting for it until their deadline
    /// (the lock orders their look at `loaded` with the wake-up).
    woken: Condvar,
    waiting: Mutex<()>,
}

impl Deferred {
    /// Registers the plugin after the checks that need no read of the
    /// library's bytes.
    pub(crate) fn new(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        trust: &Arc<Trust>,
        seal: &Seal,
    ) -> Result<Deferred> {
        super::open::check_library_file(manifest, dir, options)?;
        Ok(Deferred {
            manifest: manifest.clone(),
            dir: dir.to_owned(),
            options: options.clone(),
            trust: Arc::clone(trust),
            seal: seal.clone(),
            loaded: OnceLock::new(),
            started: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            woken: Condvar::new(),
            waiting: Mutex::new(()),
        })
    }

    /// The loaded version, if the first call loaded it.
    #[inline]
    pub(crate) fn version(&self) -> Option<&NativeVersion> {
        self.loaded.get()?.as_ref().ok()
    }

    /// Whether no call has tried to load it yet.
    pub(crate) fn is_pending(&self) -> bool {
        self.loaded.get().is_none()
    }

    /// Why the load on the first call failed, if it did.
    pub(crate) fn error(&self) -> Option<&str> {
        self.loaded.get()?.as_ref().err().map(String::as_str)
    }

    /// The loaded version, loading it on this thread if no call did yet
    /// (callers arriving meanwhile wait for that load).
    pub(crate) fn load(&self) -> Result<&NativeVersion> {
        match self.loaded.get_or_init(|| self.load_now()) {
            Ok(version) => Ok(version),
            Err(reason) => Err(Error::Unavailable {
                plugin: self.manifest.name.clone(),
                reason: format!("loading it on its first call failed: {reason}"),
            }),
        }
    }

    /// Whether this caller is the first to want the load done on a thread
    /// of its own (then it runs [`load_and_wake`](Self::load_and_wake)
    /// there).
    pub(crate) fn claim_load(&self) -> bool {
        !self.started.swap(true, Ordering::AcqRel)
    }

    /// Loads (or waits for a blocking caller's load) and wakes the callers
    /// waiting in [`loaded`](Self::loaded) and [`wait_until`](Self::wait_until).
    pub(crate) fn load_and_wake(&self) {
        let _ = self.load();
        drop(self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        self.woken.notify_all();
        self.done.notify_waiters();
    }

    /// Blocks until the load a caller claimed has ended (`true`) or
    /// `deadline` passes (`false`).
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while self.is_pending() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            waiting = self
                .woken
                .wait_timeout(waiting, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Returns once the load an async caller claimed has ended.
    pub(crate) async fn loaded(&self) {
        loop {
            let woken = self.done.notified();
            let mut woken = std::pin::pin!(woken);
            // Listening before looking: a load ending in between still wakes us.
            woken.as_mut().enable();
            if !self.is_pending() {
                return;
            }
            woken.await;
        }
    }

    fn load_now(&self) -> std::result::Result<NativeVersion, String> {
        let plugin = self.manifest.name.as_str();
        let started = Instant::now();
        let check = self.trust.artifact_check(plugin, &self.seal);
        let loaded = NativeVersion::load(
            &self.manifest,
            &self.dir,
            &self.options,
            check.as_ref().map(|c| c as &super::ArtifactCheck<'_>),
        );
        match loaded {
            Ok(version) => {
                tracing::info!(plugin = %plugin, elapsed = ?started.elapsed(), "loaded on its first call");
                Ok(version)
            }
            Err(error) => {
                tracing::warn!(plugin = %plugin, "load on first call failed: {error}");
                Err(error.to_string())
            }
        }
    }

    pub(crate) fn busy(&self) -> usize {
        self.version().map_or(0, NativeVersion::busy)
    }

    /// What the version runs from: its image once loaded, the library
    /// file before.
    pub(crate) fn artifact(&self) -> String {
        match self.version() {
            Some(version) => version.artifact(),
            None => self
                .manifest
                .library_path(&self.dir)
                .map_or_else(String::new, |p| p.display().to_string()),
        }
    }

    /// Ends the version (drained): unloads what the first call loaded.
    pub(crate) fn unload(&mut self) -> Ending {
        match self.loaded.get_mut() {
            Some(Ok(version)) => version.unload(),
            _ => Ending::Unloaded,
        }
    }
}
