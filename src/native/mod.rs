//! Native plugins: a `cdylib` loaded from a shadow copy, called inline or on
//! its own worker pool, and truly unloaded when it is replaced or removed.
//!
//! Load sequence (see `docs/internals.md`): read the artifact (a regular
//! file, bounded) → verify its sha256 → check the header from the bytes
//! (format, architecture, root symbol, magic, ABI version) → put the bytes in
//! an image nobody else can write (a sealed memfd on Linux) → `dlopen` it
//! (`RTLD_NOW | RTLD_LOCAL`) → check the loaded header and the layout → start
//! the workers → `init` on a worker, bounded by `init_timeout`. Unload: (the
//! caller has drained calls) → `shutdown` on a worker, bounded → join the
//! workers → `dlclose` → check the image is unmapped.

mod ffi;
mod header;
mod image;
mod pool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffi::{Library, OpenError};
pub(crate) use ffi::{PTHREAD_KEYS_MAX, pthread_keys_in_use};
use header::Refusal;
#[cfg(feature = "exec")]
pub(crate) use header::host_architecture;
use image::Image;
pub(crate) use image::remove_stale;
use pool::{Pool, Refused, Reply, Stuck};

use crate::Context;
use crate::error::{Error, Result};
use crate::manifest::{Isolation, Manifest, Source};
use crate::version::{Ending, Outcome};

enum Runner {
    Inline,
    Pooled(Pool),
}

pub(crate) struct NativeVersion {
    plugin: String,
    library: Option<Arc<Library>>,
    runner: Runner,
    image: Option<Image>,
    shutdown_timeout: Duration,
    ending: Option<Ending>,
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
}

impl NativeVersion {
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        check: Option<&ArtifactCheck<'_>>,
    ) -> Result<NativeVersion> {
        let opened = open_checked(manifest, dir, options, check)?;
        Self::start(manifest, dir, options, opened)
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
        let checked = check_bytes(manifest, &path, &bytes, None)?;
        let opened = open_image(manifest, &path, dir, options, bytes, &checked)?;
        Self::start(manifest, dir, options, opened)
    }

    /// Starts the workers of an opened library and runs `init`.
    fn start(
        manifest: &Manifest,
        dir: &Path,
        options: &NativeOptions,
        (library, image): (Library, Image),
    ) -> Result<NativeVersion> {
        let plugin = manifest.name.clone();
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
            image: Some(image),
            shutdown_timeout: options.shutdown_timeout,
            ending: None,
        };
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
            version.ending = Some(version.close_without_shutdown());
        }
        Err(Error::Init { plugin, message })
    }

    /// Runs `f` where plugin code of this version runs (a worker, or for
    /// `inline` a thread of its own), waiting at most `timeout`.
    fn on_thread<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&Library) -> T + Send + 'static,
    ) -> Result<T, Stuck> {
        let library = self.library.as_ref().ok_or(Stuck::Stopped)?;
        match &self.runner {
            Runner::Pooled(pool) => pool.run(timeout, f),
            Runner::Inline => {
                // Not the caller's thread: a hanging `init` must not hold it
                // (it may hold the plugin's lock). A thread that never
                // returns keeps its `Arc`, so the library is never closed.
                let (tx, rx) = crossbeam_channel::bounded(1);
                let library = Arc::clone(library);
                std::thread::Builder::new()
                    .name(format!("dynplug-{}-host", self.plugin))
                    .spawn(move || {
                        let _ = tx.send(f(&library));
                    })
                    .map_err(|_| Stuck::Stopped)?;
                rx.recv_timeout(timeout).map_err(|e| match e {
                    crossbeam_channel::RecvTimeoutError::Timeout => Stuck::TimedOut,
                    crossbeam_channel::RecvTimeoutError::Disconnected => Stuck::Stopped,
                })
            }
        }
    }

    /// Gives up on a version whose thread is stuck in plugin code: nothing is
    /// joined or closed; its code and image stay for the life of the process.
    fn abandon(&mut self, why: &str) -> Ending {
        if let Runner::Pooled(pool) = &mut self.runner {
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

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        let Some(library) = &self.library else {
            return Err(self.stopped());
        };
        let pool = match &self.runner {
            Runner::Inline => return Ok(library.execute(ctx)),
            Runner::Pooled(pool) => pool,
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        // Only a call that can be abandoned (it has a deadline) pays for
        // keeping what the caller gets back.
        let abandon = ctx
            .deadline()
            .map(|deadline| (deadline, Abandoned::of(ctx)));
        if let Err(refused) = pool.submit(std::mem::take(ctx), Reply::Blocking(tx)) {
            return Err(self.refused(pool, refused, ctx));
        }
        let (done, outcome) = match abandon {
            None => rx.recv().map_err(|_| self.stopped())?,
            Some((deadline, abandoned)) => match rx.recv_deadline(deadline) {
                Ok(reply) => reply,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(abandoned.give_back(ctx, &self.plugin));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(self.stopped());
                }
            },
        };
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
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let abandoned = Abandoned::of(ctx);
        let deadline = ctx.deadline();
        if let Err(refused) = pool.submit(std::mem::take(ctx), Reply::Async(tx)) {
            // Not queued: the caller gets its context back as it was (it
            // may retry an overloaded plugin with it).
            return Err(self.refused(pool, refused, ctx));
        }
        // From here the values are with the call. If this future is dropped
        // (or the deadline passes), the call is cancelled rather than left
        // running, and the caller's context gets its label, token and
        // deadline back, as from the blocking `execute`.
        let mut pending = Pending {
            ctx,
            abandoned: Some(abandoned),
        };
        let mut timer = deadline.map(|d| {
            futures_timer::Delay::new(d.saturating_duration_since(std::time::Instant::now()))
        });
        let reply = std::future::poll_fn(|cx| {
            use std::future::Future;
            use std::pin::Pin;
            if let std::task::Poll::Ready(reply) = Pin::new(&mut rx).poll(cx) {
                return std::task::Poll::Ready(Some(reply));
            }
            match timer.as_mut().map(|timer| Pin::new(timer).poll(cx)) {
                Some(std::task::Poll::Ready(())) => std::task::Poll::Ready(None),
                _ => std::task::Poll::Pending,
            }
        })
        .await;
        match reply {
            Some(Ok((done, outcome))) => {
                pending.abandoned = None;
                *pending.ctx = done;
                Ok(outcome)
            }
            Some(Err(_)) => Err(self.stopped()),
            None => {
                let abandoned = pending.abandoned.take().expect("set until the reply");
                Err(abandoned.give_back(pending.ctx, &self.plugin))
            }
        }
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

    /// Whether calls run on the caller's thread.
    #[cfg(feature = "server")]
    pub(crate) fn is_inline(&self) -> bool {
        matches!(self.runner, Runner::Inline)
    }

    /// Calls still queued or running on the workers, including calls whose
    /// caller stopped waiting.
    pub(crate) fn busy(&self) -> usize {
        match &self.runner {
            Runner::Inline => 0,
            Runner::Pooled(pool) => pool.busy(),
        }
    }

    /// The image the version runs from, as messages name it.
    pub(crate) fn artifact(&self) -> String {
        self.image
            .as_ref()
            .map_or_else(String::new, Image::describe)
    }

    /// Ends the version: `shutdown`, join the workers, `dlclose` (or retain
    /// inline code), then check the mapping. The caller has drained the calls.
    pub(crate) fn unload(&mut self) -> Ending {
        if let Some(ending) = &self.ending {
            return ending.clone();
        }
        // Calls whose caller gave up may still run; `shutdown` must not race
        // them. Nothing can submit any more (the version is out of service).
        crate::drain::wait_until(None, || self.busy() == 0);
        let ending = match self.on_thread(self.shutdown_timeout, |lib| lib.shutdown()) {
            Err(Stuck::TimedOut) => self.abandon("shutdown never returned"),
            shutdown => {
                if let Ok(Outcome::Error(m) | Outcome::Panic(m)) = shutdown {
                    tracing::warn!(plugin = %self.plugin, "shutdown failed: {m}");
                }
                self.close_without_shutdown()
            }
        };
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
        if matches!(self.runner, Runner::Inline) {
            library.retain();
            if let Some(image) = image {
                image.release(true);
            }
            return Ending::Retained;
        }
        let started = Instant::now();
        let closed = library.close();
        let mapped = image.as_ref().is_some_and(Image::is_mapped);
        if let Some(image) = image {
            image.release(mapped || closed.is_err());
        }
        if let Err(e) = closed {
            return Ending::Leaked(format!("dlclose failed: {e}"));
        }
        if mapped {
            return Ending::Leaked(
                "still mapped after dlclose: something pins the library (a thread-local \
                 with a destructor on a live thread, `std::thread::current()` called on a \
                 host thread, or a library marked NODELETE)"
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
        let rest = NativeVersion {
            plugin: self.plugin.clone(),
            library: self.library.take(),
            runner: std::mem::replace(&mut self.runner, Runner::Inline),
            image: self.image.take(),
            shutdown_timeout: self.shutdown_timeout,
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

/// What a caller keeps of its context while a pooled call holds the values:
/// what it gets back if it stops waiting (deadline, dropped future).
struct Abandoned {
    label: compact_str::CompactString,
    token: crate::CancelToken,
    deadline: Option<Instant>,
}

impl Abandoned {
    fn of(ctx: &Context) -> Abandoned {
        Abandoned {
            label: ctx.label_compact().clone(),
            token: ctx.cancel_token(),
            deadline: ctx.deadline(),
        }
    }

    /// Cancels the call (the plugin keeps the values until it notices) and
    /// gives the caller its label, token and deadline back.
    fn give_back(self, ctx: &mut Context, plugin: &str) -> Error {
        self.restore(ctx);
        Error::DeadlineExceeded {
            plugin: plugin.to_owned(),
            label: ctx.label().to_owned(),
        }
    }

    fn restore(self, ctx: &mut Context) {
        self.token.cancel();
        let mut back = Context::new(&self.label).with_cancel_token(self.token);
        if let Some(deadline) = self.deadline {
            back = back.with_deadline(deadline);
        }
        *ctx = back;
    }
}

/// An async call in flight: dropped before the reply, it cancels the call
/// and restores the caller's context as `Abandoned` says.
struct Pending<'a> {
    ctx: &'a mut Context,
    abandoned: Option<Abandoned>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(abandoned) = self.abandoned.take() {
            abandoned.restore(self.ctx);
        }
    }
}

/// The pre-`dlopen` checks alone, for the fuzz targets.
pub(crate) fn inspect(bytes: &[u8]) -> std::result::Result<(), String> {
    header::inspect(bytes)
        .map(|_| ())
        .map_err(|refusal| format!("{refusal:?}"))
}

/// Checks everything about a native plugin that can be checked without
/// running it (manifest mode, artifact, checksum, header) and loads it from
/// an image of exactly the checked bytes.
fn open_checked(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
    check: Option<&ArtifactCheck<'_>>,
) -> Result<(Library, Image)> {
    let (path, real_dir, bytes) = read_library(manifest, dir, options)?;
    let checked = check_bytes(manifest, &path, &bytes, check)?;
    open_image(manifest, &path, &real_dir, options, bytes, &checked)
}

/// Everything [`open_checked`] does before the image and `dlopen`: the
/// library's bytes, read once, checksum and header checked. What a
/// `process` plugin's host does before handing the bytes to its runner.
#[cfg(feature = "exec")]
pub(crate) fn read_checked(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
    check: Option<&ArtifactCheck<'_>>,
) -> Result<(PathBuf, Vec<u8>)> {
    let (path, _, bytes) = read_library(manifest, dir, options)?;
    check_bytes(manifest, &path, &bytes, check)?;
    Ok((path, bytes))
}

/// Reads the library a `local_so` manifest names, once: the path as the
/// manifest names it, the real plugin directory, and the bytes.
fn read_library(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
) -> Result<(PathBuf, PathBuf, Vec<u8>)> {
    let plugin = manifest.name.clone();
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
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
    if let Some(why) = [&real_dir, &manifest_path, &real]
        .into_iter()
        .find_map(|p| crate::private_dir::world_writable(p))
    {
        return Err(Error::Insecure {
            plugin,
            path: path.clone(),
            reason: why,
        });
    }
    // Read once: every later step uses these bytes, and the image holds
    // exactly them, so what is checked is what is loaded.
    let bytes = crate::untrusted::read_file(&real, options.max_library_size)
        .map_err(|e| io("reading", e))?;
    Ok((path, real_dir, bytes))
}

/// A check of the artifact by the caller (its signature), given the hex
/// SHA-256 of the bytes read, before anything else looks at them.
pub(crate) type ArtifactCheck<'a> = dyn Fn(&str) -> Result<()> + 'a;

/// The caller's check (a signature), the checksum and the header check, on
/// the bytes that will be loaded.
fn check_bytes(
    manifest: &Manifest,
    path: &Path,
    bytes: &[u8],
    check: Option<&ArtifactCheck<'_>>,
) -> Result<header::HeaderInfo> {
    let plugin = manifest.name.clone();
    let path = path.to_owned();
    let Source::LocalSo { sha256, .. } = &manifest.source else {
        unreachable!("Version::load sends only local_so manifests here");
    };
    // One digest for the signature and the checksum.
    let digest = (sha256.is_some() || check.is_some()).then(|| crate::digest::sha256_hex(bytes));
    if let (Some(check), Some(digest)) = (check, &digest) {
        check(digest)?;
    }
    if let (Some(expected), Some(found)) = (sha256, digest)
        && !crate::digest::digests_equal(expected, &found)
    {
        return Err(Error::Checksum {
            plugin,
            path,
            algorithm: "sha256",
            expected: expected.clone(),
            found,
        });
    }
    header::inspect(bytes).map_err(|refusal| match refusal {
        Refusal::NotALibrary(message) => Error::BadLibrary {
            plugin: plugin.clone(),
            path: path.clone(),
            message,
        },
        Refusal::MissingRoot => Error::MissingRoot {
            plugin: plugin.clone(),
            path: path.clone(),
            symbol: plugin_abi::ffi::ROOT_SYMBOL,
        },
        Refusal::BadRoot(why) => Error::AbiMismatch {
            plugin: plugin.clone(),
            path: path.clone(),
            found: format!("a malformed root: {why}"),
            expected: ffi::expected_abi(),
        },
        Refusal::Abi(info) => Error::AbiMismatch {
            plugin: plugin.clone(),
            path: path.clone(),
            found: info.describe(),
            expected: ffi::expected_abi(),
        },
    })
}

/// Puts checked bytes in an image and opens it.
fn open_image(
    manifest: &Manifest,
    path: &Path,
    real_dir: &Path,
    options: &NativeOptions,
    bytes: Vec<u8>,
    checked: &header::HeaderInfo,
) -> Result<(Library, Image)> {
    let plugin = manifest.name.as_str();
    let image = Image::create(&bytes, plugin, real_dir, &options.shadow_dir).map_err(|source| {
        Error::Io {
            plugin: plugin.to_owned(),
            action: "preparing an image of",
            path: path.to_owned(),
            source,
        }
    })?;
    drop(bytes);
    let opened = Library::open(image.path(), checked);
    image.opened();
    let library = match opened {
        Ok(library) => library,
        Err(e) => {
            // A library refused after `dlopen` may stay mapped (NODELETE):
            // its `/proc/self/fd/N` name must then stay unique.
            let mapped = image.is_mapped();
            image.release(mapped);
            return Err(open_error(e, plugin, path));
        }
    };
    Ok((library, image))
}

fn open_error(e: OpenError, plugin: &str, path: &Path) -> Error {
    let (plugin, path) = (plugin.to_owned(), path.to_owned());
    match e {
        OpenError::Dlopen(message) => Error::Open {
            plugin,
            path,
            message,
        },
        OpenError::MissingRoot => Error::MissingRoot {
            plugin,
            path,
            symbol: plugin_abi::ffi::ROOT_SYMBOL,
        },
        OpenError::Abi { found, expected } => Error::AbiMismatch {
            plugin,
            path,
            found,
            expected,
        },
    }
}

/// Verifies a native plugin without calling it: the artifact's bytes are
/// checked, loaded from an image, its ABI checked, and it is closed again.
/// The constructors of a library that passed the checks on its bytes run.
pub(crate) fn verify(manifest: &Manifest, dir: &Path, options: &NativeOptions) -> Result<()> {
    let (library, image) = open_checked(manifest, dir, options, None)?;
    let closed = library.close();
    let mapped = image.is_mapped();
    image.release(mapped || closed.is_err());
    Ok(())
}
