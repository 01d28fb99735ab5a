//! Deadlines, cancellation and overload: the `slow` fixture holds workers
//! while other calls time out in the queue, are cancelled, or are refused.

mod support;

use std::time::{Duration, Instant};

use dynplug::{Context, Error, PluginManager};
use support::{call, install_as, manager_with, manifest};
use tempfile::TempDir;

#[test]
fn deadline_stops_a_slow_plugin() {
    let (_dir, manager) = manager_with(&["slow"]);
    manager.load_plugins().unwrap();
    let started = Instant::now();
    let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(100));
    let err = call(&manager, "slow", &mut ctx).unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "returned at the deadline"
    );
    assert_eq!(ctx.label(), "spin", "the label is given back");
}

/// `slow`, `pooled`, with one worker and, optionally, a queue limit.
fn one_worker_slow(queue_limit: Option<usize>) -> (TempDir, PluginManager, dynplug::Executor) {
    let dir = tempfile::tempdir().unwrap();
    let pooled = manifest("slow", "slow", "0.1.0", r#""isolation": "pooled""#);
    install_as(dir.path(), "slow", "slow", Some(&pooled));
    let mut builder = PluginManager::builder(dir.path()).pool_size(1);
    if let Some(calls) = queue_limit {
        builder = builder.queue_limit(calls);
    }
    let manager = builder.build().unwrap();
    manager.load_plugins().unwrap();
    let (_, slow) = manager.get_plugin("slow").unwrap();
    (dir, manager, slow)
}

/// Starts a `slow` call on another thread that runs until the returned
/// token is cancelled. With `running`, waits until the plugin runs it (it
/// holds a worker); else until the pool has counted it (queued or running).
fn hold_a_worker(
    slow: &dynplug::Executor,
    running: bool,
) -> (
    dynplug::CancelToken,
    std::thread::JoinHandle<Result<(), Error>>,
) {
    let marker = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&marker).unwrap();
    let busy = slow.busy();
    let mut ctx = Context::new("spin").with("started_file", marker.to_str().unwrap());
    let token = ctx.cancel_token();
    let slow_ = slow.clone();
    let call = std::thread::spawn(move || slow_.execute(&mut ctx));
    let started = Instant::now();
    while if running {
        !marker.exists()
    } else {
        slow.busy() == busy
    } {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the call started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    (token, call)
}

#[test]
fn a_call_whose_deadline_passes_in_the_queue_is_not_started() {
    let (_dir, manager, slow) = one_worker_slow(None);
    let (stop, busy) = hold_a_worker(&slow, true);
    for _ in 0..3 {
        let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(50));
        let err = slow.execute(&mut ctx).unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
    }
    stop.cancel();
    let err = busy.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    // The three expired calls were dequeued without running the plugin: this
    // call is the second one the plugin started.
    let mut ctx = Context::new("count");
    slow.execute(&mut ctx).unwrap();
    assert_eq!(ctx.get_i64("started"), Some(2));
    assert_eq!(
        manager.info("slow").unwrap().calls.errors,
        4,
        "they still count as failed calls (with the cancelled one)"
    );
}

#[test]
fn past_the_queue_limit_a_call_fails_at_once_as_overloaded() {
    let (_dir, _manager, slow) = one_worker_slow(Some(1));
    let (stop_running, running) = hold_a_worker(&slow, true);
    let (stop_queued, queued) = hold_a_worker(&slow, false);
    let started = Instant::now();
    let mut ctx = Context::new("count");
    let err = slow.execute(&mut ctx).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not queued"
    );
    assert!(matches!(err, Error::Overloaded { limit: 1, .. }), "{err}");
    assert_eq!(err.to_string(), "slow: overloaded: queue full (1 waiting)");
    assert_eq!(ctx.label(), "count", "the context comes back");
    // The queued one first, so it is cancelled before a worker takes it.
    stop_queued.cancel();
    stop_running.cancel();
    running.join().unwrap().unwrap_err();
    queued.join().unwrap().unwrap_err();
    slow.execute(&mut ctx).unwrap();
    assert_eq!(
        ctx.get_i64("started"),
        Some(2),
        "the refused call never reached the plugin (the queued one, cancelled, did not start either)"
    );
}

#[test]
fn an_overloaded_async_call_can_be_retried_with_its_context() {
    let (_dir, _manager, slow) = one_worker_slow(Some(0));
    let (stop, running) = hold_a_worker(&slow, true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ctx = Context::new("count");
    let err = runtime.block_on(slow.execute_async(&mut ctx)).unwrap_err();
    assert!(matches!(err, Error::Overloaded { limit: 0, .. }), "{err}");
    assert!(
        !ctx.is_cancelled(),
        "a refused call's context is not cancelled"
    );
    stop.cancel();
    running.join().unwrap().unwrap_err();
    runtime.block_on(slow.execute_async(&mut ctx)).unwrap();
    assert_eq!(ctx.get_i64("started"), Some(2));
}

#[test]
fn cancel_from_another_thread_stops_a_slow_plugin() {
    for isolation in ["pooled", "inline"] {
        let dir = tempfile::tempdir().unwrap();
        install_as(
            dir.path(),
            "slow",
            "slow",
            Some(&manifest(
                "slow",
                "slow",
                "0.1.0",
                &format!(r#""isolation": "{isolation}""#),
            )),
        );
        let manager = PluginManager::new(dir.path()).unwrap();
        manager.load_plugins().unwrap();
        let mut ctx = Context::new("spin");
        let token = ctx.cancel_token();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            token.cancel();
        });
        let started = Instant::now();
        let err = call(&manager, "slow", &mut ctx).unwrap_err();
        canceller.join().unwrap();
        assert!(matches!(err, Error::Cancelled { .. }), "{isolation}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            ctx.get_i64("iterations").unwrap() > 0,
            "{isolation}: the plugin saw the call run"
        );
    }
}

/// The async path honours the context's deadline by itself (no runtime
/// timer around it), and leaves the context as the blocking path does.
#[test]
fn execute_async_returns_at_the_deadline_with_the_context_given_back() {
    let (dir, manager) = manager_with(&["slow"]);
    manager.load_plugins().unwrap();
    let (_, slow) = manager.get_plugin("slow").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(100);
    // A plugin that ignores its deadline: only the host can return on time.
    let mut ctx = Context::new("spin")
        .with("max_ms", 1_000)
        .with("stubborn", true)
        .with_deadline(deadline);
    let token = ctx.cancel_token();
    let err = runtime.block_on(slow.execute_async(&mut ctx)).unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
    assert!(Instant::now() < deadline + Duration::from_secs(5));
    assert_eq!(ctx.label(), "spin");
    assert_eq!(ctx.deadline(), Some(deadline));
    assert!(ctx.get("max_ms").is_none(), "the values stay with the call");
    assert!(token.is_cancelled(), "the abandoned call is cancelled");

    // A future dropped while the plugin runs: the same state, and cancelled.
    let marker = dir.path().join(".running");
    let mut ctx = Context::new("spin")
        .with("max_ms", 60_000)
        .with("started_file", marker.to_str().unwrap());
    let token = ctx.cancel_token();
    runtime.block_on(async {
        let call = slow.execute_async(&mut ctx);
        tokio::pin!(call);
        tokio::select! {
            _ = &mut call => panic!("slow answered while running"),
            () = exists(&marker) => {}
        }
    });
    assert_eq!(ctx.label(), "spin");
    assert!(token.is_cancelled());
    // The abandoned call ends once it sees the cancellation: drained.
    assert_eq!(
        manager.unload("slow").unwrap(),
        dynplug::PluginState::Unloaded
    );
}

/// Resolves once `path` exists (checked from a thread: the runtime has no
/// timer driver).
async fn exists(path: &std::path::Path) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let started = Instant::now();
        while !path.exists() && started.elapsed() < support::PATIENCE {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = tx.send(());
    });
    let _ = rx.await;
}
