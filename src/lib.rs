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
//! * [`package`]: `.plg` packages (pack, unpack under hostile-input rules,
//!   install); the plugins directory holds them beside plugin directories
//!   (the `origin` module says which entry holds which plugin).
//! * [`signing`]: ed25519 keys and signatures, checked over the bytes
//!   loaded when the manager has trusted keys ([`Builder::trusted_keys`]).
//! * `source.mode = "remote_git"` plugins are built per commit into a cache
//!   (the `build` module), then loaded as native ones.
//! * Native plugins (`source.mode = "local_so"`) are checked from their
//!   bytes, loaded from an image nobody else can write, and called `inline`
//!   or on their own worker pool (`pooled`), which is what lets them be truly
//!   unloaded.
//!
//! Three walks through the code (`docs/internals.md` follows them):
//! * **the load path**: `manager/load.rs` (`load_plugin` → `prepare` →
//!   `Version::load` in `version.rs`, which picks the kind → `native/`:
//!   `header.rs` checks the bytes, `image.rs` holds them, `ffi.rs` opens) →
//!   `install` swaps the version in;
//! * **the upgrade path**: `watch.rs` turns file events into plugin names →
//!   `PluginManager::sync_entry` (the load path again) → the replaced version
//!   goes through `manager/retire.rs` (`drain.rs`, then `unload`);
//! * **the request path**: `executor.rs` → `version.rs` → the kind's
//!   `execute`; the façades enter through `serve/` (see its module docs).
//! * `isolation: "process"` (feature `exec`) runs a native plugin, the same
//!   `cdylib`, in a child process: a crash kills only that process, which
//!   is restarted; see `docs/embedding.md`.
//! * Exec plugins (`source.mode = "exec"`, feature `exec`) are programs in
//!   any language that speak goplugin's REST or gRPC protocol; dynplug
//!   starts, supervises and restarts them. See `docs/exec-plugins.md`.
//! * Socket plugins (`source.mode = "socket"`, feature `exec`) are servers
//!   dynplug did not start (JSON-RPC 2.0, Docker's protocol, goplugin's),
//!   named by a manifest, found in a sockets directory
//!   (`PluginManager::discover_sockets`) or registered with the plugin
//!   registry (`serve::Registry`); both kinds talk through `remote/`. Plugins
//!   offering a capability can be fanned out to ([`FanOut`]). See
//!   `docs/socket-plugins.md`.
//!
//! # Safety model
//!
//! Loading native code is inherently trusting it: a plugin runs in the host's
//! address space. dynplug makes sure the code that runs is the code that was
//! checked, and makes the honest mistakes safe: a library that is not a
//! plugin, or was built against another `plugin-abi`, is refused from its
//! bytes before any of its code runs; a panic is caught inside the plugin and
//! returned as [`Error::Panic`]; a hanging `init` holds up only its own
//! plugin; and nothing a plugin allocates outlives a call, so unloading
//! leaves nothing dangling. The `unsafe` code lives in `native::ffi`, and in
//! `exec::parent_death` (the few lines a child runs between `fork` and
//! `exec`). `docs/safety.md` says precisely what runs when.

mod build;
mod context;
mod digest;
mod drain;
mod error;
mod event;
#[cfg(feature = "exec")]
mod exec;
mod executor;
mod fanout;
mod manager;
pub mod manifest;
mod native;
mod origin;
pub mod package;
mod private_dir;
#[cfg(feature = "exec")]
mod process;
#[cfg(feature = "exec")]
mod proto;
#[cfg(feature = "exec")]
mod remote;
// Public for the fuzz targets, the property tests and the binary, not API.
#[doc(hidden)]
pub mod route;
#[cfg(feature = "server")]
pub mod serve;
pub mod signing;
mod slot;
#[cfg(feature = "exec")]
mod socket;
#[doc(hidden)]
pub mod text;
mod timer;
mod untrusted;
mod version;
mod watch;

pub use context::{CancelToken, Context};
pub use error::{Error, Result};
pub use event::{Event, Events, EventsError};
pub use executor::Executor;
pub use fanout::FanOut;
pub use manager::{Builder, LoadReport, PluginManager, Verified, verify, verify_report};
pub use manifest::{Isolation, Limits, Manifest};
pub use plugin_abi::{Value, ValueError};
#[cfg(feature = "exec")]
pub use process::RUNNER_ENV;
#[cfg(feature = "exec")]
pub use process::runner::run_if_runner;
#[cfg(feature = "exec")]
pub use remote::{REPLY_KEY, RESULT_KEY};
#[cfg(feature = "exec")]
pub use socket::Discovery;

/// What a host binary's linker must be told so that dynplug sees what
/// plugin code leaves on threads (thread-locals with destructors, pthread
/// keys), which is what lets code that ran on callers' threads be unloaded
/// (the default `auto` isolation runs calls in place only then). The
/// `dynplug` binary has it; a host that links this library into its own
/// binary adds one line to that crate's `build.rs` (glibc targets):
///
/// ```text
/// println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=__cxa_thread_atexit_impl,--export-dynamic-symbol=pthread_key_create,--export-dynamic-symbol=pthread_key_delete,--export-dynamic-symbol=pthread_setspecific");
/// ```
///
/// Without it, the first [`PluginManager`] logs a warning naming what is
/// missing, and [`PluginManager::tracks_threads`] is `false`.
pub const THREAD_TRACKING_LINK_ARG: &str = "-Wl,--export-dynamic-symbol=__cxa_thread_atexit_impl,--export-dynamic-symbol=pthread_key_create,--export-dynamic-symbol=pthread_key_delete,--export-dynamic-symbol=pthread_setspecific";

/// The plugin ABI version this host speaks, as `(major, minor)`.
pub const ABI_VERSION: (u32, u32) = plugin_abi::ABI_VERSION;
pub use slot::{CallCounts, PluginInfo, PluginState, ProcessInfo, RetiredVersion, SocketInfo};

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
