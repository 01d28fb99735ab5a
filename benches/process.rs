//! `isolation: "process"` against `pooled` and `inline`, in one run, with
//! the plugin and values of `benches/call.rs` (`hello`'s `bench.noop`: two
//! strings in, one out).
//!
//! Run: `cargo bench --bench process` (builds the sample plugins and the
//! `dynplug` binary, the runner, in release mode first). Prints:
//! * the round trip of one call at a time, p50/p99/p99.9 over 100,000
//!   calls (blocking `execute`), and p50/p99 of `execute_async` on a
//!   current-thread runtime;
//! * calls per second with 16 concurrent callers (3 s each);
//! * spawn → first call: a new manager loads the plugin (the runner starts,
//!   loads the library, answers Ping) and calls it once, p50 of 30.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dynplug::{Context, Executor, PluginManager};

fn bench_context() -> Context {
    Context::new("bench.noop")
        .with("a", "first value")
        .with("b", "second value")
}

fn install(dir: &std::path::Path, name: &str, isolation: &str) {
    let manifest = support::manifest(
        name,
        "hello",
        "1.0.0",
        &format!(r#""isolation": "{isolation}""#),
    );
    support::install_as(dir, "hello", name, Some(&manifest));
}

fn manager(dir: &std::path::Path) -> PluginManager {
    PluginManager::builder(dir)
        .process_runner(support::runner())
        .build()
        .unwrap()
}

fn quantiles(samples: &mut [Duration]) -> impl Fn(f64) -> Duration + '_ {
    samples.sort();
    move |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]
}

fn round_trip(name: &str, executor: &Executor) {
    let mut ctx = bench_context();
    for _ in 0..10_000 {
        executor.execute(&mut ctx).unwrap();
    }
    let mut samples: Vec<Duration> = (0..100_000)
        .map(|_| {
            let start = Instant::now();
            executor.execute(&mut ctx).unwrap();
            start.elapsed()
        })
        .collect();
    assert_eq!(ctx.get_str("out"), Some("first value"));
    let at = quantiles(&mut samples);
    println!(
        "{name:>8} round trip: p50 {:>9.2?}  p99 {:>9.2?}  p99.9 {:>9.2?}  (100000 calls, one at a time)",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn round_trip_async(name: &str, executor: &Executor) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut samples = runtime.block_on(async {
        let mut ctx = bench_context();
        for _ in 0..5_000 {
            executor.execute_async(&mut ctx).await.unwrap();
        }
        let mut samples = Vec::with_capacity(50_000);
        for _ in 0..50_000 {
            let start = Instant::now();
            executor.execute_async(&mut ctx).await.unwrap();
            samples.push(start.elapsed());
        }
        samples
    });
    let at = quantiles(&mut samples);
    println!(
        "{name:>8} async round trip: p50 {:>9.2?}  p99 {:>9.2?}  (50000 calls, current-thread runtime)",
        at(0.50),
        at(0.99)
    );
}

fn throughput(name: &str, executor: &Executor, callers: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let (executor, stop, count) = (executor.clone(), Arc::clone(&stop), Arc::clone(&count));
            std::thread::spawn(move || {
                let mut ctx = bench_context();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    executor.execute(&mut ctx).unwrap();
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let run = Duration::from_secs(3);
    let start = Instant::now();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{name:>8} with {callers} callers: {rate:>10.0} calls/s");
    rate
}

fn spawn_to_first_call(dir: &std::path::Path) {
    let mut samples: Vec<Duration> = (0..30)
        .map(|_| {
            let start = Instant::now();
            let manager = manager(dir);
            manager.load_plugin("hello-process").unwrap();
            let (_, executor) = manager.get_plugin("hello-process").unwrap();
            executor.execute(&mut bench_context()).unwrap();
            let took = start.elapsed();
            manager.unload_all();
            took
        })
        .collect();
    let at = quantiles(&mut samples);
    println!(
        " process spawn -> first call: p50 {:.2?}  p90 {:.2?}  (30 loads)",
        at(0.5),
        at(0.9)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    let dir = tempfile::tempdir().unwrap();
    for isolation in ["inline", "pooled", "process"] {
        install(dir.path(), &format!("hello-{isolation}"), isolation);
    }
    let manager = manager(dir.path());
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let executor = |isolation: &str| manager.get_plugin(&format!("hello-{isolation}")).unwrap().1;
    for isolation in ["inline", "pooled", "process"] {
        round_trip(isolation, &executor(isolation));
    }
    for isolation in ["pooled", "process"] {
        round_trip_async(isolation, &executor(isolation));
    }
    let pooled = throughput("pooled", &executor("pooled"), 16);
    let process = throughput("process", &executor("process"), 16);
    println!(
        "  process / pooled with 16 callers: {:.2}x",
        process / pooled
    );
    manager.unload_all();
    let spawn_dir = tempfile::tempdir().unwrap();
    install(spawn_dir.path(), "hello-process", "process");
    spawn_to_first_call(spawn_dir.path());
}
