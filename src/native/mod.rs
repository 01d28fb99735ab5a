//! Native plugins: a `cdylib` loaded from a shadow copy, called inline or on
//! its own worker pool, and truly unloaded when it is replaced or removed.
//!
//! Load sequence (see `docs/internals.md`): read the artifact → verify its
//! sha256 → write a shadow copy → `dlopen` it (`RTLD_NOW | RTLD_LOCAL`) →
//! check the ABI header and layout → unlink the copy → start the workers →
//! `init` on a worker. Unload: (the caller has drained calls) → `shutdown` on
//! a worker → join the workers → `dlclose` → check the copy is unmapped.

mod ffi;
mod pool;
mod shadow;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub(crate) use ffi::Outcome;
use ffi::{Library, OpenError};
pub(crate) use ffi::{PTHREAD_KEYS_MAX, pthread_keys_in_use};
use pool::{Pool, Refused, Reply};
pub(crate) use shadow::remove_stale;

use crate::Context;
use crate::error::{Error, Result};
use crate::manifest::{Isolation, Manifest, Source};

/// How a version ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Closed and verified unmapped.
    Unloaded,
    /// Kept mapped on purpose (`inline`).
    Retained,
    /// Still mapped after `dlclose`, or never closed; the reason says why.
    Leaked(String),
}

enum Runner {
    Inline,
    Pooled(Pool),
}

pub(crate) struct NativeVersion {
    plugin: String,
    library: Option<Arc<Library>>,
    runner: Runner,
    shadow: PathBuf,
    ending: Option<Ending>,
}

/// Settings the manager passes to every native load.
#[derive(Debug, Clone)]
pub(crate) struct NativeOptions {
    pub(crate) shadow_dir: PathBuf,
    pub(crate) pool_size: usize,
    pub(crate) queue_limit: Option<usize>,
}

impl NativeVersion {
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
    ) -> Result<NativeVersion> {
        let plugin = manifest.name.clone();
        let (library, shadow) = open_checked(manifest, dir, &options.shadow_dir)?;
        let library = Arc::new(library);
        let runner = match manifest.isolation {
            Isolation::Inline => Runner::Inline,
            _ => Runner::Pooled(
                Pool::start(&plugin, &library, options.pool_size, options.queue_limit).map_err(
                    |source| Error::Io {
                        plugin: plugin.clone(),
                        action: "starting workers for",
                        path: dir.to_owned(),
                        source,
                    },
                )?,
            ),
        };
        let mut version = NativeVersion {
            plugin: plugin.clone(),
            library: Some(library),
            runner,
            shadow,
            ending: None,
        };
        let config = manifest.config_value();
        let message = match version.on_thread(move |lib| lib.init(&config)) {
            Some(Outcome::Ok) => return Ok(version),
            Some(Outcome::Error(message)) => message,
            Some(Outcome::Panic(message)) => format!("panicked: {message}"),
            None => "worker pool stopped".into(),
        };
        // init did not succeed, so shutdown is not called.
        version.ending = Some(version.close_without_shutdown());
        Err(Error::Init { plugin, message })
    }

    /// Runs `f` where plugin code of this version runs: a worker, or here.
    fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Library) -> T + Send + 'static,
    ) -> Option<T> {
        let library = self.library.as_ref()?;
        match &self.runner {
            Runner::Inline => Some(f(library)),
            Runner::Pooled(pool) => pool.run(f),
        }
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        let Some(library) = &self.library else {
            return Err(self.stopped());
        };
        let pool = match &self.runner {
            Runner::Inline => return Ok(library.execute(ctx)),
            Runner::Pooled(pool) => pool,
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        // What the caller gets back if it stops waiting at the deadline.
        let fallback = ctx
            .deadline()
            .map(|deadline| (deadline, ctx.cancel_token(), ctx.label().to_owned()));
        let job = std::mem::take(ctx);
        if let Err(refused) = pool.submit(job, Reply::Blocking(tx)) {
            return Err(self.refused(pool, refused, ctx));
        }
        let reply = match fallback {
            None => rx.recv().map_err(|_| self.stopped()),
            Some((deadline, token, label)) => rx.recv_deadline(deadline).map_err(|e| match e {
                crossbeam_channel::RecvTimeoutError::Timeout => {
                    // The plugin keeps the values until it notices; the
                    // caller gets the label, token and deadline back.
                    token.cancel();
                    *ctx = Context::new(label.clone())
                        .with_cancel_token(token)
                        .with_deadline(deadline);
                    Error::DeadlineExceeded {
                        plugin: self.plugin.clone(),
                        label,
                    }
                }
                crossbeam_channel::RecvTimeoutError::Disconnected => self.stopped(),
            }),
        };
        let (done, outcome) = reply?;
        *ctx = done;
        Ok(outcome)
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<Outcome> {
        let Some(library) = &self.library else {
            return Err(self.stopped());
        };
        let pool = match &self.runner {
            // Inline means on the caller's thread, also for async callers:
            // keep inline plugins short.
            Runner::Inline => return Ok(library.execute(ctx)),
            Runner::Pooled(pool) => pool,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = ctx.cancel_token();
        if let Err(refused) = pool.submit(std::mem::take(ctx), Reply::Async(tx)) {
            // Not queued: the caller gets its context back uncancelled (it
            // may retry an overloaded plugin with it).
            return Err(self.refused(pool, refused, ctx));
        }
        // From here, if this future is dropped, the call is cancelled rather
        // than left running.
        let mut guard = CancelOnDrop(Some(token));
        let (done, outcome) = rx.await.map_err(|_| self.stopped())?;
        guard.0 = None;
        *ctx = done;
        Ok(outcome)
    }

    /// Gives the context back to the caller and says why the pool refused it.
    fn refused(&self, pool: &Pool, refused: Refused, ctx: &mut Context) -> Error {
        match refused {
            Refused::Stopped(job) => {
                *ctx = job;
                self.stopped()
            }
            Refused::Full(job) => {
                *ctx = job;
                Error::Overloaded {
                    plugin: self.plugin.clone(),
                    limit: pool.queue_limit().unwrap_or_default(),
                }
            }
        }
    }

    fn stopped(&self) -> Error {
        Error::Unavailable {
            plugin: self.plugin.clone(),
            reason: "this version has been unloaded".into(),
        }
    }

    /// Calls still queued or running on the workers, including calls whose
    /// caller stopped waiting.
    pub(crate) fn busy(&self) -> usize {
        match &self.runner {
            Runner::Inline => 0,
            Runner::Pooled(pool) => pool.busy(),
        }
    }

    pub(crate) fn shadow_path(&self) -> &Path {
        &self.shadow
    }

    /// Ends the version: `shutdown`, join the workers, `dlclose` (or retain
    /// inline code), then check the mapping. The caller has drained the calls.
    pub(crate) fn unload(&mut self) -> Ending {
        if let Some(ending) = &self.ending {
            return ending.clone();
        }
        // Calls whose caller gave up may still run; `shutdown` must not race
        // them. Nothing can submit any more (the version is out of service).
        let mut pause = std::time::Duration::from_micros(50);
        while self.busy() > 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        }
        let shutdown = self.on_thread(|lib| lib.shutdown());
        if let Some(Outcome::Error(m) | Outcome::Panic(m)) = shutdown {
            tracing::warn!(plugin = %self.plugin, "shutdown failed: {m}");
        }
        let ending = self.close_without_shutdown();
        self.ending = Some(ending.clone());
        ending
    }

    fn close_without_shutdown(&mut self) -> Ending {
        if let Runner::Pooled(pool) = &mut self.runner {
            pool.stop();
        }
        let Some(library) = self.library.take() else {
            return Ending::Unloaded;
        };
        let library = match Arc::try_unwrap(library) {
            Ok(library) => library,
            Err(shared) => {
                // Only possible if a worker failed to exit; never close code in use.
                std::mem::forget(shared);
                return Ending::Leaked("the library is still referenced".into());
            }
        };
        if matches!(self.runner, Runner::Inline) {
            library.retain();
            return Ending::Retained;
        }
        let started = Instant::now();
        if let Err(e) = library.close() {
            return Ending::Leaked(format!("dlclose failed: {e}"));
        }
        if shadow::is_mapped(&self.shadow) {
            return Ending::Leaked(
                "still mapped after dlclose (a thread-local with a destructor, or a \
                 `std::thread::current()` call on a host thread, pins the library)"
                    .into(),
            );
        }
        tracing::debug!(plugin = %self.plugin, elapsed = ?started.elapsed(), "library unmapped");
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
        let mut rest = NativeVersion {
            plugin: self.plugin.clone(),
            library: self.library.take(),
            runner: std::mem::replace(&mut self.runner, Runner::Inline),
            shadow: self.shadow.clone(),
            ending: None,
        };
        self.ending = Some(Ending::Leaked("finished on another thread".into()));
        let name = format!("dynplug-unload-{}", self.plugin);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let ending = rest.unload();
            tracing::info!(plugin = %rest.plugin, ?ending, "finished after its abandoned calls");
        });
        if let Err(e) = spawned {
            tracing::error!(plugin = %self.plugin, "cannot finish the version: {e}");
        }
    }
}

struct CancelOnDrop(Option<crate::CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

/// Checks everything about a native plugin that can be checked without
/// running it (manifest mode, artifact, checksum, ABI), leaving it loaded.
fn open_checked(manifest: &Manifest, dir: &Path, shadow_dir: &Path) -> Result<(Library, PathBuf)> {
    let plugin = manifest.name.clone();
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
    let Source::LocalSo { sha256, .. } = &manifest.source else {
        return Err(Error::Unsupported {
            plugin,
            path: manifest_path,
            what: format!("source.mode \"{}\"", manifest.source.mode()),
        });
    };
    if manifest.isolation == Isolation::Process {
        return Err(Error::Unsupported {
            plugin,
            path: manifest_path,
            what: "isolation \"process\"".into(),
        });
    }
    let path = manifest
        .library_path(dir)
        .expect("local_so always has a library path");
    let io = |action, source| Error::Io {
        plugin: plugin.clone(),
        action,
        path: path.clone(),
        source,
    };
    // `source.path` was checked to be relative without `..`; a symlink
    // could still point outside the plugin directory.
    let real = path.canonicalize().map_err(|e| io("reading", e))?;
    let real_dir = dir.canonicalize().map_err(|e| io("reading", e))?;
    if !real.starts_with(&real_dir) {
        return Err(Error::Manifest {
            plugin,
            path: manifest_path,
            field: "source.path".into(),
            message: format!(
                "resolves outside the plugin directory, to {}",
                real.display()
            ),
        });
    }
    let bytes = std::fs::read(&real).map_err(|e| io("reading", e))?;
    if let Some(expected) = sha256 {
        let found = shadow::sha256_hex(&bytes);
        if !shadow::digests_equal(expected, &found) {
            return Err(Error::Checksum {
                plugin,
                path,
                expected: expected.clone(),
                found,
            });
        }
    }
    if let Err(message) = shadow::check_library(&bytes) {
        return Err(Error::BadLibrary {
            plugin,
            path,
            message,
        });
    }
    let version = manifest.version.to_string();
    let shadow =
        shadow::write_copy(shadow_dir, &plugin, &version, &bytes).map_err(|e| io("copying", e))?;
    let opened = Library::open(&shadow);
    // The mapping keeps the inode alive; unlinking now leaves no file behind
    // even if the process dies.
    let _ = std::fs::remove_file(&shadow);
    opened
        .map(|library| (library, shadow))
        .map_err(|e| match e {
            OpenError::Dlopen(source) => Error::Open {
                plugin: plugin.clone(),
                path: path.clone(),
                source,
            },
            OpenError::MissingRoot => Error::MissingRoot {
                plugin: plugin.clone(),
                path: path.clone(),
                symbol: plugin_abi::ffi::ROOT_SYMBOL,
            },
            OpenError::Abi { found, expected } => Error::AbiMismatch {
                plugin: plugin.clone(),
                path: path.clone(),
                found,
                expected,
            },
        })
}

/// Verifies a native plugin without calling it: the artifact is loaded from a
/// shadow copy, its ABI checked, and it is closed again.
pub(crate) fn verify(manifest: &Manifest, dir: &Path, shadow_dir: &Path) -> Result<()> {
    let (library, _shadow) = open_checked(manifest, dir, shadow_dir)?;
    let _ = library.close();
    Ok(())
}
