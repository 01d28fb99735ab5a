//! What plugin code leaves on threads, and unloading despite it: a plugin
//! that calls `std::thread::current()` gives its pthread key back with each
//! version (so it can be upgraded past glibc's 1,024 keys), and a plugin with
//! a `thread_local!` holding a `Drop` type is reported pinned, then unloaded
//! once the threads that called it let go. Test binaries export dynplug's
//! interposers (`build.rs`), as the `dynplug` binary does.

mod support;

use std::sync::mpsc;
use std::time::Instant;

use dynplug::{Context, Event, PluginManager, PluginState};
use support::{PATIENCE, install_as, manifest, mapped_under, wait_for_event};

/// Installs `sample` as `name`, version `1.0.<generation>`, default isolation
/// unless `isolation` is given, with `extra_config` in its config.
fn install_version(
    base: &std::path::Path,
    sample: &str,
    name: &str,
    generation: u64,
    isolation: Option<&str>,
    extra_config: &str,
) {
    let isolation = isolation
        .map(|i| format!(r#""isolation": "{i}", "#))
        .unwrap_or_default();
    let extra = format!(r#"{isolation}"config": {{"generation": "v{generation}"{extra_config}}}"#);
    let text = manifest(name, sample, &format!("1.0.{generation}"), &extra);
    install_as(base, sample, name, Some(&text));
}

fn ended(events: &mut dynplug::Events, plugin: &str, version: &str) -> Event {
    let what = format!("{plugin} {version} to end");
    wait_for_event(events, &what, |e| match e {
        Event::Unloaded {
            plugin: p,
            version: v,
        }
        | Event::Leaked {
            plugin: p,
            version: v,
            ..
        }
        | Event::Retained {
            plugin: p,
            version: v,
        }
        | Event::Pinned {
            plugin: p,
            version: v,
            ..
        } => p == plugin && v == version,
        _ => false,
    })
}

#[test]
fn the_test_binary_lets_dynplug_see_plugin_threads() {
    let (_dir, manager) = support::manager_with(&[]);
    assert!(
        manager.tracks_threads(),
        "build.rs exports the interposers for test binaries"
    );
}

/// Upgrades `thread-name` (which calls `std::thread::current()`) while
/// long-lived threads keep calling it in place: every old version is
/// unloaded, and the pthread keys in use do not grow with the versions.
fn upgrade_thread_name(upgrades: u64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_version(base, "thread-name", "thread-name", 0, None, "");
    let manager = PluginManager::new(base).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let (_, executor) = manager.get_plugin("thread-name").unwrap();
    // Threads that outlive every version, as a server's workers do.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let callers: Vec<_> = (0..2)
        .map(|i| {
            let (executor, stop) = (executor.clone(), stop_rx.clone());
            std::thread::Builder::new()
                .name(format!("caller-{i}"))
                .spawn(move || {
                    let mut calls = 0_u64;
                    while stop.try_recv() == Err(crossbeam_channel::TryRecvError::Empty) {
                        let mut ctx = Context::new("any");
                        executor.execute(&mut ctx).unwrap();
                        // The plugin's own std does not know the host's
                        // thread names, but it did make its handle.
                        assert!(ctx.get_str("id").is_some());
                        calls += 1;
                    }
                    calls
                })
                .unwrap()
        })
        .collect();
    let mut ctx = Context::new("any");
    executor.execute(&mut ctx).unwrap();
    let keys_at_start = manager.tls_keys_in_use().unwrap();
    let rss_at_start = rss_kib();
    for generation in 1..=upgrades {
        install_version(base, "thread-name", "thread-name", generation, None, "");
        manager.load_plugin("thread-name").unwrap();
        // The test thread calls the new version too (one more thread that
        // holds its key).
        let mut ctx = Context::new("any");
        executor.execute(&mut ctx).unwrap();
        assert_eq!(
            ctx.get_str("generation"),
            Some(format!("v{generation}").as_str())
        );
        let old = format!("1.0.{}", generation - 1);
        match ended(&mut events, "thread-name", &old) {
            Event::Unloaded { .. } => {}
            // Held by a caller that has not called since: it lets go at
            // its next call, then the version is unloaded.
            Event::Pinned { .. } => {
                wait_for_event(
                    &mut events,
                    "the pinned version to unload",
                    |e| matches!(e, Event::Unloaded { version, .. } if *version == old),
                );
            }
            other => panic!("version {old}: {other:?}"),
        }
        let keys = manager.tls_keys_in_use().unwrap();
        assert!(
            keys <= keys_at_start + 2,
            "after {generation} upgrades: {keys} keys in use, {keys_at_start} at the start"
        );
    }
    drop(stop_tx);
    let mut calls = 0;
    for caller in callers {
        let made = caller.join().unwrap();
        assert!(made > 0);
        calls += made;
    }
    // For the long run's report (`--nocapture`).
    println!(
        "{upgrades} upgrades, {calls} calls from 2 long-lived threads, 0 failed; pthread keys {keys_at_start} -> {}; RSS {rss_at_start} -> {} KiB",
        manager.tls_keys_in_use().unwrap(),
        rss_kib()
    );
    // Each version's library used to be read into a buffer of its size
    // (~0.5 MB) before its image was written: glibc's malloc then kept
    // +13 MB by the 30th upgrade. Copied by the kernel, it stays flat
    // (+0.3 MB after 100 upgrades, +0.5 MB after 5,000).
    let grown = rss_kib().saturating_sub(rss_at_start);
    assert!(
        grown <= 5 * 1024,
        "RSS grew by {grown} KiB over {upgrades} upgrades"
    );
    assert_eq!(mapped_under(base).len(), 1, "{:?}", mapped_under(base));
    let info = manager.info("thread-name").unwrap();
    assert_eq!(info.unloads, upgrades);
    assert!(info.retired.is_empty(), "{:?}", info.retired);
}

#[test]
fn thread_current_gives_its_key_back_with_each_version() {
    upgrade_thread_name(30);
}

/// Past the ~1,020 upgrades after which glibc's 1,024 keys used to run out
/// and the process aborted ("out of TLS keys"). Long: run with `--ignored`
/// (`THREAD_NAME_UPGRADES=5000` for the issue's figure).
#[test]
#[ignore = "1,100 upgrades; run with --ignored"]
fn thread_current_upgrades_past_the_old_key_limit() {
    let upgrades = std::env::var("THREAD_NAME_UPGRADES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_100);
    upgrade_thread_name(upgrades);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A thread that calls the plugin, then waits for a word to call again or
/// to exit.
struct Caller {
    say: mpsc::Sender<bool>,
    answers: mpsc::Receiver<i64>,
    thread: std::thread::JoinHandle<()>,
}

impl Caller {
    fn start(name: &str, executor: dynplug::Executor) -> Caller {
        let (say, heard) = mpsc::channel::<bool>();
        let (answer, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(true) = heard.recv() {
                    let mut ctx = Context::new("any");
                    executor.execute(&mut ctx).unwrap();
                    answer.send(ctx.get_i64("calls_here").unwrap()).unwrap();
                }
            })
            .unwrap();
        Caller {
            say,
            answers,
            thread,
        }
    }

    fn call(&self) -> i64 {
        self.say.send(true).unwrap();
        self.answers.recv_timeout(PATIENCE).unwrap()
    }

    fn exit(self) {
        self.say.send(false).unwrap();
        self.thread.join().unwrap();
    }
}

#[test]
fn a_thread_local_with_drop_is_pinned_then_unloaded_when_its_thread_ends() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let drops = base.join(".drops");
    let config = format!(r#", "drop_file": "{}""#, drops.display());
    install_version(base, "tls-drop", "tls-drop", 1, None, &config);
    let manager = PluginManager::new(base).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let (_, executor) = manager.get_plugin("tls-drop").unwrap();
    let caller = Caller::start("tls-caller", executor);
    assert_eq!(caller.call(), 1);
    assert_eq!(
        caller.call(),
        2,
        "the thread-local lives on the caller's thread"
    );

    assert_eq!(manager.unload("tls-drop").unwrap(), PluginState::Pinned);
    let Event::Pinned { reason, .. } = ended(&mut events, "tls-drop", "1.0.1") else {
        panic!("pinned expected");
    };
    assert!(reason.contains("tls-caller"), "{reason}");
    let info = manager.info("tls-drop").unwrap();
    assert_eq!(info.state, PluginState::Pinned);
    assert_eq!(info.retired.len(), 1, "{:?}", info.retired);
    assert_eq!(mapped_under(base).len(), 1, "still mapped while pinned");
    assert!(!drops.exists(), "the destructor has not run yet");

    caller.exit();
    wait_for_event(
        &mut events,
        "the pinned version to unload",
        |e| matches!(e, Event::Unloaded { version, .. } if version == "1.0.1"),
    );
    assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
    let dropped = std::fs::read_to_string(&drops).unwrap();
    assert_eq!(dropped, "dropped after 2 call(s)\n");
    let info = manager.info("tls-drop").unwrap();
    assert_eq!(info.state, PluginState::Unloaded);
    assert!(info.retired.is_empty(), "{:?}", info.retired);
    assert_eq!(info.unloads, 1);
}

#[test]
fn a_thread_local_with_drop_is_released_at_its_threads_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_version(base, "tls-drop", "tls-drop", 1, None, "");
    let manager = PluginManager::new(base).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let (_, executor) = manager.get_plugin("tls-drop").unwrap();
    let caller = Caller::start("tls-caller", executor);
    assert_eq!(caller.call(), 1);

    install_version(base, "tls-drop", "tls-drop", 2, None, "");
    manager.load_plugin("tls-drop").unwrap();
    assert!(matches!(
        ended(&mut events, "tls-drop", "1.0.1"),
        Event::Pinned { .. }
    ));
    // The caller lives on and calls the new version: first it lets go of
    // the old one's thread-local.
    assert_eq!(caller.call(), 1, "a fresh thread-local in the new version");
    wait_for_event(
        &mut events,
        "the old version to unload",
        |e| matches!(e, Event::Unloaded { version, .. } if version == "1.0.1"),
    );
    assert_eq!(mapped_under(base).len(), 1, "{:?}", mapped_under(base));
    caller.exit();
}

#[test]
fn a_pooled_thread_local_with_drop_unloads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_version(base, "tls-drop", "tls-drop", 1, Some("pooled"), "");
    let manager = PluginManager::new(base).unwrap();
    manager.load_plugins().unwrap();
    let (_, executor) = manager.get_plugin("tls-drop").unwrap();
    let mut ctx = Context::new("any");
    executor.execute(&mut ctx).unwrap();
    // Its code ran only on its own workers, joined before the close.
    assert_eq!(manager.unload("tls-drop").unwrap(), PluginState::Unloaded);
    assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
}

#[test]
fn inline_versions_unload_when_nothing_pins_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_version(base, "thread-name", "thread-name", 1, Some("inline"), "");
    let manager = PluginManager::new(base).unwrap();
    manager.load_plugins().unwrap();
    let (_, executor) = manager.get_plugin("thread-name").unwrap();
    let started = Instant::now();
    // Called on short-lived threads: they give the key back when they exit.
    for _ in 0..4 {
        let executor = executor.clone();
        std::thread::spawn(move || executor.execute(&mut Context::new("any")).unwrap())
            .join()
            .unwrap();
    }
    assert_eq!(
        manager.unload("thread-name").unwrap(),
        PluginState::Unloaded
    );
    assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
    assert!(started.elapsed() < PATIENCE);
}
