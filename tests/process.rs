//! `isolation: "process"`: the same cdylib in a child process (the
//! `dynplug` binary as its runner), crash-contained, supervised, upgraded.
//! Real processes; every wait is on a state, bounded by `PATIENCE`.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dynplug::{Context, Error, Event, PluginManager, PluginState, Value};
use support::{PATIENCE, eventually, wait_for_event};

/// A manager over `dir` whose process plugins run in the `dynplug` binary.
fn manager(dir: &Path) -> PluginManager {
    PluginManager::builder(dir)
        .process_runner(support::runner())
        .process_grace(Duration::from_millis(300))
        .process_restart_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build()
        .unwrap()
}

/// Installs `sample` as `name` with `isolation` and `extra` manifest fields.
fn install(base: &Path, sample: &str, name: &str, isolation: &str, extra: &str) {
    let mut fields = format!(r#""isolation": "{isolation}""#);
    if !extra.is_empty() {
        fields = format!("{fields}, {extra}");
    }
    let manifest = support::manifest(name, sample, "1.0.0", &fields);
    support::install_as(base, sample, name, Some(&manifest));
}

fn pid_of(manager: &PluginManager, plugin: &str) -> Option<u32> {
    manager.info(plugin)?.process?.pid
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z')
    })
}

fn kill(pid: u32, signal: i32) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
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

/// Children whose working directory is under `dir` (runners start in their
/// plugin directory).
fn runners_under(dir: &Path) -> Vec<(u32, char)> {
    let dir = dir.canonicalize().unwrap();
    children()
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .collect()
}

/// Calls a plugin from `threads` threads until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<Error>)>>,
}

impl Load {
    fn start(manager: &PluginManager, plugin: &str, label: &str, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|i| {
                let (_, executor) = manager.get_plugin(plugin).unwrap();
                let stop = Arc::clone(&stop);
                let label = label.to_owned();
                std::thread::spawn(move || {
                    let (mut ok, mut errors) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let mut ctx = Context::new(&label).with("name", format!("caller {i}"));
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
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for thread in self.threads {
            let (ok, errors) = thread.join().unwrap();
            total.0 += ok;
            total.1.extend(errors);
        }
        total
    }
}

/// The functional checks every isolation must pass alike, on `hello`,
/// `counter`, `panicking`, `slow` and `failing-init` installed as
/// `<sample>-<isolation>`.
fn functional_checks(manager: &PluginManager, isolation: &str, marker: &Path) {
    let name = |sample: &str| format!("{sample}-{isolation}");
    let call = |plugin: &str, ctx: &mut Context| support::call(manager, &name(plugin), ctx);
    let mut ctx = Context::new("hello.get").with("name", "Ada");
    call("hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"), "{isolation}");
    assert_eq!(
        ctx.written().map(|(k, _)| k).collect::<Vec<_>>(),
        ["greeting"]
    );
    let mut ctx = Context::new("hello.sum").with(
        "numbers",
        Value::List(vec![1.into(), 2.into(), Value::Int(-40)]),
    );
    call("hello", &mut ctx).unwrap();
    assert_eq!(
        (ctx.get_i64("sum"), ctx.get_i64("count")),
        (Some(-37), Some(3))
    );
    let mut ctx = Context::new("hello.echo")
        .with("b", Value::Bytes(vec![0, 1, 255]))
        .with("f", 2.5)
        .with("m", Value::Map([("k".to_owned(), Value::Null)].into()));
    call("hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_bytes("echo.b"), Some(&[0u8, 1, 255][..]));
    assert_eq!(ctx.get_f64("echo.f"), Some(2.5));
    assert_eq!(ctx.get("echo.m"), ctx.get("m"));
    match call("hello", &mut Context::new("nope")) {
        Err(Error::Plugin {
            plugin, message, ..
        }) => {
            assert_eq!(plugin, name("hello"));
            assert_eq!(message, "unknown label nope");
        }
        other => panic!("{isolation}: {other:?}"),
    }
    match call("panicking", &mut Context::new("boom")) {
        Err(Error::Panic { message, .. }) => {
            assert!(
                message.contains("deliberate panic on label boom"),
                "{message}"
            )
        }
        other => panic!("{isolation}: {other:?}"),
    }
    let mut ok = Context::new("ok");
    call("panicking", &mut ok).unwrap();
    assert_eq!(ok.get_bool("ok"), Some(true));
    // State from init's config, kept across calls.
    for expected in [15, 20] {
        let mut ctx = Context::new("counter.incr");
        call("counter", &mut ctx).unwrap();
        assert_eq!(ctx.get_i64("count"), Some(expected), "{isolation}");
        assert_eq!(ctx.get_str("generation"), Some("g7"));
    }
    // A deadline the plugin honours: DeadlineExceeded, and (pooled and
    // process) the caller is back at the deadline.
    let started = Instant::now();
    let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(100));
    match call("slow", &mut ctx) {
        Err(Error::DeadlineExceeded { .. }) => {}
        other => panic!("{isolation}: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A cancel token: the plugin sees it and stops; the caller gets
    // Cancelled (without a deadline, so nothing is killed).
    let started = marker.with_extension("started");
    let token = dynplug::CancelToken::new();
    let canceller = {
        let (token, started) = (token.clone(), started.clone());
        std::thread::spawn(move || {
            eventually("the slow call to start", || started.exists());
            token.cancel();
        })
    };
    let mut ctx = Context::new("spin")
        .with("started_file", started.to_str().unwrap())
        .with_cancel_token(token);
    match call("slow", &mut ctx) {
        Err(Error::Cancelled { .. }) => {}
        other => panic!("{isolation}: {other:?}"),
    }
    canceller.join().unwrap();
    // Async, from a runtime.
    let (_, hello) = manager.get_plugin(&name("hello")).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let greeting = runtime.block_on(async {
        let mut ctx = Context::new("hello.get").with("name", "Bob");
        hello.execute_async(&mut ctx).await.unwrap();
        ctx.get_str("greeting").map(str::to_owned)
    });
    assert_eq!(greeting.as_deref(), Some("hello, Bob"));
    // Unload runs shutdown (the counter writes its marker).
    manager.unload(&name("counter")).unwrap();
    eventually("the counter's shutdown", || {
        std::fs::read_to_string(marker).is_ok_and(|c| c == "20")
    });
}

#[test]
fn the_same_samples_pass_the_same_checks_in_all_three_isolations() {
    let dir = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let isolations = ["inline", "pooled", "process"];
    for isolation in isolations {
        for sample in ["hello", "panicking", "slow", "failing-init"] {
            install(
                dir.path(),
                sample,
                &format!("{sample}-{isolation}"),
                isolation,
                "",
            );
        }
        let marker = markers.path().join(isolation);
        let config = format!(
            r#""config": {{"start": 10, "step": 5, "generation": "g7", "shutdown_marker": "{}"}}"#,
            marker.display()
        );
        install(
            dir.path(),
            "counter",
            &format!("counter-{isolation}"),
            isolation,
            &config,
        );
    }
    let manager = manager(dir.path());
    let report = manager.load_plugins().unwrap();
    // failing-init fails the same way in each isolation.
    assert_eq!(report.failed.len(), 3, "{:?}", report.failed);
    for (name, error) in &report.failed {
        assert!(name.starts_with("failing-init-"), "{name}: {error}");
        match error {
            Error::Init { message, .. } => {
                assert_eq!(message, "failing-init: config.token is required", "{name}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    for isolation in isolations {
        functional_checks(&manager, isolation, &markers.path().join(isolation));
    }
    let info = manager.info("hello-process").unwrap();
    assert_eq!(info.isolation, Some(dynplug::Isolation::Process));
    let process = info.process.unwrap();
    assert_eq!(process.protocol, "dynplug");
    assert!(process.rss_bytes.unwrap() > 1024 * 1024, "{process:?}");
    assert!(manager.info("hello-pooled").unwrap().process.is_none());
    let pids: Vec<u32> = ["hello", "panicking", "slow"]
        .iter()
        .map(|s| pid_of(&manager, &format!("{s}-process")).unwrap())
        .collect();
    manager.unload_all();
    for pid in pids {
        assert!(!alive(pid), "runner {pid} outlived its unload");
    }
    assert!(runners_under(dir.path()).is_empty());
}

/// Installs the panic-abort fixture as `<base>/<name>` (process isolation).
fn install_panic_abort(base: &Path, name: &str) {
    let staging = base.join(format!(".{name}.staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let lib = support::panic_abort_library();
    std::fs::copy(lib, staging.join(lib.file_name().unwrap())).unwrap();
    let manifest = support::manifest(name, "panic-abort", "1.0.0", r#""isolation": "process""#);
    std::fs::write(staging.join("plugin.json"), manifest).unwrap();
    support::replace_dir(&staging, &base.join(name));
}

fn restarted(events: &mut dynplug::Events, plugin: &str) -> u32 {
    match wait_for_event(
        events,
        "the restart",
        |e| matches!(e, Event::Restarted { plugin: p, .. } if p == plugin),
    ) {
        Event::Restarted { pid, .. } => pid,
        _ => unreachable!(),
    }
}

#[test]
fn every_crash_kind_is_contained_and_the_process_restarted() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "crashing", "crashing", "process", "");
    install_panic_abort(dir.path(), "panic-abort");
    // Bystanders: another process plugin and an in-process one.
    install(dir.path(), "hello", "hello-process", "process", "");
    install(dir.path(), "hello", "hello-pooled", "pooled", "");
    let manager = manager(dir.path());
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut events = manager.subscribe();
    let bystander_pid = pid_of(&manager, "hello-process").unwrap();
    let bystanders = [
        Load::start(&manager, "hello-process", "hello.get", 2),
        Load::start(&manager, "hello-pooled", "hello.get", 2),
    ];
    let cases: [(&str, &str, &[&str]); 4] = [
        ("crashing", "segfault", &["killed by SIGSEGV"]),
        ("crashing", "abort", &["killed by SIGABRT"]),
        (
            "crashing",
            "overflow",
            &["killed by SIGABRT", "stack overflow"],
        ),
        (
            "panic-abort",
            "boom",
            &["killed by SIGABRT", "deliberate panic on label boom"],
        ),
    ];
    for (plugin, label, expected) in cases {
        let before = pid_of(&manager, plugin).unwrap();
        match support::call(&manager, plugin, &mut Context::new(label)) {
            Err(Error::Crashed {
                plugin: p,
                label: l,
                reason,
            }) => {
                assert_eq!((p.as_str(), l.as_str()), (plugin, label));
                for part in expected {
                    assert!(reason.contains(part), "{label}: `{part}` not in {reason}");
                }
                let text = Error::Crashed {
                    plugin: p,
                    label: l,
                    reason,
                }
                .to_string();
                assert!(
                    text.starts_with(&format!("{plugin}: {label}: the plugin's process crashed")),
                    "{text}"
                );
            }
            other => panic!("{label}: {other:?}"),
        }
        let crashed = wait_for_event(
            &mut events,
            "the crash event",
            |e| matches!(e, Event::Crashed { plugin: p, .. } if p == plugin),
        );
        let Event::Crashed { pid, reason, .. } = crashed else {
            unreachable!()
        };
        assert_eq!(pid, Some(before));
        assert!(reason.contains(expected[0]), "{reason}");
        let after = restarted(&mut events, plugin);
        assert_ne!(after, before);
        assert!(!alive(before), "{label}: the crashed runner was reaped");
        let mut ctx = Context::new("ok");
        support::call(&manager, plugin, &mut ctx).unwrap();
        assert_eq!(
            ctx.get_bool("ok"),
            Some(true),
            "{label}: the next call succeeds"
        );
    }
    for load in bystanders {
        let (ok, errors) = load.finish();
        assert!(ok > 10 && errors.is_empty(), "{ok} {errors:?}");
    }
    assert_eq!(pid_of(&manager, "hello-process"), Some(bystander_pid));
    assert_eq!(
        manager.info("crashing").unwrap().process.unwrap().restarts,
        3
    );
    manager.unload_all();
    assert!(runners_under(dir.path()).is_empty());
}

#[test]
fn kill_9_while_8_threads_call_fails_only_calls_in_flight_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "hello", "hello", "process", "");
    let manager = manager(dir.path());
    manager.load_plugin("hello").unwrap();
    let mut events = manager.subscribe();
    let before = pid_of(&manager, "hello").unwrap();
    let load = Load::start(&manager, "hello", "hello.get", 8);
    let (_, executor) = manager.get_plugin("hello").unwrap();
    eventually("calls under way", || executor.calls().calls > 200);
    kill(before, 9);
    let killed = Instant::now();
    let after = restarted(&mut events, "hello");
    let calls_then = executor.calls().calls;
    eventually("calls after the restart", || {
        executor.calls().calls > calls_then + 200
    });
    let back = killed.elapsed();
    let (ok, errors) = load.finish();
    assert!(ok > 400, "{ok}");
    for error in &errors {
        match error {
            Error::Unavailable { .. } => {}
            Error::Crashed { reason, .. } => {
                assert!(reason.contains("killed by SIGKILL"), "{reason}")
            }
            other => panic!("{other}"),
        }
    }
    assert_ne!(before, after);
    assert!(!alive(before));
    assert!(back < Duration::from_secs(1), "back after {back:?}");
    let info = manager.info("hello").unwrap();
    assert_eq!(info.state, PluginState::Loaded);
    assert_eq!(info.process.unwrap().restarts, 1);
    manager.unload_all();
    assert!(!alive(after));
}

#[test]
fn a_hundred_crashes_leave_no_zombie_and_no_stray_process() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "crashing", "crashing", "process", "");
    let manager = manager(dir.path());
    manager.load_plugin("crashing").unwrap();
    let mut saw_crash_loop = false;
    for round in 0..100 {
        let pid = pid_of(&manager, "crashing")
            .unwrap_or_else(|| panic!("round {round}: {:?}", manager.info("crashing")));
        // Half killed from outside, half crashing in a call.
        if round % 2 == 0 {
            kill(pid, 9);
        } else {
            let crashed = support::call(&manager, "crashing", &mut Context::new("segfault"));
            assert!(matches!(crashed, Err(Error::Crashed { .. })), "{crashed:?}");
        }
        eventually(&format!("restart {round}"), || {
            saw_crash_loop |= manager.info("crashing").unwrap().state == PluginState::CrashLoop;
            pid_of(&manager, "crashing").is_some_and(|p| p != pid)
        });
    }
    assert_eq!(
        manager.info("crashing").unwrap().process.unwrap().restarts,
        100
    );
    assert!(saw_crash_loop, "the crash-loop state was visible");
    eventually("no zombie", || children().iter().all(|(_, s)| *s != 'Z'));
    let running = runners_under(dir.path());
    assert_eq!(running.len(), 1, "{running:?}");
    support::call(&manager, "crashing", &mut Context::new("ok")).unwrap();
    manager.unload_all();
    assert!(runners_under(dir.path()).is_empty());
    assert!(!alive(running[0].0));
}

#[test]
fn a_call_past_its_deadline_and_grace_gets_the_process_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "crashing", "crashing", "process", "");
    install(dir.path(), "slow", "slow", "process", "");
    let manager = manager(dir.path());
    manager.load_plugins().unwrap();
    let mut events = manager.subscribe();
    // A call that honours its deadline: no kill.
    let slow_pid = pid_of(&manager, "slow").unwrap();
    let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(50));
    assert!(matches!(
        support::call(&manager, "slow", &mut ctx),
        Err(Error::DeadlineExceeded { .. })
    ));
    // A call that ignores it: the caller is back at the deadline, the
    // process is killed after the grace (300 ms) and restarted.
    let before = pid_of(&manager, "crashing").unwrap();
    let started = Instant::now();
    let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(100));
    match support::call(&manager, "crashing", &mut ctx) {
        Err(Error::DeadlineExceeded { plugin, label }) => {
            assert_eq!((plugin.as_str(), label.as_str()), ("crashing", "spin"))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let crashed = wait_for_event(
        &mut events,
        "the kill",
        |e| matches!(e, Event::Crashed { plugin, .. } if plugin == "crashing"),
    );
    let Event::Crashed { reason, .. } = crashed else {
        unreachable!()
    };
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
    assert!(
        reason.contains("call `spin` still running 300ms after its deadline"),
        "{reason}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let after = restarted(&mut events, "crashing");
    assert_ne!(before, after);
    support::call(&manager, "crashing", &mut Context::new("ok")).unwrap();
    // The same from an async caller.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, crashing) = manager.get_plugin("crashing").unwrap();
    let result = runtime.block_on(async {
        let mut ctx = Context::new("spin").with_timeout(Duration::from_millis(100));
        crashing.execute_async(&mut ctx).await
    });
    assert!(
        matches!(result, Err(Error::DeadlineExceeded { .. })),
        "{result:?}"
    );
    restarted(&mut events, "crashing");
    support::call(&manager, "crashing", &mut Context::new("ok")).unwrap();
    assert_eq!(
        pid_of(&manager, "slow"),
        Some(slow_pid),
        "slow was never killed"
    );
    manager.unload_all();
}

#[test]
fn resource_limits_end_the_process_with_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    install(
        dir.path(),
        "crashing",
        "hog",
        "process",
        r#""limits": {"memory_mb": 256, "open_files": 64}"#,
    );
    install(
        dir.path(),
        "crashing",
        "burner",
        "process",
        r#""limits": {"cpu_seconds": 1}"#,
    );
    let manager = manager(dir.path());
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut events = manager.subscribe();
    // Within the limit: fine.
    let mut ctx = Context::new("hog").with("mb", 16);
    support::call(&manager, "hog", &mut ctx).unwrap();
    assert_eq!(ctx.get_i64("filled"), Some(16 << 20));
    match support::call(&manager, "hog", &mut Context::new("hog").with("mb", 1024)) {
        Err(Error::Crashed { reason, .. }) => {
            assert!(reason.contains("killed by SIGABRT"), "{reason}");
            assert!(
                reason.contains("its memory limit (256 MiB of address space) was reached"),
                "{reason}"
            );
            assert!(reason.contains("memory allocation of"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    restarted(&mut events, "hog");
    support::call(&manager, "hog", &mut Context::new("ok")).unwrap();
    match support::call(
        &manager,
        "burner",
        &mut Context::new("burn").with("ms", 20_000),
    ) {
        Err(Error::Crashed { reason, .. }) => {
            assert!(reason.contains("SIGXCPU"), "{reason}");
            assert!(reason.contains("CPU-time limit (1 s)"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    restarted(&mut events, "burner");
    support::call(&manager, "burner", &mut Context::new("ok")).unwrap();
    manager.unload_all();
}

#[test]
fn hot_upgrade_of_a_process_plugin_under_load_fails_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    install(base, "hello", "hello", "process", "");
    let manager = manager(base);
    manager.load_plugins().unwrap();
    let mut events = manager.subscribe();
    let watcher = manager.watch().unwrap();
    let old = pid_of(&manager, "hello").unwrap();
    let load = Load::start(&manager, "hello", "hello.get", 8);
    let (_, executor) = manager.get_plugin("hello").unwrap();
    eventually("calls under way", || executor.calls().calls > 200);
    let manifest = support::manifest("hello", "hello", "2.0.0", r#""isolation": "process""#);
    support::install_as(base, "hello", "hello", Some(&manifest));
    wait_for_event(
        &mut events,
        "the upgrade",
        |e| matches!(e, Event::Upgraded { plugin, .. } if plugin == "hello"),
    );
    wait_for_event(
        &mut events,
        "the old version's end",
        |e| matches!(e, Event::Unloaded { plugin, .. } if plugin == "hello"),
    );
    let calls_then = executor.calls().calls;
    eventually("calls on the new version", || {
        executor.calls().calls > calls_then + 200
    });
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(ok > 400, "{ok}");
    assert!(!alive(old), "the old runner was stopped");
    let info = manager.info("hello").unwrap();
    assert_eq!(info.version.as_deref(), Some("2.0.0"));
    assert_ne!(info.process.unwrap().pid, Some(old));
    assert!(watcher.wait_settled(PATIENCE));
    drop(watcher);
    manager.unload_all();
    assert!(runners_under(base).is_empty());
}

/// `dynplug serve` over a process plugin: its route, the management API
/// (pid, RSS, isolation), the metrics, `dynplug list`; then the host is
/// killed with SIGKILL and its runners are gone within a second.
#[test]
fn served_by_the_dynplug_binary_and_gone_within_a_second_when_it_is_killed() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = support::private_tempdir();
    let base = dir.path();
    install(
        base,
        "hello",
        "hello",
        "process",
        r#""http_services": {"routes": [{"route": "/api/hello/:name", "method": "GET", "label": "hello.get"}]}"#,
    );
    install(base, "counter", "counter", "process", "");
    let list = Command::new(support::runner())
        .args(["list", "--plugins"])
        .arg(base)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hello") && l.contains("process") && l.contains("loaded")),
        "{table}"
    );
    let mut host = support::ChildGuard(
        Command::new(support::runner())
            .args(["serve", "--http", "127.0.0.1:0", "--plugins"])
            .arg(base)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(host.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let response = support::http_get(&addr, "/api/hello/Ada");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(r#"{"greeting":"hello, Ada"}"#),
        "{response}"
    );
    let response = support::http_get(&addr, "/_dynplug/plugins");
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let plugins: serde_json::Value = serde_json::from_str(body).unwrap();
    let plugins = plugins.as_array().unwrap();
    assert_eq!(plugins.len(), 2, "{plugins:?}");
    let mut pids = Vec::new();
    for p in plugins {
        assert_eq!(p["isolation"], "process", "{p}");
        assert_eq!(p["process"]["protocol"], "dynplug", "{p}");
        assert!(p["process"]["rss_bytes"].as_u64().unwrap() > 0, "{p}");
        pids.push(p["process"]["pid"].as_u64().unwrap() as u32);
    }
    let metrics = support::http_get(&addr, "/metrics");
    for part in [
        r#"isolation="process""#,
        r#"dynplug_process_up{plugin="hello"} 1"#,
        r#"dynplug_process_restarts_total{plugin="counter"} 0"#,
        r#"dynplug_process_pid{plugin="hello"} "#,
        r#"dynplug_process_resident_bytes{plugin="counter"} "#,
    ] {
        assert!(metrics.contains(part), "{part} not in {metrics}");
    }
    for pid in &pids {
        assert!(alive(*pid));
    }
    kill(host.0.id(), 9);
    let killed = Instant::now();
    let _ = host.0.wait();
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "runners outlived their host by a second: {:?}",
            pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
