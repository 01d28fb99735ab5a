//! Test helpers: build the sample plugins once, install them into temporary
//! plugin directories.
#![allow(dead_code)]

pub mod http;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use dynplug::Event;

/// A manager over a fresh directory holding `samples` (not loaded yet).
pub fn manager_with(samples: &[&str]) -> (tempfile::TempDir, dynplug::PluginManager) {
    let dir = tempfile::tempdir().unwrap();
    for sample in samples {
        install(dir.path(), sample);
    }
    let manager = dynplug::PluginManager::new(dir.path()).unwrap();
    (dir, manager)
}

/// A temporary directory only we can enter (mode 0700), as dynplug wants
/// the directories of its Unix sockets (tempfile's follow the umask).
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// One blocking call to `plugin`.
pub fn call(
    manager: &dynplug::PluginManager,
    plugin: &str,
    ctx: &mut dynplug::Context,
) -> Result<(), dynplug::Error> {
    let (_, executor) = manager.get_plugin(plugin)?;
    executor.execute(ctx)
}

pub const SAMPLES: &[&str] = &[
    "hello",
    "counter",
    "panicking",
    "failing-init",
    "slow",
    "wrong-abi",
    "pinned",
    "thread-name",
    "tls-drop",
    "crashing",
];

/// The exec plugin samples (programs, not libraries).
pub const EXEC_SAMPLES: &[&str] = &["exec-rest", "exec-grpc"];

/// The registry plugin sample (a program that registers itself).
pub const REGISTRY_SAMPLES: &[&str] = &["connection"];

/// The workspace root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds every sample plugin once per test binary (in the profile of the
/// binary itself: debug for tests, release for benches) and returns the
/// directory holding the libraries.
pub fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = !cfg!(debug_assertions);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root()).args(["build", "--quiet"]);
        if release {
            cmd.arg("--release");
        }
        for name in SAMPLES.iter().chain(EXEC_SAMPLES).chain(REGISTRY_SAMPLES) {
            cmd.args(["-p", name]);
        }
        let status = cmd
            .status()
            .expect("running cargo build for the sample plugins");
        assert!(status.success(), "building the sample plugins failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root().join("target"), PathBuf::from);
        target.join(if release { "release" } else { "debug" })
    })
}

/// The `dynplug` binary: the runner of plugins with `isolation: "process"`.
pub fn runner() -> PathBuf {
    // Cargo sets it for tests and benches, not for examples, which find
    // the binary where cargo puts it.
    option_env!("CARGO_BIN_EXE_dynplug").map_or_else(|| built().join("dynplug"), PathBuf::from)
}

/// The `panic-abort` fixture (`tests/fixtures/panic-abort`, a workspace of
/// its own: built with `panic = "abort"`), built once per test binary.
pub fn panic_abort_library() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = !cfg!(debug_assertions);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root().join("target"), PathBuf::from)
            .join("panic-abort");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root().join("tests/fixtures/panic-abort"))
            .args(["build", "--quiet", "--offline", "--target-dir"])
            .arg(&target);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for panic-abort");
        assert!(status.success(), "building the panic-abort fixture failed");
        let file = format!("libpanic_abort.{}", std::env::consts::DLL_EXTENSION);
        target
            .join(if release { "release" } else { "debug" })
            .join(file)
    })
}

/// The built library of a sample, e.g. `libfailing_init.so`.
pub fn library(sample: &str) -> PathBuf {
    let file = format!(
        "lib{}.{}",
        sample.replace('-', "_"),
        std::env::consts::DLL_EXTENSION
    );
    built().join(file)
}

/// Installs an exec sample as `<base>/<name>` with its own manifest, or
/// `manifest` (whose `name` must be `name`); returns the plugin directory.
pub fn install_exec(base: &Path, sample: &str, name: &str, manifest: Option<&str>) -> PathBuf {
    let staging = base.join(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(built().join(sample), staging.join(sample)).unwrap();
    let text = match manifest {
        Some(text) => text.to_owned(),
        None => std::fs::read_to_string(
            root()
                .join("sample-plugins")
                .join(sample)
                .join("plugin.json"),
        )
        .unwrap(),
    };
    std::fs::write(staging.join("plugin.json"), text).unwrap();
    replace_dir(&staging, &base.join(name));
    base.join(name)
}

/// Installs a sample as `<base>/<sample>` and returns the plugin directory.
pub fn install(base: &Path, sample: &str) -> PathBuf {
    install_as(base, sample, sample, None)
}

/// Installs a sample under another directory name, optionally with another
/// manifest (the manifest's `name` must match `name` for it to load).
pub fn install_as(base: &Path, sample: &str, name: &str, manifest: Option<&str>) -> PathBuf {
    let staging = base.join(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    let lib = library(sample);
    std::fs::copy(&lib, staging.join(lib.file_name().unwrap())).unwrap();
    match manifest {
        Some(text) => std::fs::write(staging.join("plugin.json"), text).unwrap(),
        None => {
            let sample_manifest = root()
                .join("sample-plugins")
                .join(sample)
                .join("plugin.json");
            std::fs::copy(sample_manifest, staging.join("plugin.json")).unwrap();
        }
    }
    replace_dir(&staging, &base.join(name));
    base.join(name)
}

/// Cuts the library of the plugin directory `dir` (a copy of `sample`) to
/// its first 16 KiB: a truncated library, cut inside its loadable segments
/// (a debug build keeps megabytes of debug info at the end, which dlopen
/// never reads).
pub fn truncate_library(dir: &Path, sample: &str) {
    let lib = dir.join(library(sample).file_name().unwrap());
    let bytes = std::fs::read(&lib).unwrap();
    std::fs::write(&lib, &bytes[..16 * 1024]).unwrap();
}

/// `hello` installed as `name` with its library cut short (see
/// [`truncate_library`]).
pub fn install_truncated(base: &Path, name: &str) -> PathBuf {
    let dir = install_as(
        base,
        "hello",
        name,
        Some(&manifest(name, "hello", "1.0.0", "")),
    );
    truncate_library(&dir, "hello");
    dir
}

/// A multi-threaded tokio runtime of two workers with every driver.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `check` holds, failing after [`PATIENCE`] with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Moves `staging` to `dest` the way an operator should: the old directory is
/// renamed away (to a dot name, which dynplug ignores) and the new one renamed
/// in right after, so a watcher sees one change.
pub fn replace_dir(staging: &Path, dest: &Path) {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let old = dest.with_file_name(format!(".{name}.old-{seq}"));
    let had_old = std::fs::rename(dest, &old).is_ok();
    std::fs::rename(staging, dest).unwrap();
    if had_old {
        std::fs::remove_dir_all(&old).unwrap();
    }
}

/// A manifest for a sample library with the given fields spliced in.
pub fn manifest(name: &str, sample: &str, version: &str, extra: &str) -> String {
    let lib = sample.replace('-', "_");
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        r#"{{"name": "{name}", "version": "{version}", "source": {{"mode": "local_so", "path": "lib{lib}"}}{extra}}}"#
    )
}

/// The mappings of this process that hold plugin code loaded from under
/// `dir`: memfd images are named `/memfd:dynplug:<plugin dir>`, private copies
/// live in `<dir>/.dynplug/shadow`.
pub fn mapped_under(dir: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let needle = dir.to_string_lossy().into_owned();
    let memfd = format!("/memfd:dynplug:{needle}");
    let mut hits: Vec<String> = maps
        .lines()
        // The path is everything from the first `/` (it may contain spaces);
        // the inode tells images of the same directory apart.
        .filter_map(|l| {
            let path = l[l.find('/')?..].trim_end_matches(" (deleted)");
            let inode = l.split_ascii_whitespace().nth(4)?;
            Some((path, inode))
        })
        .filter(|(p, _)| p.starts_with(&needle) || p.starts_with(&memfd))
        .map(|(p, inode)| format!("{p} (inode {inode})"))
        .collect();
    hits.dedup();
    hits
}

/// How long a test waits for a state before failing (generous: the suite
/// must pass with both cores busy).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Waits for the first event matching `pred`, failing after [`PATIENCE`].
pub fn wait_for_event(
    events: &mut dynplug::Events,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match events.try_recv() {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("event stream: {e}"),
        }
    }
}

/// A child process killed (and reaped) when the guard drops, so a failing
/// test never leaves it running.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of a child's output (`child.stdout.take()`), as they come,
/// read on a thread of their own.
pub fn lines_of(output: impl std::io::Read + Send + 'static) -> Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line matching `pred`, failing after [`PATIENCE`] or when the
/// output ends.
pub fn wait_for_line(lines: &Receiver<String>, pred: impl Fn(&String) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(_) => {}
            Err(e) => panic!("no matching line: {e}"),
        }
    }
}

/// For a test to run in a process where dynplug does not track plugin
/// threads (`DYNPLUG_THREAD_TRACKING=off`, decided once per process): in
/// the test binary's own process this runs the test `name` again in a
/// child with the switch, asserts that it passed, and returns `false`; in
/// the child it returns `true` (go on with the test).
pub fn without_thread_tracking(name: &str) -> bool {
    if std::env::var_os("DYNPLUG_THREAD_TRACKING").is_some_and(|v| v == "off") {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("DYNPLUG_THREAD_TRACKING", "off")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
    false
}

/// One HTTP/1.1 GET over TCP (a fresh connection), the whole response as
/// text; the read waits at most `PATIENCE`.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
