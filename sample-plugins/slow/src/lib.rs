//! Failure fixture: loops until the call is cancelled or past its deadline
//! (or `max_ms`, default 10 s, as a safety net; with `stubborn` set it
//! ignores cancellation and runs until `max_ms`). With a `hold_file` value
//! (or query parameter), it blocks while that file exists, ignoring
//! cancellation, as a plugin stuck on a lock would (`max_ms` still applies).
//! With a `started_file` value, it creates that file once it runs, so a
//! test knows the call holds a thread.
//! Label `count` returns how many calls this copy has started, itself
//! included, without looping.
//!
//! Its `init` and `shutdown` can be made slow through the manifest's config:
//! `init_ms` (sleep that long in `init`, after creating `init_file` if
//! given), `init_hold_file` (then block while that file exists, for at most
//! a minute, so a test ends the `init` when it is ready) and `shutdown_ms`
//! (sleep that long in `shutdown`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use plugin_abi::{Context, PluginError, Value, export_plugin};

static STARTED: AtomicI64 = AtomicI64::new(0);
static SHUTDOWN_MS: AtomicI64 = AtomicI64::new(0);

fn init(config: &Value) -> Result<(), PluginError> {
    let get = |key: &str| config.as_map().and_then(|m| m.get(key));
    if let Some(path) = get("init_file").and_then(Value::as_str) {
        std::fs::write(path, b"").map_err(|e| PluginError::new(format!("{path}: {e}")))?;
    }
    let ms = |key: &str| get(key).and_then(Value::as_i64).unwrap_or(0).max(0);
    SHUTDOWN_MS.store(ms("shutdown_ms"), Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(ms("init_ms") as u64));
    if let Some(path) = get("init_hold_file").and_then(Value::as_str) {
        let start = Instant::now();
        while std::path::Path::new(path).exists() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

fn shutdown() {
    let ms = SHUTDOWN_MS.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(ms as u64));
}

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    let started = STARTED.fetch_add(1, Ordering::Relaxed) + 1;
    if ctx.label() == "count" {
        ctx.set("started", started);
        return Ok(());
    }
    // `max_ms` as a value, or in the query string when called over HTTP.
    let from_query = ctx
        .get("query")
        .and_then(|q| q.as_map()?.get("max_ms")?.as_str()?.parse::<i64>().ok());
    let max_ms = ctx.get_i64("max_ms").or(from_query).unwrap_or(10_000);
    let max = Duration::from_millis(max_ms.max(0) as u64);
    let started_file = ctx
        .get_str("started_file")
        .map(str::to_owned)
        .or_else(|| ctx.get_str_in("query", "started_file").map(str::to_owned));
    if let Some(path) = started_file {
        std::fs::write(&path, b"").map_err(|e| PluginError::new(format!("{path}: {e}")))?;
    }
    let hold_file = ctx
        .get_str("hold_file")
        .map(str::to_owned)
        .or_else(|| ctx.get_str_in("query", "hold_file").map(str::to_owned));
    let start = Instant::now();
    let mut iterations = 0_i64;
    if let Some(path) = hold_file {
        while std::path::Path::new(&path).exists() && start.elapsed() < max {
            std::thread::sleep(Duration::from_millis(1));
            iterations += 1;
        }
        ctx.set("iterations", iterations);
        return Ok(());
    }
    // `stubborn`: ignores cancellation and deadlines, as a badly written
    // plugin would; only `max_ms` stops it.
    let stubborn = ctx.get_bool("stubborn").unwrap_or(false);
    while (stubborn || !ctx.is_cancelled()) && start.elapsed() < max {
        std::thread::sleep(Duration::from_millis(1));
        iterations += 1;
    }
    ctx.set("iterations", iterations);
    if ctx.is_cancelled() {
        return Err(PluginError::new(format!(
            "slow: stopped after {} ms",
            start.elapsed().as_millis()
        )));
    }
    Ok(())
}

export_plugin!(execute, init = init, shutdown = shutdown);
