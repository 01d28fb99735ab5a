//! Native plugins loaded on their first call (the manager's
//! `load_on_first_call`): registering one costs its manifest and a read of
//! its library's header, so a host with a thousand plugins is ready in
//! about 0.1 s and maps only the plugins it calls.
//!
//! At registration the library is opened with the same checks as a load
//! (inside the plugin directory, a regular file, writable by nobody else,
//! within `max_library_size`), its header is checked (a complete library
//! for this machine, a dynplug root of a compatible ABI), and it is closed
//! again. The first call runs the
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

use super::open::FileId;
use super::{NativeOptions, NativeVersion};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::signing::{Seal, Trust};
use crate::version::Ending;

/// Hears how a deferred version's first load went: `(plugin, version,
/// error, which)`, `None` for a success, `which` the loaded [`Deferred`]'s
/// address (see [`Deferred::is`]); the manager announces it.
#[derive(Clone)]
pub(crate) struct FirstLoad(Arc<HearFirstLoad>);

/// `(plugin, version, error, which)`.
type HearFirstLoad = dyn Fn(&str, &str, Option<&str>, usize) + Send + Sync;

impl FirstLoad {
    pub(crate) fn new(
        f: impl Fn(&str, &str, Option<&str>, usize) + Send + Sync + 'static,
    ) -> FirstLoad {
        FirstLoad(Arc::new(f))
    }

    /// Nobody listens (`verify`).
    pub(crate) fn ignored() -> FirstLoad {
        FirstLoad::new(|_, _, _, _| {})
    }
}

impl std::fmt::Debug for FirstLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FirstLoad")
    }
}

pub(crate) struct Deferred {
    manifest: Manifest,
    dir: PathBuf,
    options: NativeOptions,
    trust: Arc<Trust>,
    seal: Seal,
    /// The library file as registered: a load refuses another one.
    file: FileId,
    /// Replaces a version that was loaded and served (it was idle): an
    /// upgrade of it is loaded before the swap, as of a loaded version.
    proven: bool,
    /// Set once, by the first call: the loaded version or why it failed.
    loaded: OnceLock<std::result::Result<NativeVersion, String>>,
    /// A caller started the load on a thread of its own.
    started: AtomicBool,
    /// Wakes the async callers waiting for that load.
    done: tokio::sync::Notify,
    /// Wakes the blocking callers waiting for it (the lock orders their
    /// look at `loaded` with the wake-up).
    woken: Condvar,
    waiting: Mutex<()>,
}

impl Deferred {
    /// Registers the plugin after the checks that run none of its code
    /// and need no digest (`proven`: it replaces a loaded version).
    pub(crate) fn new(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        (trust, seal): (&Arc<Trust>, &Seal),
        proven: bool,
    ) -> Result<Deferred> {
        // The trust policy's verdicts that need no digest of the library
        // (unsigned where signatures are required, a key not trusted) are
        // given now; the signature is verified by the load, on its bytes.
        trust.precheck(&manifest.name, seal)?;
        let file = super::open::check_library_file(manifest, dir, options)?;
        Ok(Deferred {
            manifest: manifest.clone(),
            dir: dir.to_owned(),
            options: options.clone(),
            trust: Arc::clone(trust),
            seal: seal.clone(),
            file,
            proven,
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

    /// Whether the library file registered is still the one at its path
    /// (one `stat`): an upgrade in place replaces it.
    pub(crate) fn file_still_there(&self) -> bool {
        super::open::is_registered_file(&self.manifest, &self.dir, &self.file)
    }

    /// Whether this is the registration a [`FirstLoad`] hook was told of.
    pub(crate) fn is(&self, which: usize) -> bool {
        std::ptr::from_ref(self) as usize == which
    }

    /// Whether it replaces a version that was loaded (see `proven`).
    pub(crate) fn is_proven(&self) -> bool {
        self.proven
    }

    /// The loaded version, loading it on this thread if no call did yet
    /// (callers arriving meanwhile wait for that load).
    pub(crate) fn load(&self) -> Result<&NativeVersion> {
        let mut loaded_here = false;
        let loaded = self.loaded.get_or_init(|| {
            loaded_here = true;
            self.load_now()
        });
        // Announced once it is what calls and the listing see.
        if loaded_here {
            self.announce(loaded.as_ref().err().map(String::as_str));
        }
        match loaded {
            Ok(version) => Ok(version),
            Err(reason) => Err(Error::Unavailable {
                plugin: self.manifest.name.clone(),
                reason: format!("loading it on its first call failed: {reason}"),
            }),
        }
    }

    /// Whether a caller has claimed its load (it is under way, or over).
    pub(crate) fn load_claimed(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Whether this caller is the first to want the load done on a thread
    /// of its own (then it runs [`load_and_wake`](Self::load_and_wake)
    /// there).
    pub(crate) fn claim_load(&self) -> bool {
        !self.started.swap(true, Ordering::AcqRel)
    }

    /// Loads (or waits for a blocking caller's load) and wakes the callers
    /// waiting in [`loaded`](Self::loaded) and [`wait_until`](Self::wait_until),
    /// whatever happens (a guard wakes them).
    pub(crate) fn load_and_wake(&self) {
        let _wake = Wake(self);
        let _ = self.load();
    }

    /// The claimed load cannot run (no thread for it): that is its outcome.
    pub(crate) fn cannot_load(&self, why: &std::io::Error) {
        let _wake = Wake(self);
        let error = format!(
            "{}: no thread to load {} on: {why}",
            self.manifest.name,
            self.artifact()
        );
        // Announced as a failed load would be (the caller gets it too).
        if self.loaded.set(Err(error.clone())).is_ok() {
            self.announce(Some(&error));
        }
    }

    /// Tells the manager how the first load ended (it announces it if this
    /// version still serves).
    fn announce(&self, error: Option<&str>) {
        let version = self.manifest.version.to_string();
        let which = std::ptr::from_ref(self) as usize;
        (self.options.first_load.0)(&self.manifest.name, &version, error, which);
    }

    /// Blocks until the load a caller claimed has ended (`true`) or
    /// `deadline` passes (`false`).
    pub(crate) fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while self.is_pending() {
            waiting = match deadline {
                None => self.woken.wait(waiting).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.woken
                        .wait_timeout(waiting, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
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

    /// [`try_load`](Self::try_load); a panic is its failure: the load must
    /// end for its waiters.
    fn load_now(&self) -> std::result::Result<NativeVersion, String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.try_load())).unwrap_or_else(
            |panic| {
                let error = format!(
                    "{}: loading {} panicked: {}",
                    self.manifest.name,
                    self.artifact(),
                    panic_text(&*panic)
                );
                tracing::warn!(plugin = %self.manifest.name, "{error}");
                Err(error)
            },
        )
    }

    fn try_load(&self) -> std::result::Result<NativeVersion, String> {
        let plugin = self.manifest.name.as_str();
        let started = Instant::now();
        let check = self.trust.artifact_check(plugin, &self.seal);
        // The file registered, checked on the descriptor the load reads:
        // another one put there since is a reload's (the watcher's) to load.
        let loaded = NativeVersion::load_registered(
            &self.manifest,
            &self.dir,
            &self.options,
            check.as_ref().map(|c| c as &super::ArtifactCheck<'_>),
            &self.file,
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

/// A panic's message, as far as it is text.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Wakes a deferred version's waiters when dropped.
struct Wake<'a>(&'a Deferred);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        let deferred = self.0;
        // Taken once: a blocking waiter that saw the load pending is
        // waiting by now.
        drop(deferred.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        deferred.woken.notify_all();
        deferred.done.notify_waiters();
    }
}
