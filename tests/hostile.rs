//! Hostile plugin files: what an adversarial probe of the loader found, each
//! refused with a clear error while every other plugin keeps loading, and
//! without running any of the hostile library's code.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dynplug::{Context, Error, Event, PluginManager, PluginState};
use support::{call, install, install_as, library, manifest};

fn dynplug() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynplug"));
    // The caller's settings must not leak into the tests.
    for var in ["DYNPLUG_PLUGINS_DIR", "DYNPLUG_CONFIG", "DYNPLUG_POOL_SIZE"] {
        cmd.env_remove(var);
    }
    cmd
}

fn failures(report: &dynplug::LoadReport) -> std::collections::HashMap<&str, &Error> {
    report
        .failed
        .iter()
        .map(|(name, e)| (name.as_str(), e))
        .collect()
}

/// A plugin directory `name` with `hello`'s manifest renamed and whatever
/// library bytes `lib` holds.
fn plugin_with_library(base: &Path, name: &str, lib: &[u8]) -> PathBuf {
    let dir = base.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.json"),
        manifest(name, "hello", "1.0.0", ""),
    )
    .unwrap();
    std::fs::write(dir.join("libhello.so"), lib).unwrap();
    dir
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[cfg(unix)]
#[test]
fn fifos_devices_and_huge_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    // plugin.json is a FIFO: a plain open would block forever.
    let fifo_manifest = dir.path().join("fifo-manifest");
    std::fs::create_dir(&fifo_manifest).unwrap();
    mkfifo(&fifo_manifest.join("plugin.json"));
    // The library is a FIFO.
    let fifo_lib = plugin_with_library(dir.path(), "fifo-lib", b"");
    std::fs::remove_file(fifo_lib.join("libhello.so")).unwrap();
    mkfifo(&fifo_lib.join("libhello.so"));
    // plugin.json is /dev/zero, which never ends.
    let zero = dir.path().join("zero");
    std::fs::create_dir(&zero).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("plugin.json")).unwrap();
    // A library over the size limit (sparse: nothing is written or read).
    let limit = std::fs::metadata(library("hello")).unwrap().len() + 4096;
    let huge = plugin_with_library(dir.path(), "huge", b"");
    std::fs::File::options()
        .write(true)
        .open(huge.join("libhello.so"))
        .unwrap()
        .set_len(limit + 1)
        .unwrap();

    let manager = PluginManager::builder(dir.path())
        .max_library_size(limit)
        .build()
        .unwrap();
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.loaded, ["hello"], "{:?}", report.failed);
    let failed = failures(&report);
    let text = |name: &str| failed[name].to_string();
    assert!(text("fifo-manifest").contains("not a regular file (a FIFO)"));
    assert!(text("fifo-manifest").contains("plugin.json"));
    assert!(text("fifo-lib").contains("not a regular file (a FIFO)"));
    assert!(text("fifo-lib").contains("libhello.so"));
    assert!(text("zero").contains("(a device)"), "{}", text("zero"));
    assert!(
        text("huge").contains(&format!("over the limit of {limit} bytes")),
        "{}",
        text("huge")
    );
    for (name, error) in &failed {
        assert_eq!(error.plugin(), *name);
    }
    let mut ctx = Context::new("hello.get");
    call(&manager, "hello", &mut ctx).unwrap();

    // `verify` does not hang either.
    let out = dynplug()
        .arg("verify")
        .arg(&fifo_manifest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a regular file (a FIFO)"), "{stderr}");
}

#[test]
fn a_wrong_abi_library_is_refused_without_running_its_constructor() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = install(dir.path(), "wrong-abi");
    let marker = dir.path().join(".constructor-ran");
    // verify: refused from the bytes; the constructor would write the
    // marker, or abort the process.
    let out = dynplug()
        .arg("verify")
        .arg(&plugin)
        .env("DYNPLUG_FIXTURE_MARKER", &marker)
        .env("DYNPLUG_FIXTURE_ABORT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("built against plugin-abi 0.0.9 (ABI 0.9)"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the constructor ran");

    // The same library beside a good plugin: the good one is listed loaded.
    install(dir.path(), "hello");
    let out = dynplug()
        .args(["list", "--json", "--plugins"])
        .arg(dir.path())
        .env("DYNPLUG_FIXTURE_MARKER", &marker)
        .env("DYNPLUG_FIXTURE_ABORT", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state("hello").as_deref(), Some("loaded"));
    assert_eq!(state("wrong-abi").as_deref(), Some("failed"));
    assert!(!marker.exists(), "the constructor ran");
}

/// File offsets of the root symbol's `Elf64_Sym` and of the header it
/// points at, in a built plugin.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn locate_root(bytes: &[u8]) -> (usize, usize) {
    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
    let file = object::File::parse(bytes).unwrap();
    let (dynsym, _) = file
        .section_by_name(".dynsym")
        .unwrap()
        .file_range()
        .unwrap();
    let symbol = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok("DYNPLUG_PLUGIN_ROOT"))
        .unwrap();
    let entry = dynsym as usize + symbol.index().0 * 24;
    let address = symbol.address();
    let segment = file
        .segments()
        .find(|s| s.address() <= address && address < s.address() + s.size())
        .unwrap();
    let header = segment.file_range().0 + (address - segment.address());
    (entry, header as usize)
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
#[test]
fn crafted_headers_are_refused_before_dlopen() {
    let good = std::fs::read(library("hello")).unwrap();
    let (sym, header) = locate_root(&good);
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        f(&mut bytes);
        bytes
    };
    let other_arch: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            // A null (absolute 0) root: dereferenced, it crashed the host.
            "null-root",
            patched(&|b| {
                b[sym + 6..sym + 8].copy_from_slice(&0xfff1u16.to_le_bytes());
                b[sym + 8..sym + 16].copy_from_slice(&0u64.to_le_bytes());
            }),
            "in no section",
        ),
        (
            // A version string of 2^40 bytes: the host aborted on allocation.
            "huge-version",
            patched(&|b| b[header + 24..header + 32].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            "claims 1099511627776 bytes",
        ),
        (
            // An IFUNC root: looking it up would run the plugin's resolver.
            "ifunc-root",
            patched(&|b| b[sym + 4] = (b[sym + 4] & 0xf0) | 10),
            "not a data object",
        ),
        (
            "small-root",
            patched(&|b| b[sym + 16..sym + 24].copy_from_slice(&8u64.to_le_bytes())),
            "the root symbol is 8 bytes",
        ),
        (
            "bad-magic",
            patched(&|b| b[header] = b'X'),
            "bad magic bytes",
        ),
        (
            // dlopen said "No such file or directory" for this one.
            "other-arch",
            patched(&|b| b[18..20].copy_from_slice(&other_arch.to_le_bytes())),
            "built for",
        ),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
    ];
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    for (name, bytes, _) in &cases {
        plugin_with_library(dir.path(), name, bytes);
    }
    let manager = PluginManager::new(dir.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.loaded, ["hello"]);
    let failed = failures(&report);
    for (name, _, expected) in &cases {
        let error = failed[name];
        assert!(
            matches!(error, Error::AbiMismatch { .. } | Error::BadLibrary { .. }),
            "{name}: {error:?}"
        );
        let text = error.to_string();
        assert!(text.contains(expected), "{name}: {text}");
        assert!(text.starts_with(&format!("{name}: ")), "{text}");
        assert!(text.contains("libhello.so"), "{text}");
    }
    assert!(matches!(failed["other-arch"], Error::BadLibrary { .. }));
    // Nothing of them is mapped: they were never handed to dlopen.
    assert_eq!(support::mapped_under(dir.path()).len(), 1, "only hello");
}

#[cfg(unix)]
#[test]
fn world_writable_plugin_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let open = |path: &Path| {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o002)).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    let lib = install_as(
        dir.path(),
        "hello",
        "open-lib",
        Some(&manifest("open-lib", "hello", "1.0.0", "")),
    );
    open(&lib.join("libhello.so"));
    let open_dir = install_as(
        dir.path(),
        "hello",
        "open-dir",
        Some(&manifest("open-dir", "hello", "1.0.0", "")),
    );
    open(&open_dir);
    let open_manifest = install_as(
        dir.path(),
        "hello",
        "open-manifest",
        Some(&manifest("open-manifest", "hello", "1.0.0", "")),
    );
    open(&open_manifest.join("plugin.json"));

    let manager = PluginManager::new(dir.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.loaded, ["hello"]);
    for (name, error) in failures(&report) {
        assert!(matches!(error, Error::Insecure { .. }), "{name}: {error:?}");
        assert!(
            error.to_string().contains("writable by every user"),
            "{error}"
        );
    }

    open(dir.path());
    let err = PluginManager::new(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Insecure { .. }), "{err:?}");
}

/// Everything a run leaves under `dir` that another user could write.
#[cfg(unix)]
fn writable_by_others(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        if !meta.file_type().is_symlink() && meta.mode() & 0o022 != 0 {
            found.push(format!("{} {:o}", path.display(), meta.mode() & 0o7777));
        }
    }
    found
}

#[cfg(unix)]
#[test]
fn nothing_writable_by_others_is_created_even_with_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    let before = writable_by_others(dir.path());
    let script = format!(
        "umask 000; exec '{}' call --plugins '{}' hello --label hello.get --set name=Ada",
        env!("CARGO_BIN_EXE_dynplug"),
        dir.path().display()
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello, Ada"));
    assert_eq!(writable_by_others(dir.path()), before);
}

/// A `slow` plugin named `name` whose `init` (or `shutdown`) sleeps.
fn sleepy(base: &Path, name: &str, config: serde_json::Value) {
    let extra = format!(r#""config": {config}"#);
    install_as(
        base,
        "slow",
        name,
        Some(&manifest(name, "slow", "1.0.0", &extra)),
    );
}

fn wait_for_file(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_hanging_init_holds_up_only_its_own_plugin() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello");
    let entered = dir.path().join(".init-entered");
    sleepy(
        dir.path(),
        "stuck",
        serde_json::json!({"init_ms": 600_000, "init_file": entered}),
    );
    let manager = PluginManager::builder(dir.path())
        .init_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let stuck = std::thread::spawn({
        let manager = manager.clone();
        move || manager.load_plugin("stuck")
    });
    wait_for_file(&entered);
    // While `stuck` sits in its init, everything else goes on.
    manager.load_plugin("hello").unwrap();
    let mut ctx = Context::new("hello.get");
    call(&manager, "hello", &mut ctx).unwrap();
    assert_eq!(manager.unload("hello").unwrap(), PluginState::Unloaded);
    assert!(
        !stuck.is_finished(),
        "init_timeout is 2 s; this took longer"
    );
    let err = stuck.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Init { .. }), "{err:?}");
    assert!(
        err.to_string().contains("did not return within 2s"),
        "{err}"
    );
    assert_eq!(manager.info("stuck").unwrap().state, PluginState::Failed);
    // The manager shuts down without waiting for the stuck thread.
    manager.unload_all();
}

#[test]
fn a_hanging_shutdown_is_reported_leaked_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    sleepy(
        dir.path(),
        "stubborn",
        serde_json::json!({"shutdown_ms": 600_000}),
    );
    let manager = PluginManager::builder(dir.path())
        .shutdown_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    manager.load_plugins().unwrap();
    assert_eq!(manager.unload("stubborn").unwrap(), PluginState::Leaked);
    let info = manager.info("stubborn").unwrap();
    assert!(
        info.error
            .as_deref()
            .unwrap()
            .contains("shutdown never returned"),
        "{info:?}"
    );
}

#[test]
fn the_watcher_keeps_going_past_fifos_and_hanging_inits() {
    let dir = tempfile::tempdir().unwrap();
    let manager = PluginManager::builder(dir.path())
        .init_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    let watcher = manager.watch().unwrap();
    // A FIFO manifest, then a plugin whose init hangs, then a good plugin.
    let staging = dir.path().join(".fifo.staging");
    std::fs::create_dir(&staging).unwrap();
    #[cfg(unix)]
    mkfifo(&staging.join("plugin.json"));
    std::fs::rename(&staging, dir.path().join("fifo")).unwrap();
    let entered = dir.path().join(".init-entered");
    sleepy(
        dir.path(),
        "stuck",
        serde_json::json!({"init_ms": 600_000, "init_file": entered}),
    );
    wait_for_file(&entered);
    install(dir.path(), "hello");
    let seen = std::sync::Mutex::new(Vec::new());
    let hello_loaded = |e: &Event| matches!(e, Event::Loaded { plugin, .. } if plugin == "hello");
    let fifo_failed = |e: &Event| matches!(e, Event::Failed { plugin, error } if plugin == "fifo" && error.contains("FIFO"));
    support::wait_for_event(&mut events, "hello loaded and fifo failed", |e| {
        let mut seen = seen.lock().unwrap();
        seen.push(e.clone());
        seen.iter().any(hello_loaded) && seen.iter().any(fifo_failed)
    });
    let seen = seen.into_inner().unwrap();
    assert!(
        !seen.iter().any(|e| e.plugin() == Some("stuck")),
        "{seen:?}"
    );
    // Stopping the watcher does not wait for the stuck init.
    let started = std::time::Instant::now();
    drop(watcher);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_library_that_stays_mapped_is_reported_leaked_from_a_relative_directory() {
    // `/proc/self/maps` lists resolved paths; the image is found by device
    // and inode, whatever the plugins directory is called.
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let child = dynplug()
        .current_dir(dir.path())
        .args(["watch", "--plugins", "plugins"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = support::ChildGuard(child);
    let events = support::lines_of(guard.0.stdout.take().unwrap());
    let log = support::lines_of(guard.0.stderr.take().unwrap());
    support::wait_for_line(&log, |l| l.starts_with("watching"));
    let event = |kind: &'static str, name: &'static str| {
        move |line: &String| {
            line.contains(&format!("\"event\":\"{kind}\""))
                && line.contains(&format!("\"plugin\":\"{name}\""))
        }
    };
    install(&plugins, "pinned");
    install(&plugins, "counter");
    // Each plugin loads on a thread of its own: in either order.
    let (pinned, counter) = (event("loaded", "pinned"), event("loaded", "counter"));
    let mut loaded = std::collections::HashSet::new();
    while loaded.len() < 2 {
        let line = support::wait_for_line(&events, |l| pinned(l) || counter(l));
        loaded.insert(pinned(&line));
    }
    // Removing both: counter is unmapped, pinned (-z nodelete) is not.
    std::fs::rename(plugins.join("pinned"), plugins.join(".pinned.gone")).unwrap();
    let leaked = support::wait_for_line(&events, event("leaked", "pinned"));
    assert!(leaked.contains("still mapped after dlclose"), "{leaked}");
    std::fs::rename(plugins.join("counter"), plugins.join(".counter.gone")).unwrap();
    support::wait_for_line(&events, event("unloaded", "counter"));
}
