//! The `dynplug` binary, run as a user would.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn dynplug(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args(args)
        .env_remove("DYNPLUG_PLUGINS_DIR")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown label nope"), "{stderr}");

    let out = dynplug(&["call", "--plugins", base, "wrong-abi", "--label", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("built against plugin-abi 0.0.9"),
        "{}",
        text(&out.stderr)
    );

    let out = dynplug(&["call", "--plugins", base, "nope", "--label", "x"]);
    assert!(
        text(&out.stderr).contains("nope: no such plugin"),
        "{}",
        text(&out.stderr)
    );
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
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("deadline exceeded"),
        "{}",
        text(&out.stderr)
    );
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
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("this host needs plugin-abi"),
        "{}",
        text(&out.stderr)
    );
}

/// `dynplug serve` on an ephemeral port: prints where it listens, serves,
/// and exits cleanly on SIGTERM.
#[test]
fn serve_prints_its_address_serves_and_stops_on_sigterm() {
    let dir = plugins();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args([
            "serve",
            "--plugins",
            dir.path().to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--watch",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();

    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /api/hello/cli HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(r#"{"greeting":"hello, cli"}"#),
        "{response}"
    );

    // As an operator would.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
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
