//! Exec plugins: real processes on real sockets (the Python fixture and the
//! Rust samples), supervised, restarted, upgraded and stopped.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynplug::{Context, Error, Event, PluginManager, PluginState};
use support::{PATIENCE, eventually, wait_for_event};

/// The Python standard-library REST plugin.
fn python_fixture() -> PathBuf {
    support::root().join("tests/fixtures/exec_rest.py")
}

/// Installs the Python fixture as `<base>/<name>` with `source` fields
/// spliced into an exec manifest.
fn install_python(base: &Path, name: &str, version: &str, extra: &str) -> PathBuf {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(python_fixture(), dir.join("plugin.py")).unwrap();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    std::fs::write(
        dir.join("plugin.json"),
        format!(
            r#"{{"name": "{name}", "version": "{version}", "source": {{"mode": "exec", "path": "plugin.py", "protocol": "rest"{extra}}}}}"#
        ),
    )
    .unwrap();
    dir
}

fn call(manager: &PluginManager, plugin: &str, ctx: &mut Context) -> Result<(), Error> {
    support::call(manager, plugin, ctx)
}

fn pid_of(manager: &PluginManager, plugin: &str) -> Option<u32> {
    manager.info(plugin)?.process?.pid
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: only a process not yet reaped or
    // running counts, and zombies are reported separately.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z')
    })
}

#[test]
fn python_rest_plugin_round_trips_values_on_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    install_python(dir.path(), "py-tcp", "1.0.0", r#""listen_flag": "-port""#);
    install_python(dir.path(), "py-unix", "1.0.0", r#""listen": "unix""#);
    let manager = PluginManager::new(dir.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for plugin in ["py-tcp", "py-unix"] {
        let mut ctx = Context::new("greet").with("name", "Ada");
        call(&manager, plugin, &mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"), "{plugin}");
        assert_eq!(ctx.get_str("host"), Some("dynplug"), "X-Host is sent");
        let mut ctx = Context::new("echo")
            .with("n", 42)
            .with("list", dynplug::Value::List(vec![1.into(), "two".into()]));
        call(&manager, plugin, &mut ctx).unwrap();
        assert_eq!(ctx.get_i64("n"), Some(42));
        let mut ctx = Context::new("text");
        call(&manager, plugin, &mut ctx).unwrap();
        assert_eq!(ctx.get_bytes(dynplug::REPLY_KEY), Some(&b"plain text"[..]));
        let mut ctx = Context::new("fail");
        match call(&manager, plugin, &mut ctx) {
            Err(Error::Plugin { message, .. }) => {
                assert_eq!(message, "HTTP 400: Unknown command")
            }
            other => panic!("{other:?}"),
        }
    }
    let info = manager.info("py-unix").unwrap();
    let process = info.process.unwrap();
    assert!(process.address.starts_with("unix:"), "{process:?}");
    assert_eq!(process.protocol, "rest");
    let pids = [
        pid_of(&manager, "py-tcp").unwrap(),
        pid_of(&manager, "py-unix").unwrap(),
    ];
    manager.unload_all();
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived its unload");
    }
}

/// An exec manifest for a Rust sample, with `extra` source fields.
fn sample_manifest(name: &str, sample: &str, version: &str, extra: &str) -> String {
    let protocol = if sample == "exec-grpc" {
        "grpc"
    } else {
        "rest"
    };
    format!(
        r#"{{"name": "{name}", "version": "{version}", "source": {{"mode": "exec", "path": "{sample}", "protocol": "{protocol}"{extra}}}}}"#
    )
}

#[test]
fn rust_samples_serve_both_protocols_on_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for sample in support::EXEC_SAMPLES {
        for listen in ["tcp", "unix"] {
            let name = format!("{sample}-{listen}");
            let manifest = sample_manifest(
                &name,
                sample,
                "1.0.0",
                &format!(r#", "listen": "{listen}""#),
            );
            support::install_exec(dir.path(), sample, &name, Some(&manifest));
            names.push(name);
        }
    }
    let manager = PluginManager::new(dir.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let runtime = support::runtime();
    for name in &names {
        let (_, executor) = manager.get_plugin(name).unwrap();
        let mut ctx = Context::new("greet").with("name", "Ada");
        executor.execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"), "{name}");
        // From a runtime: the call runs on the caller's runtime.
        let values = runtime.block_on(async {
            let mut ctx = Context::new("echo").with("n", 7).with("s", "x");
            executor.execute_async(&mut ctx).await.unwrap();
            (ctx.get_i64("n"), ctx.written().count())
        });
        assert_eq!(values, (Some(7), 2), "{name}");
        match executor.execute(&mut Context::new("nope")) {
            Err(Error::Plugin { message, .. }) => {
                assert!(message.contains("Unknown command"), "{name}: {message}")
            }
            other => panic!("{name}: {other:?}"),
        }
        let process = manager.info(name).unwrap().process.unwrap();
        let unix = name.ends_with("unix");
        assert_eq!(process.address.starts_with("unix:"), unix, "{process:?}");
    }
    // The deadline reaches the plugin and bounds the wait.
    for name in ["exec-rest-unix", "exec-grpc-tcp"] {
        let started = Instant::now();
        let mut ctx = Context::new("sleep")
            .with("ms", 5000)
            .with_timeout(Duration::from_millis(150));
        match call(&manager, name, &mut ctx) {
            Err(Error::DeadlineExceeded { .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // The plugin still serves.
        call(&manager, name, &mut Context::new("greet")).unwrap();
    }
    manager.unload_all();
}

/// Calls `plugin` from `threads` threads until `stop`, counting successes
/// and collecting every error.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<Error>)>>,
}

impl Load {
    fn start_with(manager: &PluginManager, plugin: &str, threads: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|i| {
                let (_, executor) = manager.get_plugin(plugin).unwrap();
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut ok, mut errors) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut ctx = Context::new("echo").with("i", i as i64);
                        match executor.execute(&mut ctx) {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                errors.push(e);
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> (u64, Vec<Error>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for thread in self.threads {
            let (ok, errors) = thread.join().unwrap();
            total.0 += ok;
            total.1.extend(errors);
        }
        total
    }
}

fn kill(pid: u32, signal: i32) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[test]
fn kill_9_under_load_gives_unavailable_then_success_within_a_second() {
    for sample in support::EXEC_SAMPLES {
        let dir = tempfile::tempdir().unwrap();
        let manifest = sample_manifest(sample, sample, "1.0.0", r#", "listen": "unix""#);
        support::install_exec(dir.path(), sample, sample, Some(&manifest));
        let manager = PluginManager::new(dir.path()).unwrap();
        let mut events = manager.subscribe();
        manager.load_plugin(sample).unwrap();
        let before = pid_of(&manager, sample).unwrap();
        let load = Load::start_with(&manager, sample, 8);
        let (_, executor) = manager.get_plugin(sample).unwrap();
        eventually("calls under way", || executor.calls().calls > 100);
        kill(before, 9);
        let killed = Instant::now();
        let restarted = wait_for_event(&mut events, "the restart", |e| {
            matches!(e, Event::Restarted { .. })
        });
        let after = match restarted {
            Event::Restarted { pid, .. } => pid,
            _ => unreachable!(),
        };
        let calls_then = executor.calls().calls;
        eventually("calls after the restart", || {
            executor.calls().calls > calls_then + 100
        });
        let back = killed.elapsed();
        let (ok, errors) = load.finish();
        // More than 100 calls before the kill and 100 after the restart;
        // those caught by the kill failed (each checked below).
        assert!(ok > 100, "{sample}: {ok} calls succeeded");
        executor
            .execute(&mut Context::new("echo").with("i", 1i64))
            .unwrap_or_else(|e| panic!("{sample}: a call after the restart: {e}"));
        for error in &errors {
            assert!(
                matches!(error, Error::Unavailable { .. }),
                "{sample}: {error}"
            );
        }
        assert_ne!(before, after);
        assert!(!alive(before), "the killed process was reaped");
        assert!(
            back < Duration::from_secs(1),
            "{sample}: back after {back:?}"
        );
        let info = manager.info(sample).unwrap();
        assert_eq!(info.state, PluginState::Loaded);
        assert_eq!(info.process.unwrap().restarts, 1);
        manager.unload_all();
        assert!(!alive(after));
    }
}

/// Processes whose parent is this process, with their state letter.
fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let mut rest = stat.rsplit(')').next()?.split_whitespace();
            let state = rest.next()?.chars().next()?;
            let ppid: u32 = rest.next()?.parse().ok()?;
            (ppid == me).then_some((pid, state))
        })
        .collect()
}

/// Children running the private copy of a plugin's executable.
fn plugin_children(copy_name: &str) -> Vec<(u32, char)> {
    children()
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.to_string_lossy().contains(copy_name))
        })
        .collect()
}

#[test]
fn a_hundred_crashes_leave_no_zombie_and_no_stray_process() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = sample_manifest(
        "crashy",
        "exec-rest",
        "1.0.0",
        r#", "listen": "unix", "restart_backoff_ms": 1, "restart_backoff_max_ms": 5"#,
    );
    support::install_exec(dir.path(), "exec-rest", "crashy", Some(&manifest));
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugin("crashy").unwrap();
    let mut saw_crash_loop = false;
    for round in 0..100 {
        let pid = pid_of(&manager, "crashy")
            .unwrap_or_else(|| panic!("round {round}: {:?}", manager.info("crashy")));
        kill(pid, 9);
        eventually(&format!("restart {round}"), || {
            saw_crash_loop |= manager.info("crashy").unwrap().state == PluginState::CrashLoop;
            pid_of(&manager, "crashy").is_some_and(|p| p != pid)
        });
    }
    let info = manager.info("crashy").unwrap();
    assert_eq!(info.process.as_ref().unwrap().restarts, 100);
    wait_for_event(&mut events, "the crash loop event", |e| {
        matches!(e, Event::CrashLoop { .. })
    });
    assert!(
        saw_crash_loop,
        "the crash-loop state was visible in the listing"
    );
    // Every killed process was reaped: the only child left runs the copy.
    eventually("no zombie", || {
        children().iter().all(|(_, state)| *state != 'Z')
    });
    let running: Vec<_> = children()
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.starts_with(dir.path().canonicalize().unwrap()))
        })
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
    let mut ctx = Context::new("greet");
    call(&manager, "crashy", &mut ctx).unwrap();
    manager.unload_all();
    assert!(plugin_children("crashy.").is_empty());
    assert!(!alive(running[0].0));
}

#[test]
fn broken_plugins_fail_clearly_while_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install_python(base, "healthy", "1.0.0", "");
    install_python(
        base,
        "bad-sum",
        "1.0.0",
        &format!(r#""sha256": "{}""#, "0".repeat(64)),
    );
    install_python(
        base,
        "md5-ok",
        "1.0.0",
        &format!(r#""md5": "{}""#, md5_of(&python_fixture())),
    );
    let missing = install_python(base, "missing", "1.0.0", "");
    std::fs::remove_file(missing.join("plugin.py")).unwrap();
    let not_exec = install_python(base, "not-exec", "1.0.0", "");
    {
        use std::os::unix::fs::PermissionsExt;
        let file = not_exec.join("plugin.py");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    install_python(base, "exits", "1.0.0", r#""args": ["--mode=exit-at-once"]"#);
    install_python(
        base,
        "mute",
        "1.0.0",
        // Long enough for Python to start and log on a loaded machine (measured
        // 370-570 ms alone at load 7): the error must quote the 503 and stderr.
        r#""args": ["--mode=no-ping"], "start_timeout_ms": 3000"#,
    );
    install_python(base, "garbage", "1.0.0", r#""args": ["--mode=garbage"]"#);
    install_python(base, "huge", "1.0.0", r#""args": ["--mode=huge"]"#);
    let manager = PluginManager::new(base).unwrap();
    manager.load_plugin("healthy").unwrap();
    // Calls go on while the others load (and `healthy` is reloaded).
    let healthy = Load::start_with(&manager, "healthy", 2);
    let report = {
        let loader = manager.clone();
        std::thread::spawn(move || loader.load_plugins().unwrap())
            .join()
            .unwrap()
    };
    let failed: std::collections::BTreeMap<String, String> = report
        .failed
        .iter()
        .map(|(name, e)| (name.clone(), e.to_string()))
        .collect();
    let expect = |name: &str, parts: &[&str]| {
        let message = failed
            .get(name)
            .unwrap_or_else(|| panic!("{name} loaded: {failed:?}"));
        assert!(message.starts_with(&format!("{name}: ")), "{message}");
        for part in parts {
            assert!(message.contains(part), "{name}: `{part}` not in: {message}");
        }
    };
    expect("bad-sum", &["plugin.py", "sha256 mismatch"]);
    expect("missing", &["plugin.py", "No such file"]);
    expect("not-exec", &["plugin.py", "not executable (mode 0644)"]);
    expect(
        "exits",
        &[
            "plugin.py",
            "exited with status 7 before answering Ping",
            "«exec_rest.py: refusing to start (--mode=exit-at-once)»",
        ],
    );
    expect(
        "mute",
        &[
            "plugin.py",
            "did not answer Ping within 3s",
            "HTTP 503",
            "«exec_rest.py listening»",
        ],
    );
    assert!(report.loaded.contains(&"md5-ok".to_owned()), "{failed:?}");
    assert_eq!(failed.len(), 5, "{failed:?}");
    match call(&manager, "garbage", &mut Context::new("greet")) {
        Err(Error::BadReply { message, .. }) => {
            assert!(message.contains("not goplugin's JSON"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    match call(&manager, "huge", &mut Context::new("greet")) {
        Err(Error::BadReply { message, .. }) => {
            assert!(
                message.contains("over the limit of 16777216 bytes"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    let mut slow = Context::new("sleep")
        .with("ms", 3000)
        .with_timeout(Duration::from_millis(200));
    assert!(matches!(
        call(&manager, "healthy", &mut slow),
        Err(Error::DeadlineExceeded { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
    // No process is left behind by the failed loads.
    let (ok, errors) = healthy.finish();
    assert!(ok > 10 && errors.is_empty(), "{ok} {errors:?}");
    manager.unload_all();
    eventually("no child left", || {
        children().iter().all(|(pid, _)| {
            !std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd.starts_with(base.canonicalize().unwrap()))
        })
    });
}

fn md5_of(path: &Path) -> String {
    let out = std::process::Command::new("md5sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

#[test]
fn a_jsonrpc_exec_manifest_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    install_python(dir.path(), "rpc", "1.0.0", "");
    let path = dir.path().join("rpc/plugin.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("rest", "jsonrpc");
    std::fs::write(&path, text).unwrap();
    match dynplug::verify(dir.path().join("rpc")) {
        Err(Error::Manifest { field, message, .. }) => {
            assert_eq!(field, "source.protocol");
            assert!(message.contains("\"rest\" or \"grpc\""), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_process_that_stops_answering_pings_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = sample_manifest(
        "frozen",
        "exec-rest",
        "1.0.0",
        r#", "health_interval_ms": 50, "health_timeout_ms": 50, "health_misses": 2, "stop_grace_ms": 100"#,
    );
    support::install_exec(dir.path(), "exec-rest", "frozen", Some(&manifest));
    let manager = PluginManager::new(dir.path()).unwrap();
    let mut events = manager.subscribe();
    manager.load_plugin("frozen").unwrap();
    let pid = pid_of(&manager, "frozen").unwrap();
    // Stopped, it neither answers nor exits; SIGTERM waits, SIGKILL works.
    kill(pid, 19);
    let crashed = wait_for_event(&mut events, "the crash", |e| {
        matches!(e, Event::Crashed { .. })
    });
    let Event::Crashed { reason, .. } = crashed else {
        unreachable!()
    };
    assert!(
        reason.contains("missed 2 health pings in a row"),
        "{reason}"
    );
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
    wait_for_event(&mut events, "the restart", |e| {
        matches!(e, Event::Restarted { .. })
    });
    assert!(!alive(pid));
    call(&manager, "frozen", &mut Context::new("greet")).unwrap();
    manager.unload_all();
}

#[test]
fn hot_upgrade_under_load_fails_no_call_and_a_broken_version_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for sample in support::EXEC_SAMPLES {
        let manifest = sample_manifest(sample, sample, "1.0.0", "");
        support::install_exec(base, sample, sample, Some(&manifest));
    }
    let manager = PluginManager::new(base).unwrap();
    manager.load_plugins().unwrap();
    let mut events = manager.subscribe();
    let watcher = manager.watch().unwrap();
    for sample in support::EXEC_SAMPLES {
        let old = pid_of(&manager, sample).unwrap();
        let load = Load::start_with(&manager, sample, 8);
        let (_, executor) = manager.get_plugin(sample).unwrap();
        eventually("calls under way", || executor.calls().calls > 50);
        let manifest = sample_manifest(sample, sample, "2.0.0", r#", "listen": "unix""#);
        support::install_exec(base, sample, sample, Some(&manifest));
        wait_for_event(
            &mut events,
            "the upgrade",
            |e| matches!(e, Event::Upgraded { plugin, .. } if plugin == *sample),
        );
        wait_for_event(
            &mut events,
            "the old version's end",
            |e| matches!(e, Event::Unloaded { plugin, .. } if plugin == *sample),
        );
        let calls_then = executor.calls().calls;
        eventually("calls on the new version", || {
            executor.calls().calls > calls_then + 50
        });
        let (ok, errors) = load.finish();
        assert!(
            errors.is_empty(),
            "{sample}: {} failed: {:?}",
            errors.len(),
            errors.first()
        );
        assert!(ok > 100);
        assert!(!alive(old), "{sample}: the old process was stopped");
        let info = manager.info(sample).unwrap();
        assert_eq!(info.version.as_deref(), Some("2.0.0"));
        assert!(info.process.unwrap().address.starts_with("unix:"));

        // A version that cannot start leaves 2.0.0 serving.
        let staging = base.join(".v3");
        std::fs::create_dir_all(&staging).unwrap();
        let script = staging.join(sample);
        std::fs::write(&script, "#!/bin/sh\necho 'v3 cannot start' >&2\nexit 2\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let manifest = sample_manifest(sample, sample, "3.0.0", "");
        std::fs::write(staging.join("plugin.json"), manifest).unwrap();
        support::replace_dir(&staging, &base.join(sample));
        let failed = wait_for_event(
            &mut events,
            "the failed upgrade",
            |e| matches!(e, Event::UpgradeFailed { plugin, .. } if plugin == *sample),
        );
        let Event::UpgradeFailed {
            reason,
            still_serving,
            ..
        } = failed
        else {
            unreachable!()
        };
        assert_eq!(still_serving, "2.0.0");
        assert!(reason.contains("«v3 cannot start»"), "{reason}");
        call(&manager, sample, &mut Context::new("greet")).unwrap();
    }
    assert!(watcher.wait_settled(PATIENCE));
    drop(watcher);
    manager.unload_all();
}

/// `dynplug serve` over exec plugins: their routes, the management API
/// (pid, logs), the metrics; then the host is killed with SIGKILL and its
/// plugins' processes are gone within a second.
#[test]
fn served_by_the_dynplug_binary_and_gone_when_it_is_killed() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = support::private_tempdir();
    let base = dir.path();
    support::install_exec(base, "exec-rest", "exec-rest", None);
    support::install_exec(base, "exec-grpc", "exec-grpc", None);
    install_python(base, "py", "1.0.0", "");
    let mut host = support::ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_dynplug"))
            .args([
                "serve",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--plugins",
            ])
            .arg(base)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = support::lines_of(host.0.stderr.take().unwrap());
    let mut stdout = std::io::BufReader::new(host.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    // The child's stderr went to the host's log, under the plugin's name.
    support::wait_for_line(&stderr, |l| {
        l.contains("exec_rest.py listening") && l.contains("py")
    });
    for (route, plugin) in [
        ("/api/exec-rest/greet/Ada", "exec-rest"),
        ("/api/exec-grpc/greet/Ada", "exec-grpc"),
    ] {
        let response = support::http_get(&addr, route);
        assert!(response.starts_with("HTTP/1.1 200"), "{plugin}: {response}");
        assert!(
            response.ends_with(r#"{"greeting":"hello, Ada"}"#),
            "{response}"
        );
    }
    let response = support::http_get(&addr, "/_dynplug/plugins");
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let plugins: serde_json::Value = serde_json::from_str(body).unwrap();
    let pids: Vec<u32> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["process"]["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 3, "{plugins}");
    let py = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "py")
        .unwrap();
    assert!(
        py["process"]["logs"]
            .to_string()
            .contains("stderr] exec_rest.py listening"),
        "{py}"
    );
    let metrics = support::http_get(&addr, "/metrics");
    assert!(
        metrics.contains(r#"dynplug_process_restarts_total{plugin="exec-grpc"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"dynplug_process_up{plugin="py"} 1"#),
        "{metrics}"
    );
    for pid in &pids {
        assert!(alive(*pid));
    }
    kill(host.0.id(), 9);
    let killed = Instant::now();
    let _ = host.0.wait();
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "plugin processes outlived their host by a second: {:?}",
            pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
