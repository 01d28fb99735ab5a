//! A sockets directory, InfraKit and Docker style: every Unix socket in it
//! is a plugin named by its file name, and a file `<name>.listen` holding
//! `tcp://host:port` names a TCP one; everything else (dot files, `.pid`
//! files, directories, other files) is skipped.
//!
//! Sockets are followed with `notify`, debounced like the plugins
//! directory: one that appears is loaded (a socket plugin made from its
//! path), one that disappears is unloaded, a `.listen` file whose address
//! changes is loaded again. A socket with nothing listening is loaded all
//! the same, `unreachable`, and retried (`keeper.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use notify::{RecursiveMode, Watcher as _};

use crate::error::{Error, Result};
use crate::manager::{Inner, PluginManager};
use crate::manifest::{Manifest, is_path_safe};
use crate::origin::Found;
use crate::untrusted::read_file;

/// The suffix of the files naming TCP plugins.
const LISTEN_SUFFIX: &str = ".listen";
/// The largest `.listen` file read.
const MAX_LISTEN_FILE: u64 = 1024;
/// Most sockets loaded at once: a socket that accepts and never answers
/// holds its load for the handshake's timeout.
const LOADERS: usize = 16;

/// Keeps a sockets directory followed; dropping it stops following. The
/// plugins found stay loaded until their sockets go or the manager
/// unloads them.
#[must_use = "the directory is followed only while the Discovery lives"]
pub struct Discovery {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// The directory followed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What an entry of the directory says: where the plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The socket, or the `.listen` file.
    file: PathBuf,
    /// `source.path` of its manifest.
    address: String,
}

/// How the finder names itself (`Found::by`, `SocketInfo::found_by`).
pub(crate) fn found_in(dir: &Path) -> String {
    format!("sockets directory {}", dir.display())
}

impl PluginManager {
    /// Loads every plugin of the sockets directory `dir` (each Unix socket,
    /// named by its file name; `<name>.listen` holding `tcp://host:port`
    /// for a TCP one), then follows it: a socket that appears is loaded,
    /// one that disappears is unloaded. They are spoken to in JSON-RPC 2.0
    /// or Docker's plugin protocol, whichever handshake they answer
    /// (`Plugin.Implements`, `Plugin.Activate`; a plugin answering neither
    /// is called in JSON-RPC). `dir` is created 0700 if missing; an
    /// existing one must be ours and private. Outcomes are
    /// [`Event`](crate::Event)s; a name the plugins directory (or another
    /// finder) already has is refused with [`Error::NameTaken`] in the log.
    ///
    /// # Errors
    /// [`Error::Insecure`] if `dir` is not ours and private, [`Error::Io`]
    /// if it cannot be read or watched.
    pub fn discover_sockets(&self, dir: impl AsRef<Path>) -> Result<Discovery> {
        let given = dir.as_ref();
        crate::private_dir::ensure(given, false).map_err(|e| Error::Insecure {
            plugin: String::new(),
            path: given.to_owned(),
            reason: e.to_string(),
        })?;
        let io = |source| Error::Io {
            plugin: String::new(),
            action: "watching sockets directory",
            path: given.to_owned(),
            source,
        };
        let dir = given.canonicalize().map_err(io)?;
        let (events_tx, events) = crossbeam_channel::unbounded();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = events_tx.send(event);
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w))
        .map_err(|e| io(std::io::Error::other(e)))?;
        let mut follower = Follower {
            manager: std::sync::Arc::downgrade(self.inner()),
            by: found_in(&dir),
            dir: dir.clone(),
            settle: self.inner().settle,
            known: BTreeMap::new(),
        };
        // Everything there now is loaded before this returns.
        follower.sync(self);
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name("dynplug-sockets".into())
            .spawn(move || {
                follower.run(&events, &stopped);
                let _ = watcher.unwatch(&follower.dir);
            })
            .map_err(io)?;
        Ok(Discovery {
            stop: Some(stop),
            thread: Some(thread),
            dir,
        })
    }
}

struct Follower {
    manager: Weak<Inner>,
    by: String,
    dir: PathBuf,
    settle: Duration,
    /// The entries loaded (or tried), by plugin name.
    known: BTreeMap<String, Entry>,
}

impl Follower {
    fn run(&mut self, events: &Receiver<notify::Result<notify::Event>>, stop: &Receiver<()>) {
        let mut due: Option<Instant> = None;
        loop {
            let wait = due.map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
            crossbeam_channel::select! {
                recv(stop) -> _ => return,
                recv(events) -> event => match event {
                    Ok(Ok(event)) if !matches!(event.kind, notify::EventKind::Access(_)) => {
                        // A new change restarts the settle time.
                        due = Some(Instant::now() + self.settle);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("sockets directory watch error: {e}"),
                    Err(_) => return,
                },
                default(wait) => {
                    if due.take().is_some() {
                        let Some(inner) = self.manager.upgrade() else { return };
                        self.sync(&PluginManager::from_inner(inner));
                    }
                }
            }
        }
    }

    /// Brings the plugins in line with the directory.
    fn sync(&mut self, manager: &PluginManager) {
        let now = scan(&self.dir);
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            if manager.unload_found(&name, &self.by).is_some() {
                tracing::info!(plugin = %name, "its socket is gone");
            }
        }
        let changed: Vec<(String, Entry)> = now
            .into_iter()
            .filter(|(name, entry)| self.known.get(name) != Some(entry))
            .collect();
        for chunk in changed.chunks(LOADERS) {
            std::thread::scope(|scope| {
                for (name, entry) in chunk {
                    scope.spawn(|| self.load(manager, name, entry));
                }
            });
        }
        self.known.extend(changed);
    }

    fn load(&self, manager: &PluginManager, name: &str, entry: &Entry) {
        let manifest = match manifest(name, entry, &self.dir) {
            Ok(manifest) => manifest,
            Err(e) => {
                tracing::warn!(plugin = %name, "{e}");
                return;
            }
        };
        let found = Found::new(
            self.by.clone(),
            entry.file.clone(),
            self.dir.clone(),
            manifest,
        );
        if let Err(e) = manager.load_found(found) {
            tracing::warn!(plugin = %name, "not loaded: {e}");
        }
    }
}

/// The manifest of a found socket: made here, checked as any other.
fn manifest(name: &str, entry: &Entry, dir: &Path) -> Result<Manifest> {
    let json = serde_json::json!({
        "name": name,
        "version": "0.0.0",
        "description": format!("found in the sockets directory {}", dir.display()),
        "source": { "mode": "socket", "path": entry.address, "protocol": "jsonrpc" },
    });
    Manifest::parse(json.to_string().as_bytes(), &entry.file, name)
}

/// The plugins the directory names now.
fn scan(dir: &Path) -> BTreeMap<String, Entry> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Not following links: a link to a socket elsewhere is skipped.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let file_type = meta.file_type();
        let (name, address) = if std::os::unix::fs::FileTypeExt::is_socket(&file_type) {
            (file_name.clone(), path.display().to_string())
        } else if let Some(name) = file_name.strip_suffix(LISTEN_SUFFIX)
            && file_type.is_file()
        {
            let text = read_file(&path, MAX_LISTEN_FILE).unwrap_or_default();
            let address = String::from_utf8_lossy(&text).trim().to_owned();
            (name.to_owned(), address)
        } else {
            tracing::debug!(entry = %file_name, "skipping: not a socket or a .listen file");
            continue;
        };
        if !is_path_safe(&name) {
            tracing::debug!(entry = %file_name, "skipping: not a plugin name");
            continue;
        }
        // A socket and a `.listen` of one name: the socket wins.
        let entry = Entry {
            file: path,
            address,
        };
        match found.get(&name) {
            Some(Entry { file, .. }) if !file.to_string_lossy().ends_with(LISTEN_SUFFIX) => {}
            _ => {
                found.insert(name, entry);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_listen_files_are_plugins_the_rest_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let _group = std::os::unix::net::UnixListener::bind(path.join("group")).unwrap();
        let _both = std::os::unix::net::UnixListener::bind(path.join("both")).unwrap();
        std::fs::write(path.join("both.listen"), "tcp://127.0.0.1:1").unwrap();
        std::fs::write(path.join("web.listen"), "tcp://127.0.0.1:8000\n").unwrap();
        std::fs::write(path.join("group.pid"), "42").unwrap();
        std::fs::write(path.join("notes.txt"), "").unwrap();
        std::fs::create_dir(path.join("sub")).unwrap();
        let _hidden = std::os::unix::net::UnixListener::bind(path.join(".hidden")).unwrap();
        std::os::unix::fs::symlink(path.join("group"), path.join("link")).unwrap();
        let found = scan(path);
        let names: Vec<&str> = found.keys().map(String::as_str).collect();
        assert_eq!(names, ["both", "group", "web"]);
        assert_eq!(found["web"].address, "tcp://127.0.0.1:8000");
        assert_eq!(found["both"].file, path.join("both"));
        let manifest = manifest("web", &found["web"], path).unwrap();
        assert_eq!(manifest.source.path(), "tcp://127.0.0.1:8000");
        let bad = Entry {
            file: path.join("bad.listen"),
            address: "http://x".into(),
        };
        let err = manifest_err(&bad, path);
        assert!(err.contains("source.path"), "{err}");
    }

    fn manifest_err(entry: &Entry, dir: &Path) -> String {
        manifest("bad", entry, dir).unwrap_err().to_string()
    }
}
