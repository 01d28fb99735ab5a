//! Sample plugin: state kept across calls, `init` with config, `shutdown`.
//!
//! Config: `{"start": 0, "step": 1, "generation": "v1", "shutdown_marker": "/path"}`
//! (all optional). `shutdown` writes the final count to `shutdown_marker`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use plugin_abi::{Context, PluginError, Value, export_plugin};

static COUNT: AtomicI64 = AtomicI64::new(0);
static STEP: AtomicI64 = AtomicI64::new(1);
static GENERATION: Mutex<String> = Mutex::new(String::new());
static SHUTDOWN_MARKER: Mutex<Option<String>> = Mutex::new(None);

fn init(config: &Value) -> Result<(), PluginError> {
    let field = |key: &str| config.as_map().and_then(|m| m.get(key));
    if let Some(start) = field("start") {
        let start = start.as_i64().ok_or("config.start must be an integer")?;
        COUNT.store(start, Ordering::SeqCst);
    }
    if let Some(step) = field("step") {
        STEP.store(
            step.as_i64().ok_or("config.step must be an integer")?,
            Ordering::SeqCst,
        );
    }
    let generation = field("generation").and_then(Value::as_str).unwrap_or("v1");
    *GENERATION.lock().unwrap() = generation.to_owned();
    *SHUTDOWN_MARKER.lock().unwrap() = field("shutdown_marker")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(())
}

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    let count = match ctx.label() {
        "counter.incr" => {
            let step = STEP.load(Ordering::SeqCst);
            COUNT.fetch_add(step, Ordering::SeqCst) + step
        }
        "counter.get" => COUNT.load(Ordering::SeqCst),
        other => return Err(PluginError::new(format!("unknown label {other}"))),
    };
    let generation = GENERATION.lock().unwrap().clone();
    // Called through the HTTP façade: answer with a JSON body.
    if ctx.get_str("method").is_some() {
        let body = format!(r#"{{"count":{count},"generation":"{generation}"}}"#);
        ctx.set("response.body", body);
        let headers = [("content-type".to_owned(), Value::from("application/json"))];
        ctx.set(
            "response.headers",
            Value::Map(headers.into_iter().collect()),
        );
    }
    ctx.set("count", count);
    ctx.set("generation", generation);
    Ok(())
}

fn shutdown() {
    if let Some(path) = SHUTDOWN_MARKER.lock().unwrap().take() {
        let _ = std::fs::write(path, COUNT.load(Ordering::SeqCst).to_string());
    }
}

export_plugin!(execute, init = init, shutdown = shutdown);
