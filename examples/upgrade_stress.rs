//! Hot-upgrade stress: N upgrades of the `counter` sample under concurrent load.
//!
//! Run: `cargo run --release --example upgrade_stress -- --upgrades 500 --threads 8`
//!
//! Each upgrade writes a complete plugin directory under a dot name, then
//! renames the old directory away and the new one into place (what the README
//! tells operators to do), and waits until a caller is answered by the new
//! version. It prints calls made and failed, upgrades done, the latency from
//! rename to first call served by the new version (watcher settle time
//! included), the shadow copies still mapped, and RSS at start and end.
//! Exits non-zero if a call failed or more than one copy stays mapped (an
//! `inline` one only without thread tracking).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dynplug::{Context, Event, PluginManager};

#[derive(Parser)]
struct Args {
    /// Upgrades to perform.
    #[arg(long, default_value_t = 500)]
    upgrades: u64,
    /// Threads calling the plugin continuously.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// `auto` (the default isolation), `pooled` or `inline`.
    #[arg(long, default_value = "auto")]
    isolation: String,
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn write_version(base: &std::path::Path, generation: u64, isolation: &str) {
    let staging = base.join(format!(".counter.staging-{generation}"));
    std::fs::create_dir(&staging).unwrap();
    let lib = support::library("counter");
    std::fs::copy(&lib, staging.join(lib.file_name().unwrap())).unwrap();
    let manifest = support::manifest(
        "counter",
        "counter",
        &format!("1.0.{generation}"),
        &format!(r#""isolation": "{isolation}", "config": {{"generation": "{generation}"}}"#),
    );
    std::fs::write(staging.join("plugin.json"), manifest).unwrap();
    support::replace_dir(&staging, &base.join("counter"));
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    support::built();
    write_version(base, 0, &args.isolation);
    let manager = PluginManager::new(base).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let watcher = manager.watch().unwrap();
    let (_, counter) = manager.get_plugin("counter").unwrap();

    let origin = Instant::now();
    let first_seen: Arc<Vec<AtomicU64>> = Arc::new(
        (0..=args.upgrades)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..args.threads)
        .map(|_| {
            let (counter, first_seen, stop) =
                (counter.clone(), Arc::clone(&first_seen), Arc::clone(&stop));
            let (calls, failed) = (Arc::clone(&calls), Arc::clone(&failed));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut ctx = Context::new("counter.incr");
                    match counter.execute(&mut ctx) {
                        Ok(()) => {
                            let generation: usize = ctx
                                .get_str("generation")
                                .and_then(|g| g.parse().ok())
                                .unwrap_or(0);
                            let now = origin.elapsed().as_nanos() as u64;
                            first_seen[generation].fetch_min(now, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("call failed: {e}");
                            }
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(200));
    let rss_start = rss_kib();
    let mut latencies = Vec::with_capacity(args.upgrades as usize);
    let mut timed_out = 0;
    for generation in 1..=args.upgrades {
        let renamed = origin.elapsed().as_nanos() as u64;
        write_version(base, generation, &args.isolation);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = first_seen[generation as usize].load(Ordering::Relaxed);
            if seen != u64::MAX {
                latencies.push(Duration::from_nanos(seen.saturating_sub(renamed)));
                break;
            }
            if Instant::now() > deadline {
                timed_out += 1;
                eprintln!("upgrade {generation} not serving after 5 s");
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    // Let the last old version drain and unload before counting mappings.
    let last = format!("1.0.{}", args.upgrades - 1);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match events.try_recv() {
            Ok(Some(
                Event::Unloaded { version, .. }
                | Event::Retained { version, .. }
                | Event::Leaked { version, .. },
            )) if version == last => break,
            Ok(Some(_)) => {}
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let rss_end = rss_kib();
    let mapped = support::mapped_under(base).len();
    let info = manager.info("counter").unwrap();
    drop(watcher);

    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let (calls, failed) = (
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!("isolation:               {}", args.isolation);
    println!("calls made:              {calls}");
    println!("calls failed:            {failed}");
    println!(
        "upgrades done:           {} (events: {} upgrades, {} unloads, {} retired)",
        latencies.len(),
        info.upgrades,
        info.unloads,
        info.retired.len()
    );
    println!("upgrades not serving:    {timed_out}");
    println!("rename -> serving p50:   {:?}", at(0.50));
    println!("rename -> serving p99:   {:?}", at(0.99));
    println!(
        "rename -> serving max:   {:?}",
        latencies.last().copied().unwrap_or_default()
    );
    println!("copies still mapped:     {mapped}");
    println!(
        "RSS start / end:         {} KiB / {} KiB ({:+} KiB)",
        rss_start,
        rss_end,
        rss_end as i64 - rss_start as i64
    );
    if let Some(keys) = manager.tls_keys_in_use() {
        println!("pthread keys in use:     {keys} of 1024");
    }
    // Every isolation unloads its old copies, `inline` only with thread
    // tracking.
    let unloads = args.isolation != "inline" || manager.tracks_threads();
    if failed > 0 || timed_out > 0 || (unloads && mapped > 1) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
