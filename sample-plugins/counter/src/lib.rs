//! Sample plugin: typed state built by `init` from the config, kept across
//! calls, handed to `shutdown` (the `Plugin` trait).
//!
//! Config: `{"start": 0, "step": 1, "generation": "v1", "shutdown_marker": "/path"}`
//! (all optional). `shutdown` writes the final count to `shutdown_marker`.

use std::sync::atomic::{AtomicI64, Ordering};

use plugin_abi::{Context, Plugin, PluginError, Value, export_plugin};

struct Counter {
    count: AtomicI64,
    step: i64,
    generation: String,
    shutdown_marker: Option<String>,
}

impl Plugin for Counter {
    fn init(config: &Value) -> Result<Self, PluginError> {
        let field = |key: &str| config.as_map().and_then(|m| m.get(key));
        let int = |key: &str, default: i64| match field(key) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| PluginError::new(format!("config.{key} must be an integer"))),
        };
        Ok(Counter {
            count: AtomicI64::new(int("start", 0)?),
            step: int("step", 1)?,
            generation: field("generation")
                .and_then(Value::as_str)
                .unwrap_or("v1")
                .to_owned(),
            shutdown_marker: field("shutdown_marker")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    fn execute(&self, ctx: &mut Context) -> Result<(), PluginError> {
        let count = match ctx.label() {
            "counter.incr" => self.count.fetch_add(self.step, Ordering::SeqCst) + self.step,
            "counter.get" => self.count.load(Ordering::SeqCst),
            other => return Err(PluginError::new(format!("unknown label {other}"))),
        };
        // Over HTTP the reply is what it sets: {"count": N, "generation": "v1"}.
        ctx.set("count", count);
        ctx.set("generation", self.generation.as_str());
        Ok(())
    }

    fn shutdown(self) {
        if let Some(path) = self.shutdown_marker {
            let _ = std::fs::write(path, self.count.load(Ordering::SeqCst).to_string());
        }
    }
}

export_plugin!(plugin = Counter);
