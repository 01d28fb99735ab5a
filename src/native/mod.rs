//! Native plugins: a `cdylib` loaded from a private image, called in place
//! (`inline`), on its own workers (`pooled`), or in place while that is
//! cheap and harmless and on its workers otherwise (`auto`, the default),
//! and truly unloaded when it is replaced or removed.
//!
//! Load sequence (see `docs/internals.md`): read the artifact (a regular
//! file, bounded) → verify its sha256 → check the header from the bytes
//! (format, architecture, root symbol, magic, ABI version) → put the bytes in
//! an image nobody else can write (a sealed memfd on Linux) → `dlopen` it
//! (`RTLD_NOW | RTLD_LOCAL`) → check the loaded header and the layout →
//! `init` on a helper thread, bounded by `init_timeout`. Workers start when
//! calls need them. Unload: (the caller has drained calls) → `shutdown`,
//! bounded → join the workers → once no thread holds state of its code
//! (`pins`), delete its pthread keys, `dlclose`, and ask the loader whether
//! it is gone.
//!
//! The modules: `open` (the checked load), `call` (where calls run),
//! `placement` (the rule for `auto`), `pool` (workers), `pins` (what plugin
//! code leaves on threads), `ffi` (the only `unsafe`: the library handle,
//! the host callbacks, and `ffi::interpose`), `image`, `header`.

mod call;
mod deferred;
mod ffi;
mod header;
mod image;
mod open;
mod pins;
mod placement;
mod pool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use call::InPlace;
pub(crate) use deferred::{Deferred, FirstLoad};
use ffi::Library;
pub(crate) use ffi::{PTHREAD_KEYS_MAX, pthread_keys_in_use};
#[cfg(feature = "exec")]
pub(crate) use header::host_architecture;
use image::Image;
pub(crate) use image::remove_stale;
#[cfg(feature = "exec")]
pub(crate) use open::read_checked;
pub(crate) use open::{ArtifactCheck, inspect, verify};
use pins::Retired;
use placement::Placement;
use pool::{Pool, Stuck};

use crate::error::{Error, Result};
use crate::manifest::{Isolation, Manifest};
use crate::version::{Ending, Outcome};

enum Runner {
    /// On the caller's thread.
    Inline,
    /// On the version's own workers.
    Pooled(Pool),
    /// In place while the call is quick and a runtime worker stays free, on
    /// the version's workers otherwise (`placement`).
    Auto {
        pool: Pool,
        placement: Arc<Placement>,
    },
}

pub(crate) struct NativeVersion {
    plugin: String,
    version: String,
    library: Option<Arc<Library>>,
    runner: Runner,
    image: Option<Image>,
    shutdown_timeout: Duration,
    late: LateEnding,
    ending: Option<Ending>,
}

/// `(plugin, version, ending)`.
type HearEnding = dyn Fn(&str, &str, Ending) + Send + Sync;

/// Hears how a version ended when that was decided after its unload
/// returned (it was pinned).
#[derive(Clone)]
pub(crate) struct LateEnding(Arc<HearEnding>);

impl LateEnding {
    pub(crate) fn new(f: impl Fn(&str, &str, Ending) + Send + Sync + 'static) -> LateEnding {
        LateEnding(Arc::new(f))
    }

    /// Nobody listens (`verify`).
    pub(crate) fn ignored() -> LateEnding {
        LateEnding::new(|_, _, _| {})
    }
}

impl std::fmt::Debug for LateEnding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateEnding")
    }
}

/// Settings the manager passes to every native load.
#[derive(Debug, Clone)]
pub(crate) struct NativeOptions {
    /// Where private copies go when a memfd cannot be used.
    pub(crate) shadow_dir: PathBuf,
    pub(crate) pool_size: usize,
    pub(crate) queue_limit: Option<usize>,
    pub(crate) max_library_size: u64,
    pub(crate) init_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) late: LateEnding,
    /// Hears how a deferred version's first load went.
    pub(crate) first_load: FirstLoad,
}

/// Whether this process sees what plugin code leaves on threads, which is
/// what lets code that ran on callers' threads be unloaded (see `pins`):
/// `Err` says why not (the C functions the executable does not export).
pub(crate) fn thread_tracking() -> std::result::Result<(), String> {
    if pins::tracking() {
        Ok(())
    } else if pins::switched_off() {
        Err("DYNPLUG_THREAD_TRACKING is off".into())
    } else {
        Err(format!(
            "this executable does not export {}",
            ffi::interpose::missing_exports().join(", ")
        ))
    }
}

impl NativeVersion {
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        check: Option<&ArtifactCheck<'_>>,
    ) -> Result<NativeVersion> {
        let opened = open::open_checked(manifest, dir, options, check, None)?;
        Self::start(manifest, options, opened)
    }

    /// [`load`](Self::load) of the library file `registered`, and no other
    /// (a deferred version's load).
    fn load_registered(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        check: Option<&ArtifactCheck<'_>>,
        registered: &open::FileId,
    ) -> Result<NativeVersion> {
        let opened = open::open_checked(manifest, dir, options, check, Some(registered))?;
        Self::start(manifest, options, opened)
    }

    /// Loads a library from `bytes` already read (by the host, for a
    /// `process` plugin's runner): the same checks, image, `dlopen`, layout
    /// check and `init` as [`load`](Self::load), on exactly those bytes.
    #[cfg(feature = "exec")]
    pub(crate) fn load_bytes(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        bytes: Vec<u8>,
    ) -> Result<NativeVersion> {
        let path = manifest
            .library_path(dir)
            .expect("local_so always has a library path");
        // The signature, if any, was checked by the host on these bytes.
        let checked = open::check_bytes(manifest, &path, &bytes, None)?;
        let opened = open::open_bytes(manifest, &path, dir, options, bytes, &checked)?;
        Self::start(manifest, options, opened)
    }

    /// Starts the workers of an opened library and runs `init`.
    fn start(
        manifest: &Manifest,
        options: &NativeOptions,
        (library, image): (Library, Image),
    ) -> Result<NativeVersion> {
        let plugin = manifest.name.clone();
        let library = Arc::new(library);
        let pool = |placement| {
            Pool::new(
                &plugin,
                &library,
                options.pool_size,
                options.queue_limit,
                placement,
            )
        };
        let runner = match manifest.isolation {
            Isolation::Inline => Runner::Inline,
            // Without tracking, code that ran on a caller's thread can never
            // be closed: `auto` then runs everything on its workers.
            Isolation::Auto if library.lib().is_some() => {
                let placement = Arc::new(Placement::default());
                Runner::Auto {
                    pool: pool(Some(Arc::clone(&placement))),
                    placement,
                }
            }
            _ => Runner::Pooled(pool(None)),
        };
        let mut version = NativeVersion {
            plugin: plugin.clone(),
            version: manifest.version.to_string(),
            library: Some(library),
            runner,
            image: Some(image),
            shutdown_timeout: options.shutdown_timeout,
            late: options.late.clone(),
            ending: None,
        };
        // No `init`, nothing to run: no thread to hand it to (a hop costs
        // 50 µs on an idle machine, milliseconds on a busy one).
        if !version.library.as_ref().is_some_and(|l| l.has_init()) {
            return Ok(version);
        }
        let config = manifest.config_value();
        let timeout = options.init_timeout;
        let message = match version.on_thread(timeout, move |lib| lib.init(&config)) {
            Ok(Outcome::Ok) => return Ok(version),
            Ok(Outcome::Error(message)) => message,
            Ok(Outcome::Panic(message)) => format!("panicked: {message}"),
            Err(Stuck::Stopped) => "worker pool stopped".into(),
            Err(Stuck::TimedOut) => {
                version.ending = Some(version.abandon("init never returned"));
                format!(
                    "did not return within {timeout:?} (init_timeout); the version stays \
                     loaded with its thread blocked in the plugin"
                )
            }
        };
        // init did not succeed, so shutdown is not called.
        if version.ending.is_none() {
            version.ending = Some(version.close());
        }
        Err(Error::Init { plugin, message })
    }

    /// Runs `f` where the host runs plugin code outside calls (`init`,
    /// `shutdown`), waiting at most `timeout`: a helper thread when plugin
    /// threads are tracked; otherwise a thread that is gone before the
    /// library is closed (a worker, joined at unload; for `inline`, a thread
    /// of its own).
    fn on_thread<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&Library) -> T + Send + 'static,
    ) -> Result<T, Stuck> {
        let library = self.library.as_ref().ok_or(Stuck::Stopped)?;
        // The closure lets go of the library before it answers, so that
        // the one who closes it finds the last reference.
        let library = Arc::clone(library);
        let run = move || {
            let out = f(&library);
            drop(library);
            out
        };
        match &self.runner {
            _ if self.tracked() => pool::on_helper(timeout, run),
            Runner::Pooled(pool) | Runner::Auto { pool, .. } => pool.run(timeout, move |_| run()),
            Runner::Inline => {
                // Not the caller's thread: a hanging `init` must not hold it
                // (it may hold the plugin's lock). A thread that never
                // returns keeps its `Arc`, so the library is never closed.
                let (tx, rx) = crossbeam_channel::bounded(1);
                std::thread::Builder::new()
                    .name(format!("dynplug-{}-host", self.plugin))
                    .spawn(move || {
                        let _ = tx.send(run());
                    })
                    .map_err(|_| Stuck::Stopped)?;
                rx.recv_timeout(timeout).map_err(|e| match e {
                    crossbeam_channel::RecvTimeoutError::Timeout => Stuck::TimedOut,
                    crossbeam_channel::RecvTimeoutError::Disconnected => Stuck::Stopped,
                })
            }
        }
    }

    /// Whether `pins` follows this version's library.
    fn tracked(&self) -> bool {
        self.library.as_ref().is_some_and(|l| l.lib().is_some())
    }

    /// Gives up on a version whose thread is stuck in plugin code: nothing is
    /// joined or closed; its code and image stay for the life of the process.
    fn abandon(&mut self, why: &str) -> Ending {
        if let Runner::Pooled(pool) | Runner::Auto { pool, .. } = &mut self.runner {
            pool.abandon();
        }
        std::mem::forget(self.library.take());
        if let Some(image) = self.image.take() {
            image.release(true);
        }
        Ending::Leaked(format!(
            "{why} within the time allowed; its code stays mapped"
        ))
    }

    /// Calls still queued or running on the workers, including calls whose
    /// caller stopped waiting.
    pub(crate) fn busy(&self) -> usize {
        match &self.runner {
            Runner::Inline => 0,
            Runner::Pooled(pool) | Runner::Auto { pool, .. } => pool.busy(),
        }
    }

    /// The image the version runs from, as messages name it.
    pub(crate) fn artifact(&self) -> String {
        self.image
            .as_ref()
            .map_or_else(String::new, Image::describe)
    }

    /// Whether unloading it unmaps its code (or pins it, with the threads
    /// named): `inline` code in a host without thread tracking is retained
    /// instead.
    pub(crate) fn unloads_fully(&self) -> bool {
        !matches!(self.runner, Runner::Inline)
            || self.library.as_ref().is_some_and(|l| l.lib().is_some())
    }

    /// Ends the version: `shutdown`, join the workers, then close the
    /// library once nothing holds it (`Ending::Pinned` until then; the
    /// final ending goes to `LateEnding`). The caller has drained the calls.
    pub(crate) fn unload(&mut self) -> Ending {
        if let Some(ending) = &self.ending {
            return ending.clone();
        }
        // Calls whose caller gave up may still run; `shutdown` must not race
        // them. Nothing can submit any more (the version is out of service).
        crate::drain::wait_until(None, || self.busy() == 0);
        let shutdown = if self.library.as_ref().is_some_and(|l| l.has_shutdown()) {
            self.on_thread(self.shutdown_timeout, |lib| lib.shutdown())
        } else {
            Ok(Outcome::Ok)
        };
        let ending = match shutdown {
            Err(Stuck::TimedOut) => self.abandon("shutdown never returned"),
            shutdown => {
                if let Ok(Outcome::Error(m) | Outcome::Panic(m)) = shutdown {
                    tracing::warn!(plugin = %self.plugin, "shutdown failed: {m}");
                }
                self.close()
            }
        };
        self.ending = Some(ending.clone());
        ending
    }

    /// Joins the workers and closes the library (now, or once the threads
    /// that hold state of it let go); `inline` code without thread tracking
    /// is retained.
    fn close(&mut self) -> Ending {
        let inline = matches!(self.runner, Runner::Inline);
        if let Runner::Pooled(pool) | Runner::Auto { pool, .. } = &mut self.runner {
            pool.stop();
        }
        let Some(library) = self.library.take() else {
            return Ending::Unloaded;
        };
        let image = self.image.take();
        let library = match Arc::try_unwrap(library) {
            Ok(library) => library,
            Err(shared) => {
                // A thread still runs plugin code (a host thread stuck in
                // `init`/`shutdown`); never close code in use.
                std::mem::forget(shared);
                if let Some(image) = image {
                    image.release(true);
                }
                return Ending::Leaked("the library is still referenced".into());
            }
        };
        if inline && library.lib().is_none() {
            // It ran on callers' threads, and what it left there is unknown.
            library.retain();
            if let Some(image) = image {
                image.release(true);
            }
            return Ending::Retained;
        }
        let late = self.late.clone();
        let (plugin, version) = (self.plugin.clone(), self.version.clone());
        Closing::new(library, image).close(move |ending| late.0(&plugin, &version, ending))
    }
}

/// A library out of service, with its image, on its way to being closed.
pub(super) struct Closing {
    library: Library,
    image: Option<Image>,
}

impl Closing {
    fn new(library: Library, image: Option<Image>) -> Closing {
        Closing { library, image }
    }

    /// Closes the library now if no thread holds state of its code, else
    /// once they let go (`late` then hears how it ended, on a thread of
    /// dynplug's), returning `Ending::Pinned` with the threads by name.
    fn close(self, late: impl FnOnce(Ending) + Send + 'static) -> Ending {
        let Some(lib) = self.library.lib() else {
            return self.finish(pins::Keys::default());
        };
        match pins::retire(lib, self, move |closing, keys| late(closing.finish(keys))) {
            Retired::Free(closing, keys) => closing.finish(keys),
            Retired::Pinned(holders) => {
                let threads: Vec<String> = holders
                    .iter()
                    .map(|h| {
                        format!(
                            "{} (tid {}, {} held)",
                            h.name.as_deref().unwrap_or("exited"),
                            h.tid,
                            h.count
                        )
                    })
                    .collect();
                Ending::Pinned(format!(
                    "thread-local state of its code is held by {} thread(s): {}; unloaded once \
                     they exit or call a plugin again",
                    threads.len(),
                    threads.join(", ")
                ))
            }
        }
    }

    /// Closes a library that no verify or call touches any more: for `verify`.
    fn close_now(self) {
        let _ = self.close(|_| {});
    }

    /// Deletes `keys`, `dlclose`s, and asks the loader whether it is gone.
    fn finish(self, keys: pins::Keys) -> Ending {
        let tracked = self.library.lib().is_some();
        let closed = self.library.close(keys);
        if let Some(image) = self.image {
            image.release(closed.still_mapped || closed.error.is_some());
        }
        if let Some(e) = closed.error {
            return Ending::Leaked(format!("dlclose failed: {e}"));
        }
        if closed.still_mapped {
            let why = if tracked {
                "something dynplug does not see pins it (a library marked NODELETE, or a \
                 thread-local destructor registered while its thread was exiting)"
            } else {
                "something pins the library (a thread-local with a destructor on a live \
                 thread, `std::thread::current()` called on a host thread, or a library \
                 marked NODELETE)"
            };
            return Ending::Leaked(format!("still mapped after dlclose: {why}"));
        }
        Ending::Unloaded
    }
}

impl Drop for NativeVersion {
    fn drop(&mut self) {
        if self.ending.is_some() {
            return;
        }
        if self.busy() == 0 {
            self.unload();
            return;
        }
        // The last holder may be a tokio worker, and abandoned calls can run
        // as long as the plugin ignores cancellation: finish elsewhere.
        let rest = NativeVersion {
            plugin: self.plugin.clone(),
            version: self.version.clone(),
            library: self.library.take(),
            runner: std::mem::replace(&mut self.runner, Runner::Inline),
            image: self.image.take(),
            shutdown_timeout: self.shutdown_timeout,
            late: self.late.clone(),
            ending: None,
        };
        self.ending = Some(Ending::Leaked("finished on another thread".into()));
        let name = format!("dynplug-unload-{}", self.plugin);
        // The closure owns `rest`: if the thread cannot start, dropping the
        // closure would drop `rest`, whose `Drop` would try again, and so on
        // until the stack overflows. So `rest` is kept in a slot the closure
        // takes from, and leaked (reported) when the spawn fails.
        let slot = Arc::new(std::sync::Mutex::new(Some(rest)));
        let taken = Arc::clone(&slot);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let rest = taken.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut rest) = rest {
                let ending = rest.unload();
                tracing::info!(plugin = %rest.plugin, ?ending, "finished after its abandoned calls");
            }
        });
        if let Err(e) = spawned {
            let rest = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            tracing::error!(
                plugin = %self.plugin,
                "cannot start a thread to finish the version ({e}); it is leaked"
            );
            if let Some(mut rest) = rest {
                rest.ending = Some(Ending::Leaked("no thread to finish it".into()));
                std::mem::forget(rest);
            }
        }
    }
}
