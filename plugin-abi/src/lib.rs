//! The stable ABI between a [dynplug] host and its native plugins.
//!
//! A plugin is a `cdylib` crate that depends on this crate only, writes one
//! safe function and exports it:
//!
//! ```
//! use plugin_abi::{export_plugin, Context, PluginError};
//!
//! fn execute(ctx: &mut Context) -> Result<(), PluginError> {
//!     match ctx.label() {
//!         "hello.get" => {
//!             let who = ctx.get_str("name").unwrap_or("world");
//!             let greeting = format!("hello, {who}");
//!             ctx.set("greeting", greeting);
//!             Ok(())
//!         }
//!         other => Err(PluginError::new(format!("unknown label {other}"))),
//!     }
//! }
//!
//! export_plugin!(execute);
//! ```
//!
//! [`TestContext`] runs `execute` in a unit test, without a host.
//!
//! # Safety model
//!
//! * Plugin authors write no `unsafe`: [`export_plugin!`] generates the
//!   `extern "C"` entries, and every entry runs under `catch_unwind`, so a
//!   panic becomes an error with its message instead of aborting the host.
//! * The exported root carries an ABI version and abi_stable's type layout of
//!   the entry table; the host refuses a plugin whose ABI differs before it
//!   calls anything.
//! * Nothing a plugin allocates outlives a call: values cross as borrowed
//!   views and are copied by the receiving side, so a plugin can be unloaded
//!   without leaving dangling strings, vtables or closures in the host.
//!
//! [dynplug]: https://docs.rs/dynplug

mod context;
mod error;
mod export;
pub mod ffi;
mod plugin;
mod test_context;
mod value;

pub use context::Context;
pub use error::{PluginError, ValueError};
pub use plugin::Plugin;
pub use test_context::TestContext;
pub use value::Value;

#[doc(hidden)]
pub mod __private {
    pub use crate::plugin::State;
}

/// The ABI version this crate speaks, as `(major, minor)`.
pub const ABI_VERSION: (u32, u32) = (ffi::ABI_MAJOR, ffi::ABI_MINOR);
