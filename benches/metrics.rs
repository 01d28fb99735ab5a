//! The request path's latency histogram against `prometheus-client`'s, in
//! the same run: `cargo bench --bench metrics`.
//!
//! One observation per façade request. Measured alone and with two threads
//! observing the same histogram at once (the machines this runs on have two
//! cores, and the façade serves on both).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use dynplug::serve::bench::Histogram;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;

const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];
const LATENCY: Duration = Duration::from_micros(37);

/// Runs `observe` `iters` times on each of two threads at once; the time of
/// the slower thread, per observation of one thread.
fn contended(iters: u64, observe: impl Fn() + Send + Sync + 'static) -> Duration {
    let observe = Arc::new(observe);
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (observe, barrier) = (Arc::clone(&observe), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                for _ in 0..iters {
                    observe();
                }
                started.elapsed()
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let ours = Arc::new(Histogram::default());
    let theirs = Arc::new(PromHistogram::new(BUCKETS));
    let mut group = c.benchmark_group("observe");
    group.bench_function("dynplug", |b| b.iter(|| ours.observe(LATENCY)));
    group.bench_function("prometheus_client", |b| {
        b.iter(|| theirs.observe(LATENCY.as_secs_f64()))
    });
    group.bench_function("dynplug_2_threads", |b| {
        let ours = Arc::clone(&ours);
        b.iter_custom(move |iters| {
            let ours = Arc::clone(&ours);
            contended(iters, move || ours.observe(LATENCY))
        })
    });
    group.bench_function("prometheus_client_2_threads", |b| {
        let theirs = Arc::clone(&theirs);
        b.iter_custom(move |iters| {
            let theirs = Arc::clone(&theirs);
            contended(iters, move || theirs.observe(LATENCY.as_secs_f64()))
        })
    });
    group.finish();
}

criterion_group!(metrics, benches);
criterion_main!(metrics);
