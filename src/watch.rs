//! Watching the plugins directory: plugins are loaded, upgraded and unloaded
//! as their directories appear, change and disappear.
//!
//! Events from `notify` are grouped by plugin directory and debounced: a
//! plugin is synced once nothing under its directory changed for the settle
//! time, so a file being written (or a directory replaced by two renames) is
//! seen once, complete. A load that fails in a way a partial write could
//! explain (short file, cut manifest) is retried once after a longer pause
//! before it is reported.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::error::{Error, Result};
use crate::manager::{Inner, Next, PluginManager};
use crate::origin::Origin;

/// Keeps the plugins directory watched; dropping it stops the watching.
#[must_use = "the directory is watched only while the Watcher lives"]
pub struct Watcher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    base: PathBuf,
    progress: Arc<Progress>,
}

/// How far the follower got: which settle markers it saw, and whether it
/// has nothing left to do. For [`Watcher::wait_settled`].
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    markers_seen: HashSet<String>,
    idle: bool,
}

/// Names of the marker files `wait_settled` writes (dot files: never plugins).
const MARKER_PREFIX: &str = ".dynplug-settled-";

impl Watcher {
    /// Waits until every change made to the plugins directory before this
    /// call has been handled: loaded, upgraded, unloaded, reported as failed,
    /// or found unchanged. Returns `false` if that takes longer than
    /// `timeout`, or if the directory cannot be written.
    ///
    /// It writes (and removes) a dot file in the plugins directory: events
    /// arrive in order, so once the watcher has seen it and has nothing
    /// left to do, everything before it was handled. Useful after copying
    /// plugins in a script or a test.
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{MARKER_PREFIX}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let marker = self.base.join(&name);
        if std::fs::write(&marker, b"").is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut state = self
            .progress
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let settled = loop {
            if state.idle && state.markers_seen.remove(&name) {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            state = self
                .progress
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(state);
        let _ = std::fs::remove_file(&marker);
        settled
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl PluginManager {
    /// Watches the base directory: a new plugin directory is loaded, a changed
    /// `plugin.json` or artifact upgrades the plugin (see
    /// [`load_plugin`](Self::load_plugin)), a removed directory is drained
    /// and unloaded. Directories that exist but were never loaded are loaded
    /// when the watch starts. Outcomes are reported as [`Event`](crate::Event)s.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be watched.
    pub fn watch(&self) -> Result<Watcher> {
        let base = self
            .base_dir()
            .canonicalize()
            .map_err(|source| self.watch_error(source))?;
        let (events_tx, events) = crossbeam_channel::unbounded();
        let handler = move |event: notify::Result<notify::Event>| {
            let _ = events_tx.send(event);
        };
        let mut watcher = notify::recommended_watcher(handler)
            .and_then(|mut w| w.watch(&base, RecursiveMode::Recursive).map(|()| w))
            .map_err(|e| self.watch_error(std::io::Error::other(e)))?;
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let manager = Arc::downgrade(self.inner());
        let settle = self.inner().settle;
        let progress = Arc::new(Progress::default());
        let follower = Follower::new(manager, base.clone(), settle, Arc::clone(&progress));
        let thread = std::thread::Builder::new()
            .name("dynplug-watch".into())
            .spawn(move || {
                let mut sync = follower;
                sync.initial();
                sync.run(&events, &stopped);
                let _ = watcher.unwatch(&sync.base);
            })
            .map_err(|source| self.watch_error(source))?;
        Ok(Watcher {
            stop: Some(stop),
            thread: Some(thread),
            base,
            progress,
        })
    }

    fn watch_error(&self, source: std::io::Error) -> Error {
        Error::Io {
            plugin: String::new(),
            action: "watching",
            path: self.base_dir().to_owned(),
            source,
        }
    }
}

struct Follower {
    manager: Weak<Inner>,
    base: PathBuf,
    settle: Duration,
    /// Plugin name → when to sync it, and how many attempts were made.
    due: HashMap<String, (Instant, u32)>,
    /// Plugins being synced now, each on a thread of its own: a plugin
    /// whose `init` hangs (until `init_timeout`) holds up only itself.
    running: HashSet<String>,
    done_tx: Sender<(String, Next)>,
    done: Receiver<(String, Next)>,
    progress: Arc<Progress>,
}

/// Most plugins synced at once (the initial sweep of a large directory
/// queues the rest).
const MAX_SYNCS: usize = 16;

impl Follower {
    fn new(
        manager: Weak<Inner>,
        base: PathBuf,
        settle: Duration,
        progress: Arc<Progress>,
    ) -> Follower {
        let (done_tx, done) = crossbeam_channel::unbounded();
        Follower {
            manager,
            base,
            settle,
            due: HashMap::new(),
            running: HashSet::new(),
            done_tx,
            done,
            progress,
        }
    }

    /// Tells `wait_settled` callers where things stand.
    fn report(&self, markers: Vec<String>) {
        let mut state = self
            .progress
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state.markers_seen.extend(markers);
        state.idle = self.due.is_empty() && self.running.is_empty();
        self.progress.changed.notify_all();
    }

    fn manager(&self) -> Option<PluginManager> {
        self.manager.upgrade().map(PluginManager::from_inner)
    }

    /// Queues directories that appeared before the watch started.
    fn initial(&mut self) {
        let Some(manager) = self.manager() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let new = manager
                .plugin_of_entry(&name)
                .is_some_and(|plugin| manager.slot(&plugin).is_none());
            if Origin::is_entry(&self.base, &name) && new {
                self.due.insert(name, (Instant::now(), 0));
            }
        }
    }

    fn run(&mut self, events: &Receiver<notify::Result<notify::Event>>, stop: &Receiver<()>) {
        loop {
            let now = Instant::now();
            let wait = self
                .due
                .iter()
                .filter(|(name, _)| !self.running.contains(*name))
                .map(|(_, (at, _))| at.saturating_duration_since(now))
                .min()
                .filter(|_| self.running.len() < MAX_SYNCS)
                .unwrap_or(Duration::from_secs(3600));
            let mut markers = Vec::new();
            crossbeam_channel::select! {
                recv(stop) -> _ => return,
                recv(events) -> event => match event {
                    Ok(Ok(event)) => markers = self.note(&event),
                    Ok(Err(e)) => tracing::warn!("watch error: {e}"),
                    Err(_) => return,
                },
                recv(self.done) -> done => {
                    if let Ok((name, next)) = done {
                        self.finished(name, next);
                    }
                }
                default(wait) => {}
            }
            if !self.start_ready() {
                return;
            }
            self.report(markers);
        }
    }

    /// Starts the syncs that are due, as many as allowed; `false` once the
    /// manager is gone.
    fn start_ready(&mut self) -> bool {
        let now = Instant::now();
        let ready: Vec<(String, u32)> = self
            .due
            .iter()
            .filter(|(name, (at, _))| *at <= now && !self.running.contains(*name))
            .map(|(name, (_, attempt))| (name.clone(), *attempt))
            .take(MAX_SYNCS.saturating_sub(self.running.len()))
            .collect();
        for (name, attempt) in ready {
            let Some(manager) = self.manager() else {
                return false;
            };
            self.due.remove(&name);
            self.running.insert(name.clone());
            let done = self.done_tx.clone();
            let thread_name = format!("dynplug-sync-{name}");
            let job = {
                let name = name.clone();
                move || {
                    let next = manager.sync_entry(&name, attempt);
                    let _ = done.send((name, next));
                }
            };
            if let Err(e) = std::thread::Builder::new().name(thread_name).spawn(job) {
                tracing::warn!(plugin = %name, "cannot start a thread to load it ({e}); retrying");
                self.running.remove(&name);
                self.due.insert(name, (now + self.settle, attempt));
            }
        }
        true
    }

    fn finished(&mut self, name: String, next: Next) {
        self.running.remove(&name);
        if let Next::Retry(attempt) = next
            && !self.due.contains_key(&name)
        {
            self.due
                .insert(name, (Instant::now() + self.settle * 8, attempt + 1));
        }
    }

    /// Queues the plugins `event` touches; returns the settle markers it names.
    fn note(&mut self, event: &notify::Event) -> Vec<String> {
        let markers = event
            .paths
            .iter()
            .filter(|p| p.parent() == Some(self.base.as_path()))
            .filter_map(|p| p.file_name()?.to_str())
            .filter(|name| name.starts_with(MARKER_PREFIX))
            .map(str::to_owned)
            .collect();
        if matches!(event.kind, EventKind::Access(_)) {
            return markers;
        }
        let now = Instant::now();
        let renamed_in = renamed_into(&self.base, event);
        for path in &event.paths {
            if is_stale_removal(event, path) {
                continue;
            }
            if let Some(name) = plugin_of(&self.base, path) {
                // A new change restarts the settle time and the attempts
                // (a change during a running sync syncs again after it). A
                // whole entry renamed into place is complete: it is synced
                // at once.
                let at = if renamed_in == Some(path.as_path()) {
                    now
                } else {
                    now + self.settle
                };
                self.due.insert(name, (at, 0));
            }
        }
        markers
    }
}

/// The entry of `base` an event says was renamed into it (the second
/// rename of the documented procedure, or a package's last step): complete
/// by the time the rename is seen, so it needs no settle time. Files written
/// in place, and renames inside a plugin's directory, still wait for it.
fn renamed_into<'a>(base: &Path, event: &'a notify::Event) -> Option<&'a Path> {
    use notify::event::{ModifyKind, RenameMode};
    let to = match event.kind {
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => event.paths.first()?,
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event.paths.get(1)?,
        _ => return None,
    };
    (to.parent() == Some(base)).then_some(to.as_path())
}

/// Whether `event` reports the removal of a path that exists now: the
/// watcher knows a directory by the path it had when it was first watched,
/// so deleting a plugin directory that was renamed away (the last step of
/// the documented upgrade) is reported under the entry's name, as if the new
/// version's files were removed. Such an event changes nothing under the
/// entry and must not postpone its sync. A file removed and created again
/// in place is still seen: by its creation.
fn is_stale_removal(event: &notify::Event, path: &Path) -> bool {
    matches!(event.kind, EventKind::Remove(_)) && path.symlink_metadata().is_ok()
}

/// The plugin directory name a path under `base` belongs to (dot entries excluded).
fn plugin_of(base: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(base).ok()?;
    match rel.components().next()? {
        Component::Normal(name) => {
            let name = name.to_str()?;
            (!name.starts_with('.')).then(|| name.to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_plugin_directories() {
        let base = Path::new("/p");
        assert_eq!(
            plugin_of(base, Path::new("/p/hello/libhello.so")).as_deref(),
            Some("hello")
        );
        assert_eq!(
            plugin_of(base, Path::new("/p/hello")).as_deref(),
            Some("hello")
        );
        assert_eq!(plugin_of(base, Path::new("/p/.dynplug/shadow/x.so")), None);
        assert_eq!(
            plugin_of(base, Path::new("/p/.hello.staging/plugin.json")),
            None
        );
        assert_eq!(plugin_of(base, Path::new("/p")), None);
        assert_eq!(plugin_of(base, Path::new("/q/hello")), None);
    }

    #[test]
    fn an_entry_renamed_into_place_is_synced_at_once_a_write_after_settling() {
        use notify::event::{CreateKind, DataChange, ModifyKind, RenameMode};
        let base = PathBuf::from("/p");
        let settle = Duration::from_secs(60);
        let mut follower = Follower::new(Weak::new(), base.clone(), settle, Arc::default());
        let event = |kind, paths: &[&str]| {
            let mut event = notify::Event::new(kind);
            for path in paths {
                event = event.add_path(PathBuf::from(path));
            }
            event
        };
        let due = |follower: &Follower, name: &str| follower.due[name].0;
        let now = Instant::now();

        // The second rename of the procedure: `.counter.new` → `counter`.
        let rename = ModifyKind::Name(RenameMode::Both);
        follower.note(&event(
            EventKind::Modify(rename),
            &["/p/.counter.new", "/p/counter"],
        ));
        assert!(due(&follower, "counter") < now + settle / 2, "at once");
        // The first one (`counter` → `.counter.old`) settles.
        follower.note(&event(
            EventKind::Modify(rename),
            &["/p/hello", "/p/.hello.old"],
        ));
        assert!(due(&follower, "hello") >= now + settle);
        // So do files written in place, created, or renamed inside a plugin.
        let data = ModifyKind::Data(DataChange::Content);
        follower.note(&event(EventKind::Modify(data), &["/p/a/liba.so"]));
        follower.note(&event(EventKind::Create(CreateKind::Folder), &["/p/b"]));
        let inside = ModifyKind::Name(RenameMode::To);
        follower.note(&event(EventKind::Modify(inside), &["/p/c/libc.so"]));
        for name in ["a", "b", "c"] {
            assert!(due(&follower, name) >= now + settle, "{name} settles");
        }
        // A package renamed into place, seen as a lone `To`.
        follower.note(&event(EventKind::Modify(inside), &["/p/d-1.0.0.plg"]));
        assert!(due(&follower, "d-1.0.0.plg") < now + settle / 2);
    }

    #[test]
    fn deleting_a_directory_renamed_away_does_not_postpone_the_new_one() {
        use notify::event::{ModifyKind, RemoveKind, RenameMode};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        std::fs::create_dir(base.join("counter")).unwrap();
        std::fs::write(base.join("counter/plugin.json"), "{}").unwrap();
        let settle = Duration::from_secs(60);
        let mut follower = Follower::new(Weak::new(), base.clone(), settle, Arc::default());
        let event = |kind, path: PathBuf| notify::Event::new(kind).add_path(path);
        let now = Instant::now();

        // The new version renamed into place: synced at once...
        follower.note(
            &notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
                .add_path(base.join(".counter.new"))
                .add_path(base.join("counter")),
        );
        // ...even when the old directory's files, deleted now, are reported
        // under the name they had when watched.
        let removed = EventKind::Remove(RemoveKind::File);
        follower.note(&event(removed, base.join("counter/plugin.json")));
        assert!(follower.due["counter"].0 < now + settle / 2);
        // A file that is really gone is a change that settles.
        follower.note(&event(removed, base.join("counter/libcounter.so")));
        assert!(follower.due["counter"].0 >= now + settle);
    }
}
