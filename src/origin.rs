//! Where a plugin comes from, kept apart from how it runs (`version::Kind`).
//!
//! An origin yields a checked manifest and the directory its artifacts are
//! relative to, and says when its content changed (the fingerprint the
//! watcher compares). Today every plugin comes from a directory of the
//! plugins directory; a `.plg` package, a discovered socket or a
//! registration are further variants, and nothing above this module (the
//! manager, the watcher) needs to know which one it has.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::untrusted::{MAX_MANIFEST_BYTES, read_file};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `<base>/<name>/`: `plugin.json` and the artifacts it names.
    Dir(PathBuf),
}

impl Origin {
    /// The plugin the entry `name` of the plugins directory holds, if it
    /// holds one. Dot entries never do (staging, the loader's own files).
    pub(crate) fn of_entry(base: &Path, name: &str) -> Option<Origin> {
        if name.starts_with('.') {
            return None;
        }
        let path = base.join(name);
        // `is_dir` follows a symlink: a plugin directory may be a link.
        path.is_dir().then_some(Origin::Dir(path))
    }

    /// The entries of the plugins directory that hold plugins, sorted.
    pub(crate) fn scan(base: &Path) -> std::io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(base)?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_owned();
                match Origin::of_entry(base, &name) {
                    Some(_) => Some(name),
                    None => {
                        tracing::debug!(entry = %name, "skipping: not a plugin");
                        None
                    }
                }
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// What the listing shows as the plugin's location.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Origin::Dir(dir) => dir,
        }
    }

    /// Where relative artifact paths of the manifest resolve.
    pub(crate) fn dir(&self) -> &Path {
        match self {
            Origin::Dir(dir) => dir,
        }
    }

    /// The manifest file, as errors name it.
    pub(crate) fn manifest_path(&self) -> PathBuf {
        self.dir().join(MANIFEST_FILE)
    }

    /// Reads and checks the manifest.
    pub(crate) fn manifest(&self) -> Result<Manifest> {
        match self {
            Origin::Dir(dir) => Manifest::from_dir(dir),
        }
    }

    /// Identifies the content: the manifest's bytes and the artifact's size,
    /// modification time and inode (a rename-in is a new inode).
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        let manifest_path = self.manifest_path();
        let bytes = read_file(&manifest_path, MAX_MANIFEST_BYTES).unwrap_or_default();
        bytes.hash(&mut hasher);
        let name = self
            .dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let artifact = Manifest::parse(&bytes, &manifest_path, &name)
            .ok()
            .and_then(|m| m.artifact_path(self.dir()));
        if let Some(meta) = artifact.and_then(|p| std::fs::metadata(p).ok()) {
            meta.len().hash(&mut hasher);
            meta.modified().ok().hash(&mut hasher);
            #[cfg(unix)]
            std::os::unix::fs::MetadataExt::ino(&meta).hash(&mut hasher);
        }
        hasher.finish()
    }
}
