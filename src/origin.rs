//! Where a plugin comes from, kept apart from how it runs (`version::Kind`).
//!
//! An origin yields a checked manifest and the directory its artifacts are
//! relative to, and says when its content changed (the fingerprint the
//! watcher compares). A plugin comes from a directory of the plugins
//! directory, or was [`Found`] elsewhere: a socket in a sockets directory,
//! or a registration. Nothing above this module (the manager, the watcher)
//! needs to know which one it has, except that the plugins directory
//! answers only for its own.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::untrusted::{MAX_MANIFEST_BYTES, read_file};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `<base>/<name>/`: `plugin.json` and the artifacts it names.
    Dir(PathBuf),
    /// A plugin found outside the plugins directory, with the manifest its
    /// finder made for it (finders need the feature `exec`).
    #[cfg_attr(not(feature = "exec"), allow(dead_code))]
    Found(Arc<Found>),
}

/// A plugin found outside the plugins directory: a socket in a sockets
/// directory, or a registration. Its finder makes its manifest (and may
/// change it: a registration with a new endpoint).
#[derive(Debug)]
pub(crate) struct Found {
    /// Who found it, as messages say: `the sockets directory /run/plugins`.
    pub(crate) by: String,
    /// What the listing shows: the socket, or its `.listen` file.
    pub(crate) path: PathBuf,
    /// Where relative paths of the manifest resolve.
    pub(crate) dir: PathBuf,
    manifest: Mutex<Manifest>,
}

#[cfg_attr(not(feature = "exec"), allow(dead_code))]
impl Found {
    pub(crate) fn new(by: String, path: PathBuf, dir: PathBuf, manifest: Manifest) -> Found {
        Found {
            by,
            path,
            dir,
            manifest: Mutex::new(manifest),
        }
    }

    pub(crate) fn manifest(&self) -> Manifest {
        self.manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_manifest(&self, manifest: Manifest) {
        *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) = manifest;
    }

    pub(crate) fn name(&self) -> String {
        self.manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .name
            .clone()
    }
}

/// The same plugin of the same finder.
impl PartialEq for Found {
    fn eq(&self, other: &Found) -> bool {
        self.by == other.by && self.name() == other.name()
    }
}

impl Eq for Found {}

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
            Origin::Found(found) => &found.path,
        }
    }

    /// Where relative artifact paths of the manifest resolve.
    pub(crate) fn dir(&self) -> &Path {
        match self {
            Origin::Dir(dir) => dir,
            Origin::Found(found) => &found.dir,
        }
    }

    /// The manifest file, as errors name it.
    pub(crate) fn manifest_path(&self) -> PathBuf {
        match self {
            Origin::Dir(dir) => dir.join(MANIFEST_FILE),
            Origin::Found(found) => found.path.clone(),
        }
    }

    /// Reads and checks the manifest.
    pub(crate) fn manifest(&self) -> Result<Manifest> {
        match self {
            Origin::Dir(dir) => Manifest::from_dir(dir),
            Origin::Found(found) => Ok(found.manifest()),
        }
    }

    /// Whether `self` and `other` are the same source of one plugin name:
    /// both of the plugins directory, or found by the same finder. A name
    /// is not handed from one source to another.
    pub(crate) fn same_source(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::Found(a), Origin::Found(b)) => a == b,
            (Origin::Found(_), _) | (_, Origin::Found(_)) => false,
            _ => true,
        }
    }

    /// Whether the plugins directory answers for this plugin (loads and
    /// unloads it as its entries come and go).
    pub(crate) fn of_plugins_dir(&self) -> bool {
        !matches!(self, Origin::Found(_))
    }

    /// The source, as `Error::NameTaken` names it.
    pub(crate) fn describe(&self) -> String {
        match self {
            Origin::Dir(dir) => format!("the plugin directory {}", dir.display()),
            Origin::Found(found) => format!("{} ({})", found.by, found.path.display()),
        }
    }

    /// Identifies the content: the manifest's bytes and the artifact's size,
    /// modification time and inode (a rename-in is a new inode); for a
    /// found plugin, its manifest.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        if let Origin::Found(found) = self {
            serde_json::to_string(&found.manifest())
                .unwrap_or_default()
                .hash(&mut hasher);
            return hasher.finish();
        }
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
