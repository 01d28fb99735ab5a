//! One loaded version of a plugin, whatever its kind.

use std::path::PathBuf;
use std::sync::Arc;

use crate::Context;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::native::{Ending, NativeOptions, NativeVersion, Outcome};

/// How a version's calls are carried out: one variant per plugin kind.
pub(crate) enum Backend {
    Native(NativeVersion),
}

pub(crate) struct Version {
    pub(crate) manifest: Arc<Manifest>,
    backend: Backend,
}

/// What the manager needs to load any kind of plugin.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub(crate) native: NativeOptions,
}

impl Version {
    pub(crate) fn load(manifest: Manifest, dir: PathBuf, options: &LoadOptions) -> Result<Version> {
        let backend = Backend::Native(NativeVersion::load(&manifest, &dir, &options.native)?);
        Ok(Version {
            manifest: Arc::new(manifest),
            backend,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.manifest.name
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute(ctx)?,
        };
        self.settle(ctx, outcome)
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<()> {
        self.check_not_expired(ctx)?;
        let outcome = match &self.backend {
            Backend::Native(native) => native.execute_async(ctx).await?,
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
                })
            }
        }
    }

    /// Ends the version (the caller has drained its calls).
    pub(crate) fn unload(&mut self) -> Ending {
        match &mut self.backend {
            Backend::Native(native) => native.unload(),
        }
    }

    /// Calls still running that no caller holds the version for (abandoned
    /// at a deadline); draining waits for them too.
    pub(crate) fn busy(&self) -> usize {
        match &self.backend {
            Backend::Native(native) => native.busy(),
        }
    }

    /// What the version runs from, as messages name it (the image, for
    /// native plugins).
    pub(crate) fn artifact(&self) -> String {
        match &self.backend {
            Backend::Native(native) => native.artifact(),
        }
    }
}
