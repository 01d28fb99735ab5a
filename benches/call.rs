//! Call overhead and load time of native plugins.
//!
//! Run: `cargo bench --bench call` (builds the sample plugins in release mode first).
//!
//! * `call/baseline`: a plain Rust function doing the same work over a
//!   `HashMap<String, String>`: read two strings, write one.
//! * `call/inline`, `call/auto` (the default isolation), `call/pooled`: the
//!   `hello` plugin's `bench.noop` label (the same work) through an
//!   `Executor`.
//! * `load/100_plugins`: `PluginManager::new` + `load_plugins` over 100 plugins.
//!
//! Before the criterion groups it prints p50/p99 of pooled and inline round
//! trips measured one call at a time.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use dynplug::{Context, Executor, PluginManager};

fn baseline<S: std::hash::BuildHasher>(map: &mut HashMap<String, String, S>) {
    let a = map.get("a").cloned().unwrap_or_default();
    let _b = map.get("b");
    map.insert("out".to_owned(), a);
}

fn bench_context() -> Context {
    Context::new("bench.noop")
        .with("a", "first value")
        .with("b", "second value")
}

/// `hello` installed three times: `inline`, `auto` (the default) and `pooled`.
fn executors(dir: &std::path::Path) -> (PluginManager, [Executor; 3]) {
    for isolation in ["inline", "auto", "pooled"] {
        let name = format!("hello-{isolation}");
        let extra = format!(r#""isolation": "{isolation}""#);
        let manifest = support::manifest(&name, "hello", "1.0.0", &extra);
        support::install_as(dir, "hello", &name, Some(&manifest));
    }
    let manager = PluginManager::new(dir).unwrap();
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let executor = |isolation: &str| manager.get_plugin(&format!("hello-{isolation}")).unwrap().1;
    let executors = [executor("inline"), executor("auto"), executor("pooled")];
    (manager, executors)
}

fn percentiles(name: &str, executor: &Executor) {
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
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name}: p50 {:?}  p99 {:?}  p99.9 {:?}  (100000 calls, one at a time)",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn calls(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, [inline, auto, pooled]) = executors(dir.path());
    percentiles("inline round trip", &inline);
    percentiles("auto round trip", &auto);
    percentiles("pooled round trip", &pooled);

    let mut group = c.benchmark_group("call");
    let mut map: HashMap<String, String> = [("a", "first value"), ("b", "second value")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    group.bench_function("baseline", |b| b.iter(|| baseline(black_box(&mut map))));
    // The same baseline with the hasher dynplug's Context uses, for transparency.
    let mut fold: HashMap<String, String, foldhash::fast::RandomState> =
        map.clone().into_iter().collect();
    group.bench_function("baseline_foldhash", |b| {
        b.iter(|| baseline(black_box(&mut fold)))
    });
    let mut ctx = bench_context();
    group.bench_function("inline", |b| {
        b.iter(|| inline.execute(black_box(&mut ctx)).unwrap())
    });
    group.bench_function("auto", |b| {
        b.iter(|| auto.execute(black_box(&mut ctx)).unwrap())
    });
    group.bench_function("pooled", |b| {
        b.iter(|| pooled.execute(black_box(&mut ctx)).unwrap())
    });
    group.finish();
}

fn loading(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..100 {
        let name = format!("hello-{i:03}");
        support::install_as(
            dir.path(),
            "hello",
            &name,
            Some(&support::manifest(&name, "hello", "1.0.0", "")),
        );
    }
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("100_plugins", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let manager = PluginManager::new(dir.path()).unwrap();
                let report = manager.load_plugins().unwrap();
                total += start.elapsed();
                assert_eq!(report.loaded.len(), 100);
                manager.unload_all();
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, calls, loading);
criterion_main!(benches);
