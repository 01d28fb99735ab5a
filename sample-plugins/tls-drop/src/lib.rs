//! Fixture: counts calls per thread in a `thread_local!` whose value has a
//! `Drop`, and answers `calls_here` (this thread's count) and `generation`
//! (from its config). With `drop_file` in its config, each value's `Drop`
//! appends a line to that file, so a test can tell it ran.
//!
//! Measured on glibc 2.36 with Rust 1.95: the first call on a thread makes
//! the plugin's std register the value's destructor with
//! `__cxa_thread_atexit_impl`; glibc alone then keeps the library mapped
//! after `dlclose` until that thread exits (a pinned library).

use std::cell::Cell;
use std::io::Write;
use std::sync::OnceLock;

use plugin_abi::{Context, PluginError, Value, export_plugin};

static GENERATION: OnceLock<String> = OnceLock::new();
static DROP_FILE: OnceLock<String> = OnceLock::new();

struct PerThread {
    calls: Cell<i64>,
}

impl Drop for PerThread {
    fn drop(&mut self) {
        if let Some(path) = DROP_FILE.get()
            && let Ok(mut file) = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
        {
            let _ = writeln!(file, "dropped after {} call(s)", self.calls.get());
        }
    }
}

thread_local! {
    static HERE: PerThread = const { PerThread { calls: Cell::new(0) } };
}

fn init(config: &Value) -> Result<(), PluginError> {
    let field = |key: &str| {
        config
            .as_map()
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
    };
    let _ = GENERATION.set(field("generation").unwrap_or("v1").to_owned());
    if let Some(path) = field("drop_file") {
        let _ = DROP_FILE.set(path.to_owned());
    }
    Ok(())
}

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    let calls = HERE.with(|here| {
        here.calls.set(here.calls.get() + 1);
        here.calls.get()
    });
    ctx.set("calls_here", calls);
    ctx.set("generation", GENERATION.get().map_or("v1", String::as_str));
    Ok(())
}

export_plugin!(execute, init = init);
