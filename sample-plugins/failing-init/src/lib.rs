//! Failure fixture: `init` refuses to start.

use plugin_abi::{Context, PluginError, Value, export_plugin};

fn init(_config: &Value) -> Result<(), PluginError> {
    Err(PluginError::new("failing-init: config.token is required"))
}

fn execute(_ctx: &mut Context) -> Result<(), PluginError> {
    Ok(())
}

export_plugin!(execute, init = init);
