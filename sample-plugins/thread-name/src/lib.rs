//! Fixture: calls `std::thread::current()` on every call and answers with
//! the calling thread's name and id (`thread`, `id`), and the `generation`
//! of its config.
//!
//! Measured on glibc 2.36 with Rust 1.95: the plugin's own std then creates
//! one pthread key per loaded copy, whose destructor is in this library, and
//! sets it on every thread that calls. Without dynplug's thread tracking
//! that key is never given back (glibc has 1,024: about 1,020 loaded copies
//! abort the process), and a thread that called a copy since closed crashes
//! when it exits.

use std::sync::OnceLock;

use plugin_abi::{Context, PluginError, Value, export_plugin};

static GENERATION: OnceLock<String> = OnceLock::new();

fn init(config: &Value) -> Result<(), PluginError> {
    let generation = config
        .as_map()
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_str)
        .unwrap_or("v1");
    let _ = GENERATION.set(generation.to_owned());
    Ok(())
}

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    let thread = std::thread::current();
    ctx.set("thread", thread.name().unwrap_or(""));
    ctx.set("id", format!("{:?}", thread.id()));
    ctx.set("generation", GENERATION.get().map_or("v1", String::as_str));
    Ok(())
}

export_plugin!(execute, init = init);
