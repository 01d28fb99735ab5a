//! Failure fixture: answers every call, but the dynamic loader never unmaps
//! it (see `build.rs`), so an unload must report it leaked, never unloaded.

use plugin_abi::{Context, PluginError, export_plugin};

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    ctx.set("pinned", true);
    Ok(())
}

export_plugin!(execute);
