//! Failure fixture: panics in `execute` on label `panic`, answers on `ok`.

use plugin_abi::{Context, PluginError, export_plugin};

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    match ctx.label() {
        "ok" => {
            ctx.set("ok", true);
            Ok(())
        }
        _ => panic!(
            "panicking plugin: deliberate panic on label {}",
            ctx.label()
        ),
    }
}

export_plugin!(execute);
