//! One loaded version of a plugin, whatever its kind: the seam between the
//! manager (and everything above it: watcher, façades, metrics, CLI) and the
//! plugin kinds.
//!
//! A kind is one [`Backend`] variant, implemented in its own module, with
//! the same few operations: load (checked, started, ready), execute
//! (blocking and async), how many calls it still runs (`busy`, for
//! draining), unload (stop, and say how it ended), and what it runs from
//! (`artifact`, for messages). Everything else (routes, version policy,
//! draining, events, metrics) is the manager's and is the same for every
//! kind. `Version::load` is the one place that decides which kind a
//! manifest asks for, and refuses what this host does not do.

use std::path::Path;
use std::sync::Arc;

use crate::Context;
use crate::error::{Error, Result};
#[cfg(feature = "exec")]
use crate::exec::{ExecOptions, ExecVersion};
use crate::manifest::{Isolation, Manifest, Source};
use crate::native::{NativeOptions, NativeVersion};
use crate::slot::{PluginState, ProcessInfo, SocketInfo};
#[cfg(feature = "exec")]
use crate::socket::{SocketOptions, SocketVersion};

/// What a plugin's entry reported.
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok,
    Error(String),
    Panic(String),
}

/// How a version ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Stopped and, for native code, verified unmapped.
    Unloaded,
    /// Kept mapped on purpose (`inline`).
    Retained,
    /// Still mapped after `dlclose`, or never closed; the reason says why.
    Leaked(String),
}

/// How a version's calls are carried out: one variant per plugin kind.
pub(crate) enum Backend {
    Native(NativeVersion),
    #[cfg(feature = "exec")]
    Exec(ExecVersion),
    #[cfg(feature = "exec")]
    Socket(SocketVersion),
}

pub(crate) struct Version {
    pub(crate) manifest: Arc<Manifest>,
    backend: Backend,
}

/// What the manager needs to load any kind of plugin.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub(crate) native: NativeOptions,
    #[cfg(feature = "exec")]
    pub(crate) exec: ExecOptions,
    #[cfg(feature = "exec")]
    pub(crate) socket: SocketOptions,
}

/// The kinds this host runs; which one a manifest asks for is decided once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Native,
    #[cfg(feature = "exec")]
    Exec,
    #[cfg(feature = "exec")]
    Socket,
}

impl Kind {
    fn of(manifest: &Manifest, dir: &Path) -> Result<Kind> {
        let unsupported = |what: String| Error::Unsupported {
            plugin: manifest.name.clone(),
            path: dir.join(crate::manifest::MANIFEST_FILE),
            what,
        };
        match (&manifest.source, manifest.isolation) {
            (Source::LocalSo { .. }, Isolation::Process) => {
                Err(unsupported("isolation \"process\"".into()))
            }
            (Source::LocalSo { .. }, _) => Ok(Kind::Native),
            #[cfg(feature = "exec")]
            (Source::Exec { .. }, _) => Ok(Kind::Exec),
            #[cfg(not(feature = "exec"))]
            (Source::Exec { .. }, _) => Err(unsupported(
                "source.mode \"exec\" (this build of dynplug lacks its cargo feature \"exec\")"
                    .into(),
            )),
            #[cfg(feature = "exec")]
            (Source::Socket { .. }, _) => Ok(Kind::Socket),
            #[cfg(not(feature = "exec"))]
            (Source::Socket { .. }, _) => Err(unsupported(
                "source.mode \"socket\" (this build of dynplug lacks its cargo feature \"exec\")"
                    .into(),
            )),
            (source, _) => Err(unsupported(format!("source.mode \"{}\"", source.mode()))),
        }
    }
}

impl Version {
    /// Loads what `manifest` asks for, from the plugin directory `dir`:
    /// checked, started and ready to serve.
    pub(crate) fn load(manifest: Manifest, dir: &Path, options: &LoadOptions) -> Result<Version> {
        let backend = match Kind::of(&manifest, dir)? {
            Kind::Native => Backend::Native(NativeVersion::load(&manifest, dir, &options.native)?),
            #[cfg(feature = "exec")]
            Kind::Exec => Backend::Exec(ExecVersion::load(&manifest, dir, &options.exec)?),
            #[cfg(feature = "exec")]
            Kind::Socket => Backend::Socket(SocketVersion::load(&manifest, dir, &options.socket)?),
        };
        Ok(Version {
            manifest: Arc::new(manifest),
            backend,
        })
    }

    /// Checks a plugin as far as can be done without serving it (see
    /// [`crate::verify`]); says what was checked.
    pub(crate) fn verify(manifest: &Manifest, dir: &Path, options: &LoadOptions) -> Result<String> {
        match Kind::of(manifest, dir)? {
            Kind::Native => {
                crate::native::verify(manifest, dir, &options.native)?;
                Ok(format!(
                    "compatible with this host's plugin ABI {}.{}",
                    crate::ABI_VERSION.0,
                    crate::ABI_VERSION.1
                ))
            }
            #[cfg(feature = "exec")]
            Kind::Exec => crate::exec::verify(manifest, dir, &options.exec),
            #[cfg(feature = "exec")]
            Kind::Socket => crate::socket::verify(manifest, dir),
        }
    }

    /// Whether calls run on the caller's thread (`inline`): the façades then
    /// call it in place rather than through the async path.
    #[cfg(feature = "server")]
    pub(crate) fn is_inline(&self) -> bool {
        match &self.backend {
            Backend::Native(native) => native.is_inline(),
            #[cfg(feature = "exec")]
            Backend::Exec(_) | Backend::Socket(_) => false,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.manifest.name
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        ctx.begin_call();
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute(ctx)?,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.execute(ctx)?,
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.execute(ctx)?,
        };
        self.settle(ctx, outcome)
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        ctx.begin_call();
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute_async(ctx).await?,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.execute_async(ctx).await?,
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.execute_async(ctx).await?,
        };
        self.settle(ctx, outcome)
    }

    fn check_not_expired(&self, ctx: &Context) -> Result<()> {
        if ctx.is_expired() {
            return Err(Error::DeadlineExceeded {
                plugin: self.name().to_owned(),
                label: ctx.label().to_owned(),
            });
        }
        Ok(())
    }

    /// Turns an entry's outcome into the caller's result. An error returned by
    /// a plugin that saw its deadline pass or its call cancelled is reported
    /// as that, not as a plugin failure.
    fn settle(&self, ctx: &Context, outcome: Outcome) -> Result<()> {
        // The success path is the hot one: build names only for errors.
        let names = || (self.name().to_owned(), ctx.label().to_owned());
        match outcome {
            Outcome::Ok => Ok(()),
            Outcome::Panic(message) => {
                let (plugin, label) = names();
                Err(Error::Panic {
                    plugin,
                    label,
                    message,
                })
            }
            Outcome::Error(_) if ctx.is_expired() => {
                let (plugin, label) = names();
                Err(Error::DeadlineExceeded { plugin, label })
            }
            Outcome::Error(_)
                if ctx
                    .existing_cancel_token()
                    .is_some_and(|t| t.is_cancelled()) =>
            {
                let (plugin, label) = names();
                Err(Error::Cancelled { plugin, label })
            }
            Outcome::Error(message) => {
                let (plugin, label) = names();
                Err(Error::Plugin {
                    plugin,
                    label,
                    message,
                    code: None,
                    data: None,
                })
            }
        }
    }

    /// Ends the version (the caller has drained its calls).
    pub(crate) fn unload(&mut self) -> Ending {
        match &mut self.backend {
            Backend::Native(native) => native.unload(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.unload(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.unload(),
        }
    }

    /// Calls still running that no caller holds the version for (abandoned
    /// at a deadline); draining waits for them too.
    pub(crate) fn busy(&self) -> usize {
        match &self.backend {
            Backend::Native(native) => native.busy(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.busy(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.busy(),
        }
    }

    /// What the version runs from, as messages name it (the image, for
    /// native plugins).
    pub(crate) fn artifact(&self) -> String {
        match &self.backend {
            Backend::Native(native) => native.artifact(),
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.artifact(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.artifact(),
        }
    }

    /// The plugin's process, for kinds that run one.
    pub(crate) fn process(&self) -> Option<ProcessInfo> {
        match &self.backend {
            Backend::Native(_) => None,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => Some(exec.process()),
            #[cfg(feature = "exec")]
            Backend::Socket(_) => None,
        }
    }

    /// The plugin's socket, for kinds served by one dynplug did not start.
    pub(crate) fn socket(&self) -> Option<SocketInfo> {
        #[cfg(feature = "exec")]
        if let Backend::Socket(socket) = &self.backend {
            return Some(socket.info());
        }
        None
    }

    /// The state to show instead of `Loaded` while the version's process
    /// (or socket) is down.
    pub(crate) fn down_state(&self) -> Option<PluginState> {
        match &self.backend {
            Backend::Native(_) => None,
            #[cfg(feature = "exec")]
            Backend::Exec(exec) => exec.down_state(),
            #[cfg(feature = "exec")]
            Backend::Socket(socket) => socket.down_state(),
        }
    }
}
