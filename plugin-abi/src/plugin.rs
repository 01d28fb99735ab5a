//! Plugins with typed state: [`Plugin`] and its export.

use std::sync::RwLock;

use crate::{Context, PluginError, Value};

/// A plugin whose state is built by `init` and borrowed by every call,
/// instead of living in statics.
///
/// ```
/// use plugin_abi::{export_plugin, Context, Plugin, PluginError, Value};
///
/// struct Greeter {
///     greeting: String,
/// }
///
/// impl Plugin for Greeter {
///     fn init(config: &Value) -> Result<Self, PluginError> {
///         let greeting = config
///             .as_map()
///             .and_then(|m| m.get("greeting"))
///             .and_then(Value::as_str)
///             .unwrap_or("hello");
///         Ok(Greeter { greeting: greeting.to_owned() })
///     }
///
///     fn execute(&self, ctx: &mut Context) -> Result<(), PluginError> {
///         let who = ctx.get_str("name").unwrap_or("world");
///         let greeting = format!("{}, {who}", self.greeting);
///         ctx.set("greeting", greeting);
///         Ok(())
///     }
/// }
///
/// export_plugin!(plugin = Greeter);
/// ```
///
/// The exported entries are the same `execute` / `init` / `shutdown` as with
/// functions, so the ABI does not change. Calls may run on several threads at
/// once, hence `Sync`: use interior mutability (atomics, `Mutex`) for state a
/// call changes.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the state from the manifest's `config` (`Value::Null` without
    /// one), once, after load. An error refuses the load.
    ///
    /// # Errors
    /// Any error refuses the load; if an older version serves, it keeps serving.
    fn init(config: &Value) -> Result<Self, PluginError>;

    /// Runs one call.
    ///
    /// # Errors
    /// The error the host reports for this call.
    fn execute(&self, ctx: &mut Context) -> Result<(), PluginError>;

    /// Runs once before this version is unloaded, with the state: stop and
    /// join the threads you started. Dropping the state frees it.
    fn shutdown(self) {}
}

/// The state of an exported [`Plugin`]: used by [`export_plugin!`](crate::export_plugin).
#[doc(hidden)]
pub struct State<P>(RwLock<Option<P>>);

impl<P: Plugin> State<P> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        State(RwLock::new(None))
    }

    #[doc(hidden)]
    pub fn init(&self, config: &Value) -> Result<(), PluginError> {
        let plugin = P::init(config)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(plugin);
        Ok(())
    }

    #[doc(hidden)]
    pub fn execute(&self, ctx: &mut Context) -> Result<(), PluginError> {
        // A read lock per call: uncontended except against `shutdown`,
        // which the host runs only once no call is left.
        let state = self.0.read().unwrap_or_else(|e| e.into_inner());
        match state.as_ref() {
            Some(plugin) => plugin.execute(ctx),
            None => Err(PluginError::new("the plugin was called before init")),
        }
    }

    #[doc(hidden)]
    pub fn shutdown(&self) {
        let plugin = self.0.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(plugin) = plugin {
            plugin.shutdown();
        }
    }
}

impl<P: Plugin> Default for State<P> {
    fn default() -> Self {
        Self::new()
    }
}
