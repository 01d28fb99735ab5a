//! Plugins loaded on their first call (`Builder::load_on_first_call`):
//! registered without mapping anything (after checking the file and its
//! header), loaded (with every check) by the first call, blocking or async;
//! load failures surface on that call and in the listing; upgrades are
//! still loaded before they serve.

mod support;

use std::path::Path;

use dynplug::{Context, Error, PluginManager, PluginState};
use support::{call, eventually, install, install_as, manifest, mapped_under};

fn deferred_manager(base: &Path) -> PluginManager {
    PluginManager::builder(base)
        .load_on_first_call(true)
        .build()
        .unwrap()
}

fn state(manager: &PluginManager, plugin: &str) -> PluginState {
    manager.info(plugin).unwrap().state
}

/// A manifest whose `sha256` the library does not match: a fault only a
/// load finds (registration checks the file and its header, not a digest).
fn bad_sum(name: &str, sample: &str, version: &str, extra: &str) -> String {
    let manifest = manifest(name, sample, version, extra);
    let path = format!(r#""path": "lib{}""#, sample.replace('-', "_"));
    let with_sum = format!(r#"{path}, "sha256": "{}""#, "0".repeat(64));
    manifest.replacen(&path, &with_sum, 1)
}

#[test]
fn registered_plugins_are_mapped_by_their_first_call() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    install(dir.path(), "counter");
    let manager = deferred_manager(dir.path());
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.loaded, ["counter", "hello"], "{:?}", report.failed);
    assert_eq!(state(&manager, "hello"), PluginState::Deferred);
    assert!(
        mapped_under(dir.path()).is_empty(),
        "{:?}",
        mapped_under(dir.path())
    );

    let mut events = manager.subscribe();
    let mut ctx = Context::new("hello.get");
    call(&manager, "hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, world"));
    assert_eq!(state(&manager, "hello"), PluginState::Loaded);
    // Announced as a load (the façades' route table follows events).
    support::wait_for_event(
        &mut events,
        "the load",
        |e| matches!(e, dynplug::Event::Loaded { plugin, .. } if plugin == "hello"),
    );
    assert_eq!(state(&manager, "counter"), PluginState::Deferred);
    assert_eq!(mapped_under(dir.path()).len(), 1, "only hello is mapped");

    // Unloading a plugin never called has nothing to close.
    manager.unload_all();
    assert!(mapped_under(dir.path()).is_empty());
}

#[test]
fn async_first_calls_load_once_off_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "counter");
    let manager = deferred_manager(dir.path());
    manager.load_plugins().unwrap();
    assert_eq!(state(&manager, "counter"), PluginState::Deferred);
    let (_, counter) = manager.get_plugin("counter").unwrap();
    // Sixteen first calls at once on one runtime thread: they wait for one
    // load (one library, one counter), done on a thread of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen: Vec<i64> = runtime.block_on(async {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut ctx = Context::new("counter.incr");
                    counter.execute_async(&mut ctx).await.map(|()| ctx)
                })
            })
            .collect();
        let mut seen = Vec::new();
        for call in calls {
            let ctx = call.await.unwrap().unwrap();
            seen.push(ctx.get_i64("count").unwrap());
        }
        seen
    });
    seen.sort_unstable();
    // Every call saw its own increment of the one counter.
    assert_eq!(seen, (1..=16).collect::<Vec<_>>());
    assert_eq!(state(&manager, "counter"), PluginState::Loaded);
    assert_eq!(mapped_under(dir.path()).len(), 1);
}

#[test]
fn a_failed_first_load_names_the_plugin_the_file_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    install(base, "failing-init");
    install_as(
        base,
        "hello",
        "bad-sum",
        Some(&bad_sum("bad-sum", "hello", "1.0.0", "")),
    );
    let manager = deferred_manager(base);
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut events = manager.subscribe();

    let mut ctx = Context::new("hello.get");
    let error = call(&manager, "bad-sum", &mut ctx).unwrap_err();
    // Announced once, as a failed load.
    let event = support::wait_for_event(
        &mut events,
        "the failed load",
        |e| matches!(e, dynplug::Event::Failed { plugin, .. } if plugin == "bad-sum"),
    );
    assert!(
        format!("{event:?}").contains("sha256 mismatch"),
        "{event:?}"
    );
    let message = error.to_string();
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert!(message.starts_with("bad-sum: "), "{message}");
    assert!(message.contains("libhello"), "{message}");
    assert!(message.contains("sha256 mismatch"), "{message}");
    // The outcome is kept: the next call gets the same reason, the listing too.
    let again = call(&manager, "bad-sum", &mut ctx).unwrap_err().to_string();
    assert_eq!(again, message);
    let info = manager.info("bad-sum").unwrap();
    assert_eq!(info.state, PluginState::Failed);
    assert!(info.error.unwrap().contains("sha256 mismatch"));

    let error = call(&manager, "failing-init", &mut Context::new("x")).unwrap_err();
    assert!(error.to_string().contains("init"), "{error}");

    // Everything else serves.
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    assert_eq!(mapped_under(base).len(), 1, "{:?}", mapped_under(base));

    // Mended and reloaded: deferred again, and its first call loads it.
    install_as(
        base,
        "hello",
        "bad-sum",
        Some(&manifest("bad-sum", "hello", "1.0.1", "")),
    );
    manager.load_plugin("bad-sum").unwrap();
    let info = manager.info("bad-sum").unwrap();
    assert_eq!(info.state, PluginState::Deferred);
    assert_eq!(info.error, None);
    call(&manager, "bad-sum", &mut Context::new("hello.get")).unwrap();
    assert_eq!(state(&manager, "bad-sum"), PluginState::Loaded);
}

#[test]
fn registration_still_refuses_what_it_can_see() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    // A FIFO in place of the library: refused at registration, no hang.
    let fifo = install_as(
        base,
        "hello",
        "fifo",
        Some(&manifest("fifo", "hello", "1.0.0", "")),
    );
    let lib = fifo.join(format!("libhello.{}", std::env::consts::DLL_EXTENSION));
    std::fs::remove_file(&lib).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&lib)
        .status()
        .unwrap();
    assert!(status.success());
    // Over the size limit.
    install_as(
        base,
        "hello",
        "large",
        Some(&manifest("large", "hello", "1.0.0", "")),
    );
    let manager = PluginManager::builder(base)
        .load_on_first_call(true)
        .max_library_size(4096)
        .build()
        .unwrap();
    let report = manager.load_plugins().unwrap();
    let failed: Vec<String> = report
        .failed
        .iter()
        .map(|(name, e)| format!("{name}: {e}"))
        .collect();
    // Sorted by name: fifo, hello, large.
    assert_eq!(report.failed.len(), 3, "{failed:?}");
    assert!(failed[0].contains("not a regular file"), "{failed:?}");
    assert!(failed[1].contains("over the limit"), "{failed:?}");
    assert!(failed[2].contains("over the limit"), "{failed:?}");
    assert_eq!(state(&manager, "fifo"), PluginState::Failed);
    manager.unload_all();

    // The header is read at registration: a truncated library, a
    // non-plugin and another ABI are refused before any call, each naming
    // the plugin, the file and the cause, and nothing is mapped.
    support::install_truncated(base, "truncated");
    let text = install_as(
        base,
        "hello",
        "not-a-plugin",
        Some(&manifest("not-a-plugin", "hello", "1.0.0", "")),
    );
    let lib = text.join(format!("libhello.{}", std::env::consts::DLL_EXTENSION));
    std::fs::write(&lib, "#!/bin/sh\necho not a library\n").unwrap();
    install(base, "wrong-abi");
    let manager = deferred_manager(base);
    let report = manager.load_plugins().unwrap();
    let failed: std::collections::BTreeMap<String, String> = report
        .failed
        .iter()
        .map(|(name, e)| (name.clone(), e.to_string()))
        .collect();
    let names: Vec<&str> = failed.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["fifo", "not-a-plugin", "truncated", "wrong-abi"],
        "{failed:?}"
    );
    assert!(
        failed["not-a-plugin"].contains("not a loadable library"),
        "{}",
        failed["not-a-plugin"]
    );
    let truncated = &failed["truncated"];
    assert!(truncated.starts_with("truncated: "), "{truncated}");
    assert!(truncated.contains("libhello"), "{truncated}");
    assert!(truncated.contains("not a loadable library"), "{truncated}");
    assert!(
        failed["wrong-abi"].contains("ABI"),
        "{}",
        failed["wrong-abi"]
    );
    assert_eq!(state(&manager, "truncated"), PluginState::Failed);
    assert_eq!(state(&manager, "hello"), PluginState::Deferred);
    assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
    call(&manager, "large", &mut Context::new("hello.get")).unwrap();
}

#[test]
fn registration_applies_the_trust_policy_as_far_as_it_can_without_a_digest() {
    let alice = dynplug::signing::SecretKey::generate("alice").unwrap();
    let mallory = dynplug::signing::SecretKey::generate("mallory").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let plugin = |name: &str| {
        install_as(
            base,
            "hello",
            name,
            Some(&manifest(name, "hello", "1.0.0", "")),
        )
    };
    for (name, key) in [
        ("by-alice", &alice),
        ("by-mallory", &mallory),
        ("tampered", &alice),
    ] {
        dynplug::signing::sign_dir(plugin(name), key).unwrap();
    }
    plugin("unsigned");
    // Signed, then its library replaced by another plugin's: only a digest
    // of the bytes tells, so only the load can.
    let lib = format!("libhello.{}", std::env::consts::DLL_EXTENSION);
    std::fs::copy(support::library("counter"), base.join("tampered").join(lib)).unwrap();
    let manager = PluginManager::builder(base)
        .load_on_first_call(true)
        .trusted_keys([alice.public()])
        .require_signatures(true)
        .build()
        .unwrap();
    let report = manager.load_plugins().unwrap();
    let failed: std::collections::BTreeMap<String, String> = report
        .failed
        .iter()
        .map(|(name, e)| (name.clone(), e.to_string()))
        .collect();
    let names: Vec<&str> = failed.keys().map(String::as_str).collect();
    assert_eq!(names, ["by-mallory", "unsigned"], "{failed:?}");
    assert!(
        failed["by-mallory"].contains("not among the trusted keys"),
        "{failed:?}"
    );
    assert!(
        failed["unsigned"].contains("not signed, and this host requires signatures"),
        "{failed:?}"
    );
    assert_eq!(state(&manager, "unsigned"), PluginState::Failed);
    assert_eq!(state(&manager, "tampered"), PluginState::Deferred);
    call(&manager, "by-alice", &mut Context::new("hello.get")).unwrap();
    let error = call(&manager, "tampered", &mut Context::new("hello.get")).unwrap_err();
    assert!(
        error.to_string().contains("signature does not match"),
        "{error}"
    );
    assert_eq!(state(&manager, "tampered"), PluginState::Failed);
}

#[test]
fn plugins_never_called_stay_deferred_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    // Nothing was loaded, so nothing can be lost: reloads stay deferred.
    manager.load_plugins().unwrap();
    install_as(
        base,
        "hello",
        "hello",
        Some(&manifest("hello", "hello", "2.0.0", "")),
    );
    manager.load_plugin("hello").unwrap();
    let info = manager.info("hello").unwrap();
    assert_eq!(info.state, PluginState::Deferred);
    assert_eq!(info.version.as_deref(), Some("2.0.0"));
    assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    assert_eq!(mapped_under(base).len(), 1);
}

#[test]
fn a_first_load_refuses_a_library_changed_since_registration() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let plugin = install(base, "hello");
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    // Another file in its place (as a copy over it would leave).
    let lib = plugin.join(format!("libhello.{}", std::env::consts::DLL_EXTENSION));
    let next = plugin.join("next.so");
    std::fs::copy(support::library("counter"), &next).unwrap();
    std::fs::rename(&next, &lib).unwrap();
    let error = call(&manager, "hello", &mut Context::new("hello.get")).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("changed since the plugin was registered"),
        "{message}"
    );
    assert!(mapped_under(base).is_empty(), "nothing of it was loaded");
    // A reload registers the new file.
    manager.load_plugin("hello").unwrap();
    assert_eq!(state(&manager, "hello"), PluginState::Deferred);
}

#[test]
fn upgrades_are_loaded_before_they_serve() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_as(
        base,
        "hello",
        "hello",
        Some(&manifest("hello", "hello", "1.0.0", "")),
    );
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    // A broken 2.0.0 (a fault only a load finds): refused at the reload,
    // 1.0.0 keeps serving.
    install_as(
        base,
        "hello",
        "hello",
        Some(&bad_sum("hello", "hello", "2.0.0", "")),
    );
    let error = manager.load_plugin("hello").unwrap_err();
    assert!(error.to_string().contains("sha256 mismatch"), "{error}");
    let info = manager.info("hello").unwrap();
    assert_eq!(info.version.as_deref(), Some("1.0.0"));
    assert_eq!(info.state, PluginState::Loaded);
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    // A good 3.0.0 is loaded at once, not at its first call.
    install_as(
        base,
        "hello",
        "hello",
        Some(&manifest("hello", "hello", "3.0.0", "")),
    );
    manager.load_plugin("hello").unwrap();
    let info = manager.info("hello").unwrap();
    assert_eq!(info.version.as_deref(), Some("3.0.0"));
    assert_eq!(info.state, PluginState::Loaded);
}

#[test]
fn a_broken_upgrade_of_a_plugin_never_loaded_is_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    let mut events = manager.subscribe();
    // 2.0.0 takes the place of 1.0.0's files, truncated: 1.0.0, never
    // loaded, could not load any more either.
    let plugin = install_as(
        base,
        "hello",
        "hello",
        Some(&manifest("hello", "hello", "2.0.0", "")),
    );
    support::truncate_library(&plugin, "hello");
    let error = manager.load_plugin("hello").unwrap_err();
    assert!(
        error.to_string().contains("not a loadable library"),
        "{error}"
    );
    support::wait_for_event(
        &mut events,
        "the failure",
        |e| matches!(e, dynplug::Event::Failed { plugin, .. } if plugin == "hello"),
    );
    let info = manager.info("hello").unwrap();
    assert_eq!(info.state, PluginState::Failed);
    assert!(info.error.unwrap().contains("not a loadable library"));
    // Calls get the cause, not "changed since the plugin was registered".
    let error = call(&manager, "hello", &mut Context::new("hello.get")).unwrap_err();
    assert!(
        error.to_string().contains("not a loadable library"),
        "{error}"
    );
    // Mended: registered again, and loaded by its first call.
    install_as(
        base,
        "hello",
        "hello",
        Some(&manifest("hello", "hello", "3.0.0", "")),
    );
    manager.load_plugin("hello").unwrap();
    assert_eq!(state(&manager, "hello"), PluginState::Deferred);
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    assert_eq!(state(&manager, "hello"), PluginState::Loaded);
}

/// Holds a `slow` plugin's first load inside its `init` until released:
/// tests wait on its state, not on a slow `init` outlasting them.
struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    fn new() -> Gate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hold"), b"").unwrap();
        Gate { dir }
    }

    /// The manifest config of a `slow` whose `init` it holds.
    fn config(&self) -> String {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            r#""config": {{"init_file": "{}", "init_hold_file": "{}"}}"#,
            path("entered"),
            path("hold")
        )
    }

    /// Returns once a load is inside `init` (its library read and mapped).
    fn wait_entered(&self) {
        let entered = self.dir.path().join("entered");
        eventually("the load to enter init", || entered.exists());
    }

    fn release(&self) {
        std::fs::remove_file(self.dir.path().join("hold")).unwrap();
    }
}

/// `slow` at `version` in `base`, with manifest `extra`.
fn install_slow(base: &Path, version: &str, extra: &str) -> std::path::PathBuf {
    install_as(
        base,
        "slow",
        "slow",
        Some(&manifest("slow", "slow", version, extra)),
    )
}

/// Starts `slow`'s first load with a call that gives up at once.
fn start_first_load(manager: &PluginManager) {
    let (_, executor) = manager.get_plugin("slow").unwrap();
    let mut quick = Context::new("count").with_timeout(std::time::Duration::from_millis(1));
    executor.execute(&mut quick).unwrap_err();
}

#[test]
fn a_call_with_a_deadline_waits_for_a_first_load_no_longer_than_that() {
    let dir = tempfile::tempdir().unwrap();
    // The calls below give up while `init` is held.
    let gate = Gate::new();
    install_slow(dir.path(), "1.0.0", &gate.config());
    let manager = deferred_manager(dir.path());
    manager.load_plugins().unwrap();
    let (_, slow) = manager.get_plugin("slow").unwrap();
    let short = || Context::new("count").with_timeout(std::time::Duration::from_millis(50));

    let error = slow.execute(&mut short()).unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error:?}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let error = runtime
        .block_on(slow.execute_async(&mut short()))
        .unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error:?}");
    // Both gave up while the load (its `init`) still ran.
    assert_eq!(state(&manager, "slow"), PluginState::Deferred);

    // A call without a deadline waits for that same load.
    gate.release();
    let mut ctx = Context::new("count");
    slow.execute(&mut ctx).unwrap();
    assert_eq!(ctx.get_i64("started"), Some(1), "one library, one load");
    assert_eq!(state(&manager, "slow"), PluginState::Loaded);
}

#[test]
fn a_version_replaced_while_it_loads_is_not_announced() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let gate = Gate::new();
    install_slow(base, "1.0.0", &gate.config());
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    let mut events = manager.subscribe();
    start_first_load(&manager);
    gate.wait_entered();
    // 2.0.0 takes its place meanwhile (never loaded: registered). The
    // reload returns once 1.0.0, drained, is unloaded, so 1.0.0's load is
    // let go only once 2.0.0 is in service.
    install_slow(base, "2.0.0", "");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            eventually("2.0.0 in service", || {
                manager.info("slow").unwrap().version.as_deref() == Some("2.0.0")
            });
            gate.release();
        });
        manager.load_plugin("slow").unwrap();
    });
    let mut seen = Vec::new();
    while let Some(event) = events.try_recv().unwrap() {
        seen.push(format!("{event:?}"));
    }
    assert!(
        seen.iter().any(|e| e.contains("Upgraded")),
        "the re-registration is announced: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| e.contains("Loaded") && e.contains("1.0.0")),
        "1.0.0 was replaced while it loaded: {seen:?}"
    );
    assert_eq!(state(&manager, "slow"), PluginState::Deferred);
    let mut ctx = Context::new("count");
    call(&manager, "slow", &mut ctx).unwrap();
    assert_eq!(
        manager.info("slow").unwrap().version.as_deref(),
        Some("2.0.0")
    );
}

#[test]
fn a_broken_upgrade_leaves_a_first_load_under_way_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let gate = Gate::new();
    install_slow(base, "1.0.0", &gate.config());
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    // 1.0.0's load has read its file and waits in `init` while a
    // truncated 2.0.0 takes the place of its files.
    start_first_load(&manager);
    gate.wait_entered();
    support::truncate_library(&install_slow(base, "2.0.0", ""), "slow");
    let error = manager.load_plugin("slow").unwrap_err();
    assert!(
        error.to_string().contains("not a loadable library"),
        "{error}"
    );
    // The load under way had the old file: it ends and serves.
    gate.release();
    let mut ctx = Context::new("count");
    call(&manager, "slow", &mut ctx).unwrap();
    let info = manager.info("slow").unwrap();
    assert_eq!(info.version.as_deref(), Some("1.0.0"));
    assert_eq!(info.state, PluginState::Loaded);
}

#[test]
fn the_http_facade_loads_on_the_first_request_and_reports_a_failed_load() {
    let dir = support::private_tempdir();
    let base = dir.path();
    install(base, "hello");
    install_as(
        base,
        "hello",
        "broken",
        Some(&bad_sum(
            "broken",
            "hello",
            "1.0.0",
            r#""http_services": {"driver": "axum", "routes": [{"route": "/api/broken", "method": "GET", "label": "hello.get"}]}"#,
        )),
    );
    let manager = deferred_manager(base);
    manager.load_plugins().unwrap();
    let runtime = support::runtime();
    runtime.block_on(async {
        let running = dynplug::serve::Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .unwrap();
        let dynplug::serve::Endpoint::Tcp(addr) = running.http_endpoints()[0].clone() else {
            unreachable!("a TCP endpoint")
        };
        let get = |path: &'static str| async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            support::http::exchange(stream, "GET", path, &[], b"").await
        };
        // Eight first requests at once: one load, eight answers.
        let replies: Vec<_> = (0..8)
            .map(|_| tokio::spawn(get("/api/hello/Ada")))
            .collect();
        for reply in replies {
            let reply = reply.await.unwrap();
            assert_eq!(
                reply.status,
                200,
                "{:?}",
                String::from_utf8_lossy(&reply.body)
            );
            assert_eq!(reply.json()["greeting"], "hello, Ada");
        }
        let reply = get("/api/broken").await;
        assert_eq!(reply.status, 503);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("sha256 mismatch"), "{error}");
        assert!(error.contains("libhello"), "{error}");
        assert_eq!(state(&manager, "broken"), PluginState::Failed);
        // The route stays its own, and keeps saying why (not 404 once the
        // route table has seen the failure).
        let again = get("/api/broken").await;
        assert_eq!(again.status, 503);
        assert_eq!(again.json()["error"].as_str(), Some(error.as_str()));
        assert_eq!(state(&manager, "hello"), PluginState::Loaded);
        running.shutdown().await;
    });
}

#[test]
fn idle_versions_are_unloaded_and_loaded_again_by_their_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    install(base, "counter");
    let manager = PluginManager::builder(base)
        .unload_idle_after(std::time::Duration::from_millis(30))
        .build()
        .unwrap();
    manager.load_plugins().unwrap();
    assert_eq!(state(&manager, "counter"), PluginState::Deferred);
    for round in 1..=5 {
        let unloads = manager.info("counter").unwrap().unloads;
        let mut ctx = Context::new("counter.incr");
        call(&manager, "counter", &mut ctx).unwrap();
        // A new copy each round: its state starts over.
        assert_eq!(ctx.get_i64("count"), Some(1), "round {round}");
        eventually("the idle version to be unloaded", || {
            manager.info("counter").unwrap().unloads > unloads
        });
        assert_eq!(state(&manager, "counter"), PluginState::Deferred);
        assert!(mapped_under(base).is_empty(), "{:?}", mapped_under(base));
    }
    // Never called, never loaded, never unloaded.
    let hello = manager.info("hello").unwrap();
    assert_eq!((hello.state, hello.unloads), (PluginState::Deferred, 0));

    // Unloaded while idle, it still counts as loaded: a broken upgrade is
    // loaded before it could serve, refused, and 1.0.0 stays in service.
    install_as(
        base,
        "counter",
        "counter",
        Some(&bad_sum("counter", "counter", "2.0.0", "")),
    );
    let error = manager.load_plugin("counter").unwrap_err();
    assert!(error.to_string().contains("sha256 mismatch"), "{error}");
    assert_eq!(
        manager.info("counter").unwrap().version.as_deref(),
        Some("1.0.0")
    );
}

#[test]
fn calls_racing_idle_unloads_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "counter");
    let manager = PluginManager::builder(base)
        .unload_idle_after(std::time::Duration::from_millis(10))
        .build()
        .unwrap();
    manager.load_plugins().unwrap();
    let (_, counter) = manager.get_plugin("counter").unwrap();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..8 {
                    let unloads = manager.info("counter").unwrap().unloads;
                    for _ in 0..50 {
                        counter.execute(&mut Context::new("counter.incr")).unwrap();
                    }
                    // Quiet until the reaper unloads it (all four go quiet
                    // in turn; calls from the others may race the unload).
                    eventually("an idle unload", || {
                        manager.info("counter").unwrap().unloads > unloads
                    });
                }
            });
        }
    });
    let info = manager.info("counter").unwrap();
    assert_eq!(info.calls.errors, 0);
    assert_eq!(info.calls.calls, 4 * 8 * 50);
    assert!(info.unloads >= 8, "{}", info.unloads);
    assert!(info.retired.is_empty(), "{:?}", info.retired);
    eventually("the last version to be unloaded", || {
        mapped_under(base).is_empty()
    });
}
