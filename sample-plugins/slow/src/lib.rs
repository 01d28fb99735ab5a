//! Failure fixture: loops until the call is cancelled or past its deadline
//! (or `max_ms`, default 10 s, as a safety net). With a `started_file` value,
//! it creates that file once it runs, so a test knows the call holds a worker.
//! Label `count` returns how many calls this copy has started, itself
//! included, without looping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use plugin_abi::{Context, PluginError, export_plugin};

static STARTED: AtomicI64 = AtomicI64::new(0);

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
    if let Some(path) = ctx.get_str("started_file") {
        std::fs::write(path, b"").map_err(|e| PluginError::new(format!("{path}: {e}")))?;
    }
    let start = Instant::now();
    let mut iterations = 0_i64;
    while !ctx.is_cancelled() && start.elapsed() < max {
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

export_plugin!(execute);
