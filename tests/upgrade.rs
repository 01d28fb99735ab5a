//! Hot upgrade through the directory watcher: real renames, real loads,
//! concurrent callers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dynplug::Events;
use dynplug::{Context, Event, PluginManager, PluginState};
use support::{install_as, manifest, mapped_under};

fn counter_manifest(version: &str, generation: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    manifest(
        "counter",
        "counter",
        version,
        &format!(r#""config": {{"generation": "{generation}"}}{extra}"#),
    )
}

fn wait_for(events: &mut Events, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    support::wait_for_event(events, what, pred)
}

/// Waits for the next event of the same kind as `expected` and asserts it is
/// exactly `expected`.
fn expect_event(events: &mut Events, expected: Event) {
    let kind = std::mem::discriminant(&expected);
    let got = wait_for(events, &format!("{expected:?}"), |e| {
        std::mem::discriminant(e) == kind
    });
    assert_eq!(got, expected);
}

/// Installs `counter` at `version` answering `generation` (write, then rename
/// into place) and waits for the upgrade event, which it returns.
fn upgrade_counter(
    dir: &std::path::Path,
    events: &mut Events,
    version: &str,
    generation: &str,
) -> Event {
    install_as(
        dir,
        "counter",
        "counter",
        Some(&counter_manifest(version, generation, "")),
    );
    wait_for(events, "upgrade", |e| matches!(e, Event::Upgraded { .. }))
}

fn upgraded(from: &str, to: &str) -> Event {
    Event::Upgraded {
        plugin: "counter".into(),
        from: from.into(),
        to: to.into(),
    }
}

fn generation(manager: &PluginManager) -> String {
    let (_, counter) = manager.get_plugin("counter").unwrap();
    let mut ctx = Context::new("counter.get");
    counter.execute(&mut ctx).unwrap();
    ctx.get_str("generation").unwrap().to_owned()
}

struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

/// 8 threads calling `counter.incr` continuously through one executor; each
/// returns the errors it saw and records the generations that answered.
fn load(manager: &PluginManager) -> Load {
    let (_, counter) = manager.get_plugin("counter").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let threads = (0..8)
        .map(|_| {
            let (counter, stop, calls) = (counter.clone(), Arc::clone(&stop), Arc::clone(&calls));
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut ctx = Context::new("counter.incr");
                    match counter.execute(&mut ctx) {
                        Ok(()) => {
                            let generation = ctx.get_str("generation").unwrap_or_default();
                            if generation != "v1" && generation != "v2" {
                                errors.push(format!("unexpected generation {generation:?}"));
                            }
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                errors
            })
        })
        .collect();
    Load {
        stop,
        calls,
        threads,
    }
}

impl Load {
    /// Waits until `n` more calls have been made.
    fn wait_for_calls(&self, n: u64) {
        let target = self.calls.load(Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + support::PATIENCE;
        while self.calls.load(Ordering::Relaxed) < target {
            assert!(std::time::Instant::now() < deadline, "calls stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (self.calls.load(Ordering::Relaxed), errors)
    }
}

fn watched_counter() -> (tempfile::TempDir, PluginManager, dynplug::Watcher, Events) {
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("1.0.0", "v1", "")),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    let watcher = manager.watch().unwrap();
    wait_for(&mut events, "counter loaded", |e| {
        matches!(e, Event::Loaded { .. })
    });
    (dir, manager, watcher, events)
}

#[test]
fn upgrade_under_load_fails_no_call() {
    let (dir, manager, _watcher, mut events) = watched_counter();
    let load = load(&manager);
    load.wait_for_calls(100);
    let event = upgrade_counter(dir.path(), &mut events, "2.0.0", "v2");
    assert_eq!(event, upgraded("1.0.0", "2.0.0"));
    wait_for(
        &mut events,
        "v1 unloaded",
        |e| matches!(e, Event::Unloaded { version, .. } if version == "1.0.0"),
    );
    // Calls go on after the old version is gone.
    load.wait_for_calls(100);
    let (calls, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} failed calls: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(calls > 100, "the load ran ({calls} calls)");
    assert_eq!(generation(&manager), "v2", "after the swap only v2 answers");
    assert_eq!(mapped_under(dir.path()).len(), 1, "v1's copy is unmapped");
    let info = manager.info("counter").unwrap();
    assert_eq!(
        (info.state, info.upgrades, info.unloads),
        (PluginState::Loaded, 1, 1)
    );
}

#[test]
fn bad_drops_keep_the_old_version_serving() {
    let (dir, manager, _watcher, mut events) = watched_counter();
    let load = load(&manager);
    let lib = format!("libcounter.{}", std::env::consts::DLL_EXTENSION);
    type Damage<'a> = Box<dyn Fn(&std::path::Path) + 'a>;
    let drops: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated library",
            Box::new(|plugin_dir: &std::path::Path| {
                support::truncate_library(plugin_dir, "counter");
            }),
            "not a loadable library",
        ),
        (
            "wrong ABI",
            Box::new(|plugin_dir: &std::path::Path| {
                std::fs::copy(support::library("wrong-abi"), plugin_dir.join(&lib)).unwrap();
            }),
            "built against plugin-abi 0.0.9",
        ),
        (
            "lower version",
            Box::new(|plugin_dir: &std::path::Path| {
                std::fs::write(
                    plugin_dir.join("plugin.json"),
                    counter_manifest("0.9.0", "v2", ""),
                )
                .unwrap();
            }),
            "version 0.9.0 is lower than the serving 1.0.0",
        ),
        (
            "failing init",
            Box::new(|plugin_dir: &std::path::Path| {
                std::fs::copy(
                    support::library("failing-init"),
                    plugin_dir.join("libfailing_init.so"),
                )
                .unwrap();
                std::fs::write(
                    plugin_dir.join("plugin.json"),
                    manifest("counter", "failing-init", "3.0.0", ""),
                )
                .unwrap();
            }),
            "config.token is required",
        ),
    ];
    for (what, damage, reason) in drops {
        // Stage a complete copy of v1, damage it, then rename it into place.
        let staging = dir.path().join(".staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::copy(support::library("counter"), staging.join(&lib)).unwrap();
        std::fs::write(
            staging.join("plugin.json"),
            counter_manifest("1.0.0", "v1", ""),
        )
        .unwrap();
        damage(&staging);
        support::replace_dir(&staging, &dir.path().join("counter"));
        let failed = wait_for(&mut events, what, |e| {
            matches!(e, Event::UpgradeFailed { .. })
        });
        let Event::UpgradeFailed {
            reason: got,
            still_serving,
            ..
        } = failed
        else {
            unreachable!()
        };
        assert!(got.contains(reason), "{what}: {got}");
        assert_eq!(still_serving, "1.0.0", "{what}");
        assert_eq!(generation(&manager), "v1", "{what}: v1 keeps serving");
    }
    let (calls, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} failed calls: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(calls > 100);
    let info = manager.info("counter").unwrap();
    assert_eq!(
        (info.state, info.version.as_deref()),
        (PluginState::Loaded, Some("1.0.0"))
    );
    assert!(
        info.error.unwrap().contains("config.token is required"),
        "the last error is listed"
    );
}

#[test]
fn new_directories_load_and_removed_ones_unload() {
    let dir = tempfile::tempdir().unwrap();
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    let _watcher = manager.watch().unwrap();
    // Dot entries are ignored, even complete plugins.
    install_as(
        dir.path(),
        "hello",
        ".hidden",
        Some(&manifest(".hidden", "hello", "1.0.0", "")),
    );
    support::install(dir.path(), "hello");
    expect_event(
        &mut events,
        Event::Loaded {
            plugin: "hello".into(),
            version: "1.0.0".into(),
        },
    );
    let (_, hello) = manager.get_plugin("hello").unwrap();
    hello.execute(&mut Context::new("hello.get")).unwrap();

    std::fs::rename(dir.path().join("hello"), dir.path().join(".trash")).unwrap();
    expect_event(
        &mut events,
        Event::Unloaded {
            plugin: "hello".into(),
            version: "1.0.0".into(),
        },
    );
    assert!(hello.execute(&mut Context::new("hello.get")).is_err());
    assert_eq!(
        manager
            .list()
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["hello"]
    );
    assert_eq!(manager.info("hello").unwrap().state, PluginState::Unloaded);
}

#[test]
fn same_version_new_bytes_reloads_and_touch_does_not() {
    let (dir, manager, watcher, mut events) = watched_counter();
    // New bytes at the same version: a reload.
    let event = upgrade_counter(dir.path(), &mut events, "1.0.0", "v2");
    assert_eq!(event, upgraded("1.0.0", "1.0.0"));
    assert_eq!(generation(&manager), "v2");
    // Rewriting identical content changes nothing (the fingerprint is the same
    // apart from the manifest's mtime, which it ignores).
    let manifest_path = dir.path().join("counter").join("plugin.json");
    let text = std::fs::read(&manifest_path).unwrap();
    std::fs::write(&manifest_path, text).unwrap();
    assert!(
        watcher.wait_settled(support::PATIENCE),
        "the watcher settled"
    );
    while let Ok(Some(event)) = events.try_recv() {
        assert!(
            !matches!(event, Event::Upgraded { .. } | Event::Loaded { .. }),
            "unexpected {event:?}"
        );
    }
    assert_eq!(manager.info("counter").unwrap().upgrades, 1);
}

#[test]
fn inline_versions_are_unloaded_when_replaced() {
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("1.0.0", "v1", r#""isolation": "inline""#)),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    let _watcher = manager.watch().unwrap();
    wait_for(&mut events, "loaded", |e| matches!(e, Event::Loaded { .. }));
    assert_eq!(generation(&manager), "v1");
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("2.0.0", "v2", r#""isolation": "inline""#)),
    );
    expect_event(
        &mut events,
        Event::Unloaded {
            plugin: "counter".into(),
            version: "1.0.0".into(),
        },
    );
    assert_eq!(generation(&manager), "v2");
    let info = manager.info("counter").unwrap();
    assert_eq!(info.state, PluginState::Loaded);
    assert!(info.retired.is_empty(), "{:?}", info.retired);
    assert_eq!(mapped_under(dir.path()).len(), 1);
}

/// Where dynplug does not see plugin threads, replaced `inline` versions
/// stay mapped, and are listed.
#[test]
fn inline_versions_are_retained_and_listed() {
    if !support::without_thread_tracking("inline_versions_are_retained_and_listed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("1.0.0", "v1", r#""isolation": "inline""#)),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    let _watcher = manager.watch().unwrap();
    wait_for(&mut events, "loaded", |e| matches!(e, Event::Loaded { .. }));
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("2.0.0", "v2", r#""isolation": "inline""#)),
    );
    expect_event(
        &mut events,
        Event::Retained {
            plugin: "counter".into(),
            version: "1.0.0".into(),
        },
    );
    assert_eq!(generation(&manager), "v2");
    let info = manager.info("counter").unwrap();
    assert_eq!(info.state, PluginState::Loaded);
    assert_eq!(info.retired.len(), 1);
    assert_eq!(
        (info.retired[0].version.as_str(), info.retired[0].state),
        ("1.0.0", PluginState::Retained)
    );
    assert_eq!(
        mapped_under(dir.path()).len(),
        2,
        "the retained copy stays mapped"
    );
}

#[test]
fn allowed_downgrades_replace_the_serving_version() {
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&counter_manifest("2.0.0", "v2", "")),
    );
    let manager = PluginManager::builder(dir.path())
        .allow_downgrades(true)
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let _watcher = manager.watch().unwrap();
    let event = upgrade_counter(dir.path(), &mut events, "1.0.0", "v1");
    assert_eq!(event, upgraded("2.0.0", "1.0.0"));
}

/// A library written in two halves with a pause longer than the settle time:
/// the first half fails to load, but that is retried, not reported, and the
/// complete file becomes the new version.
#[test]
fn a_partly_written_library_is_retried_not_reported() {
    let (dir, manager, _watcher, mut events) = watched_counter();
    let plugin_dir = dir.path().join("counter");
    let lib = support::library("counter");
    let bytes = std::fs::read(&lib).unwrap();
    // Writing in place is safe for dynplug (it runs a shadow copy), and it
    // is what a slow copy looks like.
    let target = plugin_dir.join(lib.file_name().unwrap());
    let mut file = std::fs::File::create(&target).unwrap();
    use std::io::Write;
    file.write_all(&bytes[..bytes.len() / 4]).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(80));
    std::fs::write(
        plugin_dir.join("plugin.json"),
        counter_manifest("1.1.0", "v2", ""),
    )
    .unwrap();
    file.write_all(&bytes[bytes.len() / 4..]).unwrap();
    drop(file);
    let event = wait_for(&mut events, "the complete library", |e| {
        matches!(e, Event::Upgraded { .. } | Event::UpgradeFailed { .. })
    });
    assert_eq!(
        event,
        upgraded("1.0.0", "1.1.0"),
        "no failure was reported first"
    );
    assert_eq!(generation(&manager), "v2");
}

/// Moving a plugin away unloads it; moving the very same directory back
/// loads it again (same content, same fingerprint).
#[test]
fn a_removed_plugin_restored_unchanged_loads_again() {
    let (dir, manager, _watcher, mut events) = watched_counter();
    let away = dir.path().join(".counter.away");
    std::fs::rename(dir.path().join("counter"), &away).unwrap();
    wait_for(&mut events, "unloaded", |e| {
        matches!(e, Event::Unloaded { .. })
    });
    std::fs::rename(&away, dir.path().join("counter")).unwrap();
    wait_for(&mut events, "loaded again", |e| {
        matches!(e, Event::Loaded { .. })
    });
    assert_eq!(generation(&manager), "v1");
}
