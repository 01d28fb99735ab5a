//! Native plugins end to end: real built sample plugins, loaded, called,
//! broken on purpose and unloaded.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dynplug::{Context, Error, Event, PluginManager, PluginState, Value};
use support::{call, install, install_as, manager_with, manifest, mapped_under};

#[test]
fn hello_answers_pooled_and_inline() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    install_as(
        dir.path(),
        "hello",
        "hello-inline",
        Some(&manifest(
            "hello-inline",
            "hello",
            "1.0.0",
            r#""isolation": "inline""#,
        )),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.loaded, ["hello", "hello-inline"]);
    for name in ["hello", "hello-inline"] {
        let (spec, executor) = manager.get_plugin(name).unwrap();
        assert_eq!(spec.name, name);
        let mut ctx = Context::new("hello.get").with("name", "Ada");
        executor.execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
        assert_eq!(
            ctx.get_str("name"),
            Some("Ada"),
            "inputs stay in the context"
        );
    }
    let info = manager.info("hello-inline").unwrap();
    assert_eq!(info.isolation, Some(dynplug::Isolation::Inline));
}

#[test]
fn every_value_shape_crosses_both_ways() {
    let (_dir, manager) = manager_with(&["hello"]);
    manager.load_plugins().unwrap();
    let nested = Value::from(
        serde_json::json!({"list": [1, 2.5, "x", null, true], "map": {"k": [{"deep": 1}]}}),
    );
    let mut ctx = Context::new("hello.echo")
        .with("null", Value::Null)
        .with("bool", true)
        .with("int", -7)
        .with("float", 1.5)
        .with("string", "ünïcödé")
        .with("bytes", vec![0u8, 255, 10])
        .with("nested", nested.clone());
    call(&manager, "hello", &mut ctx).unwrap();
    for key in ["null", "bool", "int", "float", "string", "bytes", "nested"] {
        assert_eq!(ctx.get(&format!("echo.{key}")), ctx.get(key), "{key}");
    }
    assert_eq!(ctx.get("echo.nested"), Some(&nested));
}

#[test]
fn typed_helpers_deserialize_and_report_bad_shapes() {
    let (_dir, manager) = manager_with(&["hello"]);
    manager.load_plugins().unwrap();
    let mut ctx = Context::new("hello.sum");
    ctx.set_as("numbers", &[1, 2, 3, 4]).unwrap();
    call(&manager, "hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_i64("sum"), Some(10));
    assert_eq!(ctx.get_i64("count"), Some(4));

    let mut ctx = Context::new("hello.sum").with("numbers", "not a list");
    let err = call(&manager, "hello", &mut ctx).unwrap_err();
    assert!(
        matches!(&err, Error::Plugin { plugin, label, message, .. }
        if plugin == "hello" && label == "hello.sum" && message.contains("value `numbers`")),
        "{err}"
    );
}

#[test]
fn counter_keeps_state_runs_init_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("shutdown-marker");
    let config = format!(
        r#""config": {{"start": 10, "step": 5, "generation": "g1", "shutdown_marker": {:?}}}"#,
        marker.to_str().unwrap()
    );
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&manifest("counter", "counter", "1.0.0", &config)),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    let (_, counter) = manager.get_plugin("counter").unwrap();
    for expected in [15, 20, 25] {
        let mut ctx = Context::new("counter.incr");
        counter.execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_i64("count"), Some(expected));
        assert_eq!(ctx.get_str("generation"), Some("g1"));
    }
    assert!(!marker.exists());
    assert_eq!(manager.unload("counter").unwrap(), PluginState::Unloaded);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "25",
        "shutdown ran before unload"
    );
    let err = counter
        .execute(&mut Context::new("counter.get"))
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}

#[test]
fn pooled_unload_leaves_no_mapping_and_reload_starts_fresh() {
    let (dir, manager) = manager_with(&["counter"]);
    let images = dir.path();
    manager.load_plugins().unwrap();
    assert_eq!(
        mapped_under(images).len(),
        1,
        "one image mapped while loaded"
    );
    let mut ctx = Context::new("counter.incr");
    call(&manager, "counter", &mut ctx).unwrap();
    assert_eq!(manager.unload("counter").unwrap(), PluginState::Unloaded);
    assert_eq!(
        mapped_under(images),
        Vec::<String>::new(),
        "image unmapped after unload"
    );
    assert_eq!(
        manager.info("counter").unwrap().state,
        PluginState::Unloaded
    );
    assert!(
        !dir.path().join(".dynplug").exists(),
        "nothing written beside the plugins (the image is a memfd)"
    );

    manager.load_plugin("counter").unwrap();
    let mut ctx = Context::new("counter.incr");
    call(&manager, "counter", &mut ctx).unwrap();
    assert_eq!(
        ctx.get_i64("count"),
        Some(1),
        "a reloaded library has fresh statics"
    );
}

#[test]
fn inline_unload_unloads_when_nothing_pins_it() {
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "hello",
        "hello",
        Some(&manifest(
            "hello",
            "hello",
            "1.0.0",
            r#""isolation": "inline""#,
        )),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    call(&manager, "hello", &mut Context::new("hello.get")).unwrap();
    assert_eq!(manager.unload("hello").unwrap(), PluginState::Unloaded);
    assert!(support::mapped_under(dir.path()).is_empty());
}

/// Where dynplug does not see plugin threads, code that ran on callers'
/// threads is never closed: an unloaded `inline` version says so.
#[test]
fn inline_unload_is_retained_not_hidden() {
    if !support::without_thread_tracking("inline_unload_is_retained_not_hidden") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    install_as(
        dir.path(),
        "hello",
        "hello",
        Some(&manifest(
            "hello",
            "hello",
            "1.0.0",
            r#""isolation": "inline""#,
        )),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    assert_eq!(manager.unload("hello").unwrap(), PluginState::Retained);
    assert_eq!(manager.info("hello").unwrap().state, PluginState::Retained);
}

#[test]
fn panic_becomes_an_error_and_everything_keeps_serving() {
    let (_dir, manager) = manager_with(&["panicking", "hello"]);
    manager.load_plugins().unwrap();
    for _ in 0..3 {
        let err = call(&manager, "panicking", &mut Context::new("boom")).unwrap_err();
        assert!(
            matches!(&err, Error::Panic { plugin, message, .. }
            if plugin == "panicking" && message.contains("deliberate panic on label boom")),
            "{err}"
        );
    }
    let mut ctx = Context::new("ok");
    call(&manager, "panicking", &mut ctx).unwrap();
    assert_eq!(ctx.get_bool("ok"), Some(true));
    let mut ctx = Context::new("hello.get");
    call(&manager, "hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, world"));
}

#[test]
fn broken_plugins_fail_with_clear_errors_while_the_rest_load() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello");
    install(base, "failing-init");
    install(base, "wrong-abi");
    // A truncated library.
    support::install_truncated(base, "truncated");
    // A manifest whose library is missing.
    let missing = base.join("missing");
    std::fs::create_dir(&missing).unwrap();
    std::fs::write(
        missing.join("plugin.json"),
        manifest("missing", "nothing-here", "1.0.0", ""),
    )
    .unwrap();
    // Malformed and invalid manifests.
    install_as(
        base,
        "hello",
        "malformed",
        Some(r#"{"name": "malformed", "version": "1.0.0", "#),
    );
    install_as(
        base,
        "hello",
        "typo",
        Some(&manifest(
            "typo",
            "hello",
            "1.0.0",
            r#""isolaton": "inline""#,
        )),
    );
    install_as(
        base,
        "hello",
        "not-yet",
        Some(
            r#"{"name": "not-yet", "version": "1.0.0", "isolation": "process", "source": {"mode": "remote_git", "path": "https://example.com/x.git"}}"#,
        ),
    );
    install_as(
        base,
        "hello",
        "process",
        Some(&manifest(
            "process",
            "hello",
            "1.0.0",
            r#""isolation": "process""#,
        )),
    );
    install_as(
        base,
        "hello",
        "bad-sum",
        Some(&format!(
            r#"{{"name": "bad-sum", "version": "1.0.0", "source": {{"mode": "local_so", "path": "libhello", "sha256": "{}"}}}}"#,
            "0".repeat(64)
        )),
    );
    // Dot entries are ignored.
    std::fs::create_dir(base.join(".hidden")).unwrap();

    let manager = PluginManager::new(base).unwrap();
    let mut events = manager.subscribe();
    let report = manager.load_plugins().unwrap();
    // `process` runs in the `dynplug` binary cargo built beside the tests
    // (a runner is looked for in the directory above the program).
    assert_eq!(report.loaded, ["hello", "process"]);
    let failed: std::collections::BTreeMap<_, _> =
        report.failed.iter().map(|(n, e)| (n.as_str(), e)).collect();
    assert_eq!(failed.len(), 8, "{failed:#?}");

    let text = |name: &str| failed[name].to_string();
    assert!(matches!(failed["failing-init"], Error::Init { .. }));
    assert!(
        text("failing-init").contains("config.token is required"),
        "{}",
        text("failing-init")
    );
    assert!(matches!(failed["wrong-abi"], Error::AbiMismatch { .. }));
    assert!(
        text("wrong-abi").contains("plugin-abi 0.0.9 (ABI 0.9)")
            && text("wrong-abi").contains("plugin-abi 0.1.0 (ABI 2.0)"),
        "{}",
        text("wrong-abi")
    );
    assert!(matches!(failed["truncated"], Error::BadLibrary { .. }));
    assert!(
        text("truncated").contains("libhello") && text("truncated").starts_with("truncated: "),
        "{}",
        text("truncated")
    );
    assert!(matches!(failed["missing"], Error::Io { .. }));
    assert!(
        text("missing").contains("libnothing_here.so") && text("missing").contains("No such file"),
        "{}",
        text("missing")
    );
    assert!(matches!(failed["malformed"], Error::Manifest { .. }));
    assert!(
        text("malformed").contains("plugin.json"),
        "{}",
        text("malformed")
    );
    assert!(matches!(failed["typo"], Error::Manifest { field, .. } if field == "isolaton"));
    assert!(matches!(failed["not-yet"], Error::Unsupported { .. }));
    assert!(
        text("not-yet").contains("isolation \"process\" is not supported yet"),
        "{}",
        text("not-yet")
    );
    assert!(matches!(failed["bad-sum"], Error::Checksum { .. }));

    // list() shows every plugin with its state and error; hello still serves.
    let list = manager.list();
    assert_eq!(list.len(), 10);
    for info in &list {
        let loaded = ["hello", "process"].contains(&info.name.as_str());
        let expected = if loaded {
            PluginState::Loaded
        } else {
            PluginState::Failed
        };
        assert_eq!(info.state, expected, "{info:?}");
        assert_eq!(info.error.is_some(), !loaded, "{info:?}");
    }
    let mut ctx = Context::new("hello.get");
    call(&manager, "process", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, world"));
    let mut ctx = Context::new("hello.get");
    call(&manager, "hello", &mut ctx).unwrap();
    let err = call(&manager, "wrong-abi", &mut Context::new("x")).unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(matches!(
        call(&manager, "nope", &mut Context::new("x")),
        Err(Error::NotFound { .. })
    ));

    let mut failed_events = 0;
    while let Ok(Some(event)) = events.try_recv() {
        if let Event::Failed { .. } = event {
            failed_events += 1;
        }
    }
    assert_eq!(failed_events, 8);
    manager.unload_all();
}

#[test]
fn correct_checksum_loads() {
    let dir = tempfile::tempdir().unwrap();
    let lib = support::library("hello");
    let digest = {
        use std::fmt::Write;
        let out = std::process::Command::new("sha256sum")
            .arg(&lib)
            .output()
            .unwrap();
        let mut hex = String::new();
        write!(
            hex,
            "{}",
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap()
        )
        .unwrap();
        hex
    };
    install_as(
        dir.path(),
        "hello",
        "hello",
        Some(&format!(
            r#"{{"name": "hello", "version": "1.0.0", "source": {{"mode": "local_so", "path": "libhello", "sha256": "{}"}}}}"#,
            digest.to_uppercase()
        )),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    manager.load_plugin("hello").unwrap();
}

#[test]
fn concurrent_callers_share_one_executor() {
    let (_dir, manager) = manager_with(&["counter"]);
    manager.load_plugins().unwrap();
    let (_, counter) = manager.get_plugin("counter").unwrap();
    let counter = Arc::new(counter);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                for _ in 0..200 {
                    counter.execute(&mut Context::new("counter.incr")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut ctx = Context::new("counter.get");
    counter.execute(&mut ctx).unwrap();
    assert_eq!(ctx.get_i64("count"), Some(1600));
}

#[test]
fn reload_swaps_versions_and_unloads_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let with_generation = |version: &str, generation: &str| {
        manifest(
            "counter",
            "counter",
            version,
            &format!(r#""config": {{"generation": "{generation}"}}"#),
        )
    };
    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&with_generation("1.0.0", "v1")),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugins().unwrap();
    let (_, counter) = manager.get_plugin("counter").unwrap();
    let mut ctx = Context::new("counter.incr");
    counter.execute(&mut ctx).unwrap();
    assert_eq!(ctx.get_str("generation"), Some("v1"));

    install_as(
        dir.path(),
        "counter",
        "counter",
        Some(&with_generation("2.0.0", "v2")),
    );
    let spec = manager.load_plugin("counter").unwrap();
    assert_eq!(spec.version.to_string(), "2.0.0");
    let mut ctx = Context::new("counter.incr");
    counter.execute(&mut ctx).unwrap();
    assert_eq!(
        ctx.get_str("generation"),
        Some("v2"),
        "the same executor reaches the new version"
    );
    assert_eq!(
        mapped_under(dir.path()).len(),
        1,
        "only the new copy is mapped"
    );

    let events: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok().flatten()).collect();
    assert_eq!(
        events,
        [
            Event::Loaded {
                plugin: "counter".into(),
                version: "1.0.0".into()
            },
            Event::Upgraded {
                plugin: "counter".into(),
                from: "1.0.0".into(),
                to: "2.0.0".into()
            },
            Event::Unloaded {
                plugin: "counter".into(),
                version: "1.0.0".into()
            },
        ]
    );

    // A failed reload keeps the serving version.
    install_as(
        dir.path(),
        "wrong-abi",
        "counter",
        Some(&manifest("counter", "wrong-abi", "3.0.0", "")),
    );
    assert!(manager.load_plugin("counter").is_err());
    let info = manager.info("counter").unwrap();
    assert_eq!(
        (info.state, info.version.as_deref()),
        (PluginState::Loaded, Some("2.0.0"))
    );
    assert!(
        info.error
            .unwrap()
            .contains("built against plugin-abi 0.0.9")
    );
    counter.execute(&mut Context::new("counter.incr")).unwrap();
}

#[test]
fn async_execute_runs_on_the_pool() {
    let (_dir, manager) = manager_with(&["hello", "slow"]);
    manager.load_plugins().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_, hello) = manager.get_plugin("hello").unwrap();
        let mut ctx = Context::new("hello.get").with("name", "async");
        hello.execute_async(&mut ctx).await.unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, async"));

        // Dropping the future (a timeout here) cancels the running call.
        let (_, slow) = manager.get_plugin("slow").unwrap();
        let mut ctx = Context::new("spin");
        let token = ctx.cancel_token();
        let timed_out =
            tokio::time::timeout(Duration::from_millis(50), slow.execute_async(&mut ctx)).await;
        assert!(timed_out.is_err());
        assert!(token.is_cancelled());
    });
}
