//! dynplug: load, call, hot-upgrade and serve plugins from a directory.
//!
//! A host creates a [`PluginManager`] over a base directory, loads the
//! plugins found there, and calls them through [`Executor`]s with a
//! [`Context`] (a label, values, cancellation and a deadline):
//!
//! ```no_run
//! # fn main() -> Result<(), dynplug::Error> {
//! let manager = dynplug::PluginManager::new("plugins")?;
//! let report = manager.load_plugins()?;
//! for (name, error) in &report.failed {
//!     eprintln!("{name}: {error}");
//! }
//! let (spec, executor) = manager.get_plugin("hello")?;
//! let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
//! executor.execute(&mut ctx)?;
//! println!("{} {} says {:?}", spec.name, spec.version, ctx.get_str("greeting"));
//! # Ok(()) }
//! ```
//!
//! # The map
//!
//! * [`manifest`]: `plugin.json`, parsed strictly ([`Manifest`]). Its HTTP
//!   routes follow one set of rules (the `route` module) for validation,
//!   conflicts between plugins and request matching.
//! * [`PluginManager`]: scanning, loading, unloading, events ([`Event`]).
//! * [`Executor`]: calls one plugin, blocking or async.
//! * [`Context`]: the host side of a call; plugins see `plugin_abi::Context`.
//! * Native plugins (`source.mode = "local_so"`) are loaded from a shadow
//!   copy and called `inline` or on their own worker pool (`pooled`), which
//!   is what lets them be truly unloaded. See `docs/internals.md`.
//!
//! # Safety model
//!
//! Loading native code is inherently trusting it: a plugin runs in the host's
//! address space. dynplug makes the honest mistakes safe: a plugin built
//! against another `plugin-abi` is refused before anything is called, a panic
//! is caught inside the plugin and returned as [`Error::Panic`], and nothing a
//! plugin allocates outlives a call, so unloading leaves nothing dangling.
//! All `unsafe` code lives in one module (`native::ffi`).

mod context;
mod digest;
mod error;
mod event;
mod executor;
mod manager;
pub mod manifest;
mod native;
mod origin;
mod private_dir;
// Public for the fuzz targets, the property tests and the binary, not API.
#[doc(hidden)]
pub mod route;
#[cfg(feature = "server")]
pub mod serve;
mod slot;
#[doc(hidden)]
pub mod text;
mod untrusted;
mod version;
mod watch;

pub use context::{CancelToken, Context};
pub use error::{Error, Result};
pub use event::{Event, Events, EventsError};
pub use executor::Executor;
pub use manager::{Builder, LoadReport, PluginManager, verify};
pub use manifest::{Isolation, Manifest};
pub use plugin_abi::{Value, ValueError};

/// The plugin ABI version this host speaks, as `(major, minor)`.
pub const ABI_VERSION: (u32, u32) = plugin_abi::ABI_VERSION;
pub use slot::{CallCounts, PluginInfo, PluginState, RetiredVersion};

/// Entry points for the fuzz targets (`fuzz/`) and property tests: not API.
#[doc(hidden)]
pub mod fuzzing {
    /// The checks made on a library's bytes before `dlopen`: `Ok` when the
    /// bytes would be handed to `dlopen`, else why not.
    pub fn inspect_library(bytes: &[u8]) -> Result<(), String> {
        crate::native::inspect(bytes)
    }
}
pub use watch::Watcher;
