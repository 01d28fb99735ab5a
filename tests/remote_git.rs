//! `source.mode = "remote_git"`, through the binary: a repository made
//! here is cloned, built and loaded; its build is found in the cache with
//! the repository gone; a moved branch is built again; a build that fails
//! says why with the compiler's last lines.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn target() -> PathBuf {
    support::built().parent().unwrap().join("authoring")
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

fn git(repo: &Path, args: &[&str]) {
    run(Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(repo));
}

/// `dynplug call` of the plugin `built`, building into `cache`.
fn call(plugins: &Path, cache: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dynplug"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DYNPLUG_") {
            command.env_remove(key);
        }
    }
    command
        .env("CARGO_TARGET_DIR", target())
        .env("CARGO_NET_OFFLINE", "true")
        .args(["call", "--plugins"])
        .arg(plugins)
        .arg("--build-cache")
        .arg(cache)
        .args(["built", "--label", "fromsource.hello", "--set", "name=Ada"])
        .output()
        .unwrap()
}

fn greeting(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let values: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    values["greeting"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn built_from_git_cached_rebuilt_on_a_moved_branch_and_failing_clearly() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("fromsource");
    run(Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args(["new", "fromsource", "--path"])
        .arg(work.path()));
    std::fs::copy(support::root().join("Cargo.lock"), repo.join("Cargo.lock")).unwrap();
    git(&repo, &["init", "--quiet", "--initial-branch", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "first"]);

    // A plugin directory whose manifest points at the repository.
    let plugins = work.path().join("plugins");
    std::fs::create_dir_all(plugins.join("built")).unwrap();
    std::fs::write(
        plugins.join("built/plugin.json"),
        format!(
            r#"{{"name": "built", "version": "1.0.0",
                "source": {{"mode": "remote_git", "path": "{}", "rev": "main", "package": "fromsource"}}}}"#,
            repo.display()
        ),
    )
    .unwrap();
    let cache = work.path().join("cache");
    assert_eq!(greeting(&call(&plugins, &cache)), "hello, Ada");

    // The repository is gone: the mirror and the build are in the cache.
    let away = work.path().join("away");
    std::fs::rename(&repo, &away).unwrap();
    let out = call(&plugins, &cache);
    assert_eq!(greeting(&out), "hello, Ada");
    std::fs::rename(&away, &repo).unwrap();

    // The branch moves: the next load builds the new commit.
    let lib = repo.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, source.replace("\"hello,", "\"moved,")).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "moved"]);
    assert_eq!(greeting(&call(&plugins, &cache)), "moved, Ada");
    idle_unloads_leave_it_loaded(&plugins, &cache);

    // A commit that does not compile: the error has the compiler's words.
    std::fs::write(&lib, format!("{source}\nfn broken( {{\n")).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "broken"]);
    let out = call(&plugins, &cache);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "built: building from {}: cargo build --release -p fromsource failed at",
            repo.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("error"), "the compiler's lines: {stderr}");
    let builds = std::fs::read_dir(
        cache
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("builds"),
    )
    .unwrap()
    .count();
    assert_eq!(builds, 2, "one kept build per commit that compiled");
}

/// With idle unloads on, a plugin built from git stays loaded (registering
/// it again would fetch, and maybe build): `counter` beside it is unloaded
/// three times meanwhile. Its build is in `cache`, so no cargo runs here.
fn idle_unloads_leave_it_loaded(plugins: &Path, cache: &Path) {
    use dynplug::{Context, PluginState};
    support::install(plugins, "counter");
    let manager = dynplug::PluginManager::builder(plugins)
        .build_cache(cache)
        .unload_idle_after(std::time::Duration::from_millis(20))
        .build()
        .unwrap();
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut ctx = Context::new("fromsource.hello").with("name", "Ada");
    support::call(&manager, "built", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("moved, Ada"));
    for _ in 0..3 {
        let unloads = manager.info("counter").unwrap().unloads;
        support::call(&manager, "counter", &mut Context::new("counter.incr")).unwrap();
        support::eventually("counter to be unloaded when idle", || {
            manager.info("counter").unwrap().unloads > unloads
        });
    }
    let built = manager.info("built").unwrap();
    assert_eq!((built.state, built.unloads), (PluginState::Loaded, 0));
    drop(manager);
    std::fs::remove_dir_all(plugins.join("counter")).unwrap();
}

/// A build that takes too long is killed at the build timeout, and it
/// never holds up another plugin: `hello` loads and serves meanwhile.
#[test]
fn a_slow_build_times_out_without_holding_up_other_plugins() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("sleepy");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(
        repo.join("Cargo.toml"),
        "[package]\nname = \"sleepy\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("build.rs"),
        "fn main() { std::thread::sleep(std::time::Duration::from_secs(120)); }\n",
    )
    .unwrap();
    std::fs::write(repo.join("src/lib.rs"), "").unwrap();
    git(&repo, &["init", "--quiet", "--initial-branch", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "slow"]);

    let plugins = work.path().join("plugins");
    std::fs::create_dir_all(plugins.join("sleepy")).unwrap();
    std::fs::write(
        plugins.join("sleepy/plugin.json"),
        format!(
            r#"{{"name": "sleepy", "version": "1.0.0", "source": {{"mode": "remote_git", "path": "{}"}}}}"#,
            repo.display()
        ),
    )
    .unwrap();
    support::install(&plugins, "hello");
    let manager = dynplug::PluginManager::builder(&plugins)
        .build_cache(work.path().join("cache"))
        .build_timeout(std::time::Duration::from_secs(4))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    let _watcher = manager.watch().unwrap();

    support::wait_for_event(
        &mut events,
        "hello loaded",
        |e| matches!(e, dynplug::Event::Loaded { plugin, .. } if plugin == "hello"),
    );
    let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
    support::call(&manager, "hello", &mut ctx).unwrap();
    assert!(
        manager.info("sleepy").is_none_or(|i| i.error.is_none()),
        "hello served while sleepy was still building"
    );
    let failed = support::wait_for_event(
        &mut events,
        "sleepy failed",
        |e| matches!(e, dynplug::Event::Failed { plugin, .. } if plugin == "sleepy"),
    );
    let dynplug::Event::Failed { error, .. } = failed else {
        unreachable!()
    };
    assert!(
        error.contains("did not finish within 4s (the build timeout); killed"),
        "{error}"
    );
}
