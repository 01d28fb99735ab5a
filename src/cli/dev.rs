//! `dynplug dev [CRATE]`: build the plugin crate, serve it like `serve`,
//! and on every saved change rebuild it and hot-upgrade it in place. A
//! build that fails is shown, and the last good version keeps serving.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dynplug::PluginManager;
use dynplug::serve::{Endpoint, Server};
use notify::Watcher as _;

use super::plugin_crate::PluginCrate;

/// How long the crate must be quiet after a change before a rebuild
/// (an editor's save is often a write, a rename and a chmod).
const QUIET: Duration = Duration::from_millis(100);

pub(crate) struct DevArgs {
    pub(crate) krate: PathBuf,
    pub(crate) http: std::net::SocketAddr,
    pub(crate) grpc: std::net::SocketAddr,
    pub(crate) release: bool,
    pub(crate) verbose: bool,
}

// As in serve.rs: a closed stdout must not stop the loop.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<std::process::ExitCode> {
    let krate = PluginCrate::open(&args.krate)?;
    let name = krate.manifest()?.name;
    let target = target_dir(&krate);
    let plugins = target.join("dynplug-dev").join(&name);
    std::fs::create_dir_all(&plugins).with_context(|| format!("creating {}", plugins.display()))?;
    let manager = PluginManager::new(&plugins)?;

    let terminated = super::serve::terminated()?;
    let (changes_tx, changes) = mpsc::channel();
    // Watch before the first build: a save during it is a change to build.
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = changes_tx.send(event);
        }
    })?;
    watcher.watch(&krate.dir, notify::RecursiveMode::Recursive)?;

    let builder = Rebuilder {
        krate,
        manager: manager.clone(),
        plugins,
        release: args.release,
    };
    let first = {
        let builder = builder.clone();
        tokio::task::spawn_blocking(move || builder.rebuild()).await?
    };
    if !first {
        say!("dynplug dev: no version to serve yet; fix the build and save");
    }
    let running = Server::new(manager.clone())
        .log_calls(args.verbose)
        .http(args.http)
        .grpc(args.grpc)
        .start()
        .await?;
    for endpoint in running.http_endpoints() {
        if let Endpoint::Tcp(addr) = endpoint {
            say!("HTTP  http://{addr}/  (management: http://{addr}/_dynplug/)");
        }
    }
    for endpoint in running.grpc_endpoints() {
        say!("gRPC  {endpoint}");
    }
    say!(
        "watching {} for changes: save to rebuild and upgrade {name}",
        builder.krate.dir.display()
    );
    let ignored = target_dir(&builder.krate);
    std::thread::Builder::new()
        .name("dynplug-dev".into())
        .spawn(move || {
            while let Some(()) = next_change(&changes, &builder.krate.dir, &ignored) {
                builder.rebuild();
            }
        })?;
    terminated.await;
    drop(watcher);
    running.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Clone)]
struct Rebuilder {
    krate: PluginCrate,
    manager: PluginManager,
    plugins: PathBuf,
    release: bool,
}

impl Rebuilder {
    /// Builds, stages and loads the crate; `false` when the build failed
    /// (the serving version, if any, stays).
    fn rebuild(&self) -> bool {
        let started = Instant::now();
        say!("building {}", self.krate.dir.display());
        let library = match self.krate.build(self.release, false) {
            Ok(library) => library,
            Err(failed) => {
                say!(
                    "build failed; still serving the last good version:\n{}",
                    failed.0
                );
                return false;
            }
        };
        let built = started.elapsed();
        let loaded = self.krate.stage(&library, &self.plugins).and_then(|dir| {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok(self.manager.load_plugin(&name)?)
        });
        match loaded {
            Ok(manifest) => {
                say!(
                    "reloaded {} {} (built in {} ms, serving after {} ms)",
                    manifest.name,
                    manifest.version,
                    built.as_millis(),
                    started.elapsed().as_millis()
                );
                true
            }
            Err(e) => {
                say!("load failed; still serving the last good version: {e:#}");
                false
            }
        }
    }
}

/// Waits for a change to the crate's sources (not its target directory,
/// not dot files), then for `QUIET`; `None` once the watcher is gone.
fn next_change(changes: &mpsc::Receiver<notify::Event>, root: &Path, ignored: &Path) -> Option<()> {
    let relevant = |event: &notify::Event| {
        !matches!(event.kind, notify::EventKind::Access(_))
            && event.paths.iter().any(|path| {
                let inside = path.strip_prefix(root).unwrap_or(path);
                !path.starts_with(ignored)
                    && !inside.starts_with("target")
                    && !inside
                        .components()
                        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            })
    };
    loop {
        if relevant(&changes.recv().ok()?) {
            break;
        }
    }
    // Drain until the crate has been quiet for a while.
    loop {
        match changes.recv_timeout(QUIET) {
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => return Some(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// The crate's target directory (`$CARGO_TARGET_DIR`, else `target/`).
fn target_dir(krate: &PluginCrate) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                krate.dir.join(dir)
            }
        })
        .unwrap_or_else(|| krate.dir.join("target"))
}
