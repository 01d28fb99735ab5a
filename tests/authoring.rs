//! The author's path, end to end with real builds: `dynplug new` → build →
//! `pack` → drop → call; `dynplug dev` serving each saved edit; `install`
//! from a loopback HTTP server and from a git repository made here; a
//! `.plg` upload to the management API.
//!
//! Generated crates build offline (the workspace's `Cargo.lock` is copied
//! in, `CARGO_NET_OFFLINE` is set) into one target directory under the
//! workspace's, shared by every test here.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::ChildGuard;

/// How long a test waits for a cargo build (both cores may be busy).
const BUILD_PATIENCE: Duration = Duration::from_secs(600);

fn target() -> PathBuf {
    support::built().parent().unwrap().join("authoring")
}

/// The binary, with none of the caller's `DYNPLUG_*` settings, building
/// offline into the shared target directory.
fn dynplug() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dynplug"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DYNPLUG_") {
            command.env_remove(key);
        }
    }
    command
        .env("CARGO_TARGET_DIR", target())
        .env("CARGO_NET_OFFLINE", "true");
    command
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `dynplug new NAME` in `parent`, with the workspace's lock file.
fn new_crate(parent: &Path, name: &str) -> PathBuf {
    run(dynplug().args(["new", name, "--path"]).arg(parent));
    let krate = parent.join(name);
    std::fs::copy(support::root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    krate
}

/// `dynplug serve` on ephemeral ports; its HTTP address.
fn serve(plugins: &Path, extra: &[&str]) -> (ChildGuard, String) {
    let mut child = ChildGuard(
        dynplug()
            .args([
                "serve",
                "--watch",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
            ])
            .arg("--plugins")
            .arg(plugins)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = support::lines_of(child.0.stdout.take().unwrap());
    let line = support::wait_for_line(&lines, |l| l.starts_with("HTTP"));
    (child, address(&line))
}

fn address(line: &str) -> String {
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

/// One HTTP/1.1 request; the status code and the body.
fn request(addr: &str, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A refusal (401) may close the connection before the body is read.
    let _ = stream.write_all(body);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// Polls `GET path` until its body contains `want`; how long that took.
fn wait_for_body(addr: &str, path: &str, want: &str, patience: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = request(addr, "GET", path, "", b"");
        if status == 200 && body.contains(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < patience,
            "GET {path} never said {want}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn new_then_build_pack_drop_and_call() {
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let (_server, addr) = serve(&plugins, &[]);

    let started = Instant::now();
    let krate = new_crate(work.path(), "greeter");
    // The generated unit test runs `execute` through plugin_abi::TestContext.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = run(Command::new(cargo)
        .args(["test", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", target())
        .env("CARGO_NET_OFFLINE", "true"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 passed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run(dynplug()
        .arg("pack")
        .arg(&krate)
        .arg("--out")
        .arg(work.path()));
    let package = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(package, work.path().join("greeter-0.1.0.plg"));
    let out = run(dynplug().arg("verify").arg(&package));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: greeter 0.1.0 (local_so, auto"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Dropped in as an operator should: a dot name, then a rename.
    let staging = plugins.join(".greeter.plg.tmp");
    std::fs::copy(&package, &staging).unwrap();
    std::fs::rename(&staging, plugins.join("greeter-0.1.0.plg")).unwrap();
    wait_for_body(
        &addr,
        "/api/greeter/Ada",
        r#"{"greeting":"hello, Ada"}"#,
        support::PATIENCE,
    );
    eprintln!("new → first successful call: {:?}", started.elapsed());
}

#[test]
fn dev_serves_each_saved_edit_and_keeps_the_last_good_version() {
    let work = tempfile::tempdir().unwrap();
    let krate = new_crate(work.path(), "devloop");
    let mut child = ChildGuard(
        dynplug()
            .arg("dev")
            .arg(&krate)
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = support::lines_of(child.0.stdout.take().unwrap());
    let wait_line = |what: &str| {
        let deadline = Instant::now() + BUILD_PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with(what) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line starting with {what:?}: {e}"),
            }
        }
    };
    let addr = address(&wait_line("HTTP"));
    wait_line("watching");
    wait_for_body(&addr, "/api/devloop/Ada", "hello, Ada", support::PATIENCE);

    // Each edit is saved as editors do (write elsewhere, rename over).
    let lib = krate.join("src/lib.rs");
    let save = |text: &str| {
        let tmp = krate.join("src/.lib.rs.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &lib).unwrap();
    };
    let mut source = std::fs::read_to_string(&lib).unwrap();
    let mut served = Vec::new();
    for (from, to) in [("hello", "howdy"), ("howdy", "hi"), ("hi", "hey")] {
        let before = format!("format!(\"{from}, ");
        assert!(source.contains(&before), "{before}");
        source = source.replacen(&before, &format!("format!(\"{to}, "), 1);
        save(&source);
        let word = to;
        served.push(wait_for_body(
            &addr,
            "/api/devloop/Ada",
            &format!("{word}, Ada"),
            BUILD_PATIENCE,
        ));
    }
    served.sort();
    eprintln!(
        "dev: edit → new answer served: {served:?} (p50 {:?})",
        served[1]
    );

    save(&format!("{source}\nfn broken( {{\n"));
    let failed = wait_line("build failed");
    assert!(
        failed.contains("still serving the last good version"),
        "{failed}"
    );
    let (status, body) = request(&addr, "GET", "/api/devloop/Ada", "", b"");
    assert_eq!((status, body.as_str()), (200, r#"{"greeting":"hey, Ada"}"#));
}

/// Serves `body` at `path` to the next `count` connections (404 elsewhere).
fn serve_file_once(path: &'static str, body: Vec<u8>, count: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let wanted = head.split(' ').nth(1) == Some(path);
            let (status, body) = if wanted {
                ("200 OK", &body[..])
            } else {
                ("404 Not Found", &b"no"[..])
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
    });
    addr
}

fn hello_package(out: &Path) -> PathBuf {
    let dir = out.join("hello");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = support::library("hello");
    std::fs::copy(&lib, dir.join(lib.file_name().unwrap())).unwrap();
    std::fs::copy(
        support::root().join("sample-plugins/hello/plugin.json"),
        dir.join("plugin.json"),
    )
    .unwrap();
    dynplug::package::pack(&dir, out).unwrap().path
}

#[test]
fn install_from_a_loopback_http_server_and_a_git_repository() {
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let call = |name: &str, label: &str| {
        let out = run(dynplug()
            .args(["call", "--plugins"])
            .arg(&plugins)
            .args([name, "--label", label, "--set", "name=Ada"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let bytes = std::fs::read(hello_package(work.path())).unwrap();
    let addr = serve_file_once("/dl/hello-1.0.0.plg", bytes, 2);
    let out = dynplug()
        .args([
            "install",
            &format!("http://{addr}/dl/missing.plg"),
            "--plugins",
        ])
        .arg(&plugins)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(dynplug()
        .args([
            "install",
            &format!("http://{addr}/dl/hello-1.0.0.plg"),
            "--plugins",
        ])
        .arg(&plugins));
    assert!(plugins.join("hello-1.0.0.plg").is_file());
    assert!(call("hello", "hello.get").contains("hello, Ada"));

    // A repository made here, installed by URL: cloned, built, packed.
    let repo = work.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let krate = new_crate(&repo, "fromgit");
    let git = |args: &[&str]| {
        run(Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(&krate));
    };
    git(&["init", "--quiet"]);
    git(&["add", "-A"]);
    git(&["commit", "--quiet", "-m", "a plugin"]);
    run(dynplug()
        .args([
            "install",
            &format!("git+file://{}", krate.display()),
            "--plugins",
        ])
        .arg(&plugins));
    assert!(plugins.join("fromgit-0.1.0.plg").is_file());
    assert!(call("fromgit", "fromgit.hello").contains("hello, Ada"));
    let leftovers: Vec<_> = std::fs::read_dir(&plugins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".dynplug")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_management_api_takes_a_package_upload_behind_its_token() {
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let bytes = std::fs::read(hello_package(work.path())).unwrap();

    let (_open, addr) = serve(&plugins, &[]);
    let (status, body) = request(&addr, "POST", "/_dynplug/packages", "", &bytes);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("uploading plugins needs a management token"),
        "{body}"
    );

    let guarded = work.path().join("guarded");
    std::fs::create_dir(&guarded).unwrap();
    let (_server, addr) = serve(&guarded, &["--management-token", "t0ken"]);
    let (status, _) = request(&addr, "POST", "/_dynplug/packages", "", &bytes);
    assert_eq!(status, 401);
    let token = "authorization: Bearer t0ken\r\n";
    let (status, body) = request(&addr, "POST", "/_dynplug/packages", token, b"not a package");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not a gzipped tar"), "{body}");
    let (status, body) = request(&addr, "POST", "/_dynplug/packages", token, &bytes);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""package":"hello-1.0.0.plg""#), "{body}");
    let (status, body) = request(&addr, "GET", "/api/hello/Up", "", b"");
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"greeting":"hello, Up"}"#)
    );
}

#[test]
fn every_command_has_help() {
    let out = run(dynplug().arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let commands: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for command in ["new", "dev", "pack", "keygen", "sign", "install", "verify"] {
        assert!(commands.contains(&command), "{command} in {commands:?}");
    }
    for command in commands {
        let out = run(dynplug().args([command, "--help"]));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: dynplug"), "{command}: {help}");
    }
}

/// `dynplug new --kind exec`: a program speaking goplugin's REST protocol,
/// unit-tested, packed, installed and called; it runs from the unpacked
/// package, which stays while the version serves.
#[test]
fn an_exec_plugin_crate_from_new_to_call() {
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    run(dynplug()
        .args(["new", "shouter", "--kind", "exec", "--path"])
        .arg(work.path()));
    let krate = work.path().join("shouter");
    std::fs::copy(support::root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = run(Command::new(cargo)
        .args(["test", "--quiet"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", target())
        .env("CARGO_NET_OFFLINE", "true"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 passed"));
    run(dynplug()
        .arg("pack")
        .arg(&krate)
        .arg("--out")
        .arg(work.path()));
    let package = work.path().join("shouter-0.1.0.plg");
    run(dynplug()
        .arg("install")
        .arg(&package)
        .arg("--plugins")
        .arg(&plugins));
    // A relative plugins directory, as an operator types it.
    let out = run(dynplug()
        .current_dir(work.path())
        .args(["call", "--plugins", "plugins", "shouter"])
        .args(["--label", "shouter.hello", "--set", "name=Ada"]));
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(values["greeting"], "hello, Ada");
}
