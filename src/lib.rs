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
//! * Exec plugins (`source.mode = "exec"`, feature `exec`) are programs in
//!   any language that speak goplugin's REST or gRPC protocol; dynplug
//!   starts, supervises and restarts them. See `docs/exec-plugins.md`.
//!
//! # Safety model
//!
//! Loading native code is inherently trusting it: a plugin runs in the host's
//! address space. dynplug makes the honest mistakes safe: a plugin built
//! against another `plugin-abi` is refused before anything is called, a panic
//! is caught inside the plugin and returned as [`Error::Panic`], and nothing a
//! plugin allocates outlives a call, so unloading leaves nothing dangling.
//! The `unsafe` code lives in `native::ffi`, and in `exec::parent_death`
//! (the few lines a child runs between `fork` and `exec`).

mod context;
mod digest;
mod error;
mod event;
#[cfg(feature = "exec")]
mod exec;
mod executor;
mod manager;
pub mod manifest;
mod native;
mod origin;
mod private_dir;
#[cfg(feature = "exec")]
mod proto;
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
pub use event::Event;
#[cfg(feature = "exec")]
pub use exec::REPLY_KEY;
pub use executor::Executor;
pub use manager::{Builder, LoadReport, PluginManager, Verified, verify, verify_report};
pub use manifest::{Isolation, Manifest};
pub use plugin_abi::{Value, ValueError};

/// The plugin ABI version this host speaks, as `(major, minor)`.
pub const ABI_VERSION: (u32, u32) = plugin_abi::ABI_VERSION;
pub use slot::{CallCounts, PluginInfo, PluginState, ProcessInfo, RetiredVersion};
pub use watch::Watcher;
