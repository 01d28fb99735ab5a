//! The `dynplug` binary, run as a user would.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The binary, with none of the caller's `DYNPLUG_*` settings.
fn dynplug(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dynplug"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DYNPLUG_") {
            command.env_remove(key);
        }
    }
    command.args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the command failed with exit code 1 and a message containing `needle`.
fn fails_with(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

fn plugins() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sample in ["hello", "counter", "wrong-abi"] {
        support::install(dir.path(), sample);
    }
    dir
}

#[test]
fn list_shows_every_plugin_with_state_and_error() {
    let dir = plugins();
    let out = dynplug(&["list", "--plugins", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{stdout}");
    assert!(
        lines.iter().any(|l| l.starts_with("hello")
            && l.contains("1.0.0")
            && l.contains("pooled")
            && l.contains("loaded")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("wrong-abi")
            && l.contains("failed")
            && l.contains("built against plugin-abi 0.0.9")),
        "{stdout}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args(["list", "--json"])
        .env("DYNPLUG_PLUGINS_DIR", dir.path())
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows.as_array().unwrap().len(),
        3,
        "the environment variable names the directory"
    );
}

#[test]
fn load_on_first_call_lists_plugins_deferred_and_loads_the_one_called() {
    let dir = plugins();
    let base = dir.path().to_str().unwrap();
    let out = dynplug(&["list", "--plugins", base, "--load-on-first-call"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for plugin in ["hello", "counter"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(plugin) && l.contains("deferred")),
            "{stdout}"
        );
    }
    // The header is read at registration: another ABI fails there.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("wrong-abi") && l.contains("failed")),
        "{stdout}"
    );
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "--load-on-first-call",
        "hello",
        "--label",
        "hello.get",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "--load-on-first-call",
        "wrong-abi",
        "--label",
        "x",
    ]);
    fails_with(&out, "built against plugin-abi 0.0.9");
}

#[test]
fn call_prints_values_as_json_and_fails_with_one_line() {
    let dir = plugins();
    let base = dir.path().to_str().unwrap();
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "hello",
        "--label",
        "hello.get",
        "--set",
        "name=Ada",
        "--set",
        "n=5",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        values,
        serde_json::json!({"greeting": "hello, Ada", "n": 5, "name": "Ada"})
    );

    let out = dynplug(&["call", "--plugins", base, "hello", "--label", "nope"]);
    fails_with(&out, "unknown label nope");
    assert_eq!(text(&out.stderr).lines().count(), 1, "one line");

    // The manager's options are accepted by every command that loads plugins.
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "--pool-size",
        "1",
        "--queue-limit",
        "8",
        "--drain-timeout",
        "2s",
        "hello",
        "--label",
        "hello.get",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A flag wins over the configuration file; a mistake in the file is named.
    let config = dir.path().join(".dynplug.toml");
    std::fs::write(&config, "plugins = \"/nonexistent\"\npool_size = 2\n").unwrap();
    let config = config.to_str().unwrap();
    let out = dynplug(&["list", "--json", "--config", config, "--plugins", base]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = dynplug(&["list", "--config", config]);
    fails_with(&out, "/nonexistent");
    std::fs::write(dir.path().join(".dynplug.toml"), "pool_sise = 2\n").unwrap();
    let out = dynplug(&["list", "--config", config, "--plugins", base]);
    fails_with(&out, "line 1, column 1: unknown field `pool_sise`");
    assert_eq!(text(&out.stderr).lines().count(), 1, "one line");

    let out = dynplug(&["serve", "--plugins", base, "--management-token", ""]);
    fails_with(&out, "the management token is empty");

    let out = dynplug(&["list", "--plugins", base, "--drain-timeout", "soon"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--drain-timeout"),
        "{}",
        text(&out.stderr)
    );

    let out = dynplug(&["call", "--plugins", base, "wrong-abi", "--label", "x"]);
    fails_with(&out, "built against plugin-abi 0.0.9");

    let out = dynplug(&["call", "--plugins", base, "nope", "--label", "x"]);
    fails_with(&out, "nope: no such plugin");
}

#[test]
fn call_honours_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    support::install(dir.path(), "slow");
    let out = dynplug(&[
        "call",
        "--plugins",
        dir.path().to_str().unwrap(),
        "slow",
        "--label",
        "spin",
        "--timeout",
        "150ms",
    ]);
    fails_with(&out, "deadline exceeded");
}

#[test]
fn verify_checks_without_running() {
    let dir = plugins();
    let out = dynplug(&["verify", dir.path().join("counter").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ok: counter 1.0.0 (local_so, pooled"),
        "{}",
        text(&out.stdout)
    );

    // `verify .` from inside the plugin directory.
    let out = Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args(["verify", "."])
        .current_dir(dir.path().join("hello"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = dynplug(&["verify", dir.path().join("wrong-abi").to_str().unwrap()]);
    fails_with(&out, "this host needs plugin-abi");
}

/// `dynplug serve` on an ephemeral port, configured by a file: prints where
/// it listens, serves, and exits cleanly on SIGTERM.
#[test]
fn serve_prints_its_address_serves_and_stops_on_sigterm() {
    let dir = plugins();
    let slow = support::manifest(
        "slow",
        "slow",
        "0.1.0",
        r#""isolation": "pooled", "http_services": {"routes": [{"route": "/api/slow", "method": "GET", "label": "spin", "timeout_ms": 60000}]}"#,
    );
    support::install_as(dir.path(), "slow", "slow", Some(&slow));
    // In the plugins directory (dot files are not plugins): `plugins = "."`
    // is relative to the file.
    let config = dir.path().join(".dynplug.toml");
    std::fs::write(
        &config,
        "plugins = \".\"\npool_size = 3\n[serve]\nhttp = [\"127.0.0.1:0\"]\ngrpc = [\"127.0.0.1:0\"]\nwatch = true\n",
    )
    .unwrap();
    // Killed on drop: a failing assertion never leaves the server running.
    let mut child = support::ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_dynplug"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("DYNPLUG_MANAGEMENT_TOKEN", "t0ken")
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();

    let get = |path: &str, headers: &str| {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let response = get("/api/hello/cli", "");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(r#"{"greeting":"hello, cli"}"#),
        "{response}"
    );
    // The token from the environment guards the management API.
    let response = get("/_dynplug/plugins", "");
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    let response = get("/_dynplug/plugins", "authorization: Bearer t0ken\r\n");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The file's `pool_size` reached the manager: a pooled version runs at
    // most three calls at once. Workers start with calls: hold four calls of
    // a pooled `slow` (one each connection) and count its threads. A thread
    // names itself once it runs: wait for the names.
    let threads_named = |prefix: &str| {
        std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    };
    let started = |i: usize| dir.path().join(format!(".slow-started-{i}"));
    let held: Vec<std::net::TcpStream> = (0..4)
        .map(|i| {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            let request = format!(
                "GET /api/slow?max_ms=60000&started_file={} HTTP/1.1\r\nhost: localhost\r\n\r\n",
                started(i).display()
            );
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    let deadline = std::time::Instant::now() + support::PATIENCE;
    let running = || (0..4).filter(|&i| started(i).exists()).count();
    while (running() < 3 || threads_named("dynplug-slow") < 3)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(running(), 3, "three calls run, the fourth waits");
    assert_eq!(
        threads_named("dynplug-slow"),
        3,
        "worker threads of the pooled slow"
    );
    // Closing the connections cancels the calls.
    drop(held);

    // As an operator would.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.0.wait().unwrap();
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(
        stderr.contains("unloaded"),
        "plugins were unloaded: {stderr}"
    );
}

/// The code blocks of the plugin-writing guide (`docs/writing-plugins.md`),
/// built as a third-party crate outside the workspace, loaded and called by
/// the CLI.
#[test]
fn third_party_plugin_written_from_the_guide() {
    let readme = std::fs::read_to_string(support::root().join("docs/writing-plugins.md")).unwrap();
    let block = |fence: &str, marker: &str| -> String {
        readme
            .split(&format!("```{fence}\n"))
            .skip(1)
            .filter_map(|rest| rest.split("\n```").next())
            .find(|code| code.contains(marker))
            .unwrap_or_else(|| panic!("the guide has no ```{fence} block with {marker}"))
            .to_owned()
    };
    let cargo_toml = block("toml", r#"crate-type = ["cdylib"]"#).replace(
        r#"path = "../dynplug/plugin-abi""#,
        &format!("path = {:?}", support::root().join("plugin-abi")),
    );
    // The guide's unit test goes in the same file, as it would in a crate.
    let lib_rs = format!(
        "{}\n{}",
        block("rust", "export_plugin!(plugin = MyPlugin)"),
        block("rust", "TestContext::new")
    );
    let manifest = block("json", r#""name": "myplugin""#);

    let work = tempfile::tempdir().unwrap();
    let krate = work.path().join("myplugin");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(krate.join("Cargo.toml"), cargo_toml).unwrap();
    std::fs::write(krate.join("src/lib.rs"), lib_rs).unwrap();
    // Same dependency versions as the workspace: no registry lookups needed.
    std::fs::copy(support::root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    let target = support::built().parent().unwrap().join("third-party");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "the guide's plugin crate builds");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["test", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "the guide's unit test passes");

    let plugins = work.path().join("plugins");
    let dir = plugins.join("myplugin");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = format!("libmyplugin.{}", std::env::consts::DLL_EXTENSION);
    std::fs::copy(target.join("debug").join(&lib), dir.join(&lib)).unwrap();
    std::fs::write(dir.join("plugin.json"), manifest).unwrap();

    let out = dynplug(&["verify", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let base = plugins.to_str().unwrap();
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "myplugin",
        "--label",
        "myplugin.greet",
        "--set",
        "name=Ada",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        values["greeting"], "hi, Ada",
        "init read the manifest's config"
    );
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "myplugin",
        "--label",
        "myplugin.sum",
        "--set",
        "numbers=[1,2,3]",
    ]);
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(values["sum"], 6);
    let out = dynplug(&[
        "call",
        "--plugins",
        base,
        "myplugin",
        "--label",
        "myplugin.wait",
        "--timeout",
        "100ms",
    ]);
    fails_with(&out, "deadline exceeded");
}
