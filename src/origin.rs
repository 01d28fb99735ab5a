//! Where a plugin comes from, kept apart from how it runs (`version::Kind`).
//!
//! An origin yields a checked manifest, the seal that says who signed it
//! (`signing::Seal`), and the directory its artifacts are relative to, and
//! says when its content changed (the fingerprint the watcher compares).
//! Two kinds of entries of the plugins directory hold plugins:
//!
//! * a directory `<base>/<name>/`, named after its plugin;
//! * a package `<base>/NAME-VERSION.plg`, unpacked into a private directory
//!   for the load and removed after it. Several packages of one plugin may
//!   sit side by side: the newest version wins (a directory of the same
//!   name too, and it wins a tie).
//!
//! A package's plugin name comes from its manifest, so the entries and the
//! plugins they hold are mapped by [`PackageIndex`], which reads a package's
//! manifest once per file content and remembers it after the file is gone
//! (to unload what it held). A package whose manifest cannot be read is a
//! plugin of its own, named after its file, so that its error is listed.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::package::{Limits, Unpacked, is_package_name};
use crate::signing::Seal;
use crate::untrusted::{MAX_MANIFEST_BYTES, read_file};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `<base>/<name>/`: `plugin.json` and the artifacts it names.
    Dir(PathBuf),
    /// `<base>/NAME-VERSION.plg`.
    Package(PathBuf),
    /// A plugin found outside the plugins directory, with the manifest its
    /// finder made for it (finders need the feature `exec`).
    #[cfg_attr(not(feature = "exec"), allow(dead_code))]
    Found(Arc<Found>),
}

/// An origin read for one load: the manifest, its seal, and where its files
/// are (an unpacked package's copy lives as long as this).
pub(crate) struct Opened {
    pub(crate) manifest: Manifest,
    pub(crate) seal: Seal,
    dir: PathBuf,
    unpacked: Option<Unpacked>,
}

impl Opened {
    /// Where relative artifact paths of the manifest resolve.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unpacked copy of a package, for the version to keep or drop.
    pub(crate) fn into_unpacked(self) -> Option<Unpacked> {
        self.unpacked
    }
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
    /// Whether the entry `name` of the plugins directory may hold a plugin:
    /// a directory or a package. Dot entries never do (staging, the
    /// loader's own files).
    pub(crate) fn is_entry(base: &Path, name: &str) -> bool {
        if name.starts_with('.') {
            return false;
        }
        let path = base.join(name);
        // `is_dir` follows a symlink: a plugin directory may be a link.
        path.is_dir() || (is_package_name(name) && path.is_file())
    }

    /// The entries of the plugins directory that may hold plugins, sorted.
    pub(crate) fn scan(base: &Path) -> std::io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(base)?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_owned();
                if Origin::is_entry(base, &name) {
                    Some(name)
                } else {
                    tracing::debug!(entry = %name, "skipping: not a plugin");
                    None
                }
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Where the plugin named `name` comes from now: its directory, or its
    /// newest package, whichever has the higher version (the directory on
    /// a tie); `None` when neither exists.
    pub(crate) fn locate(base: &Path, name: &str, index: &PackageIndex) -> Option<Origin> {
        let dir = base.join(name);
        let packages = index.packages_of(base, name);
        if is_package_name(name) && dir.is_file() && packages.is_empty() {
            // A package whose manifest could not be read: listed by file name.
            return index.is_unreadable(name).then_some(Origin::Package(dir));
        }
        let newest = packages.into_iter().max_by(|a, b| a.0.cmp(&b.0));
        if !dir.is_dir() {
            return newest.map(|(_, path)| Origin::Package(path));
        }
        if newest.is_none() {
            return Some(Origin::Dir(dir));
        }
        let dir_version = Manifest::from_dir(&dir).ok().map(|m| m.version);
        match (newest, dir_version) {
            (Some((version, path)), Some(dir_version)) if version > dir_version => {
                Some(Origin::Package(path))
            }
            _ => Some(Origin::Dir(dir)),
        }
    }

    /// What the listing shows as the plugin's location.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Origin::Dir(path) | Origin::Package(path) => path,
            Origin::Found(found) => &found.path,
        }
    }

    /// The manifest file, as errors name it.
    pub(crate) fn manifest_path(&self) -> PathBuf {
        match self {
            Origin::Found(found) => found.path.clone(),
            _ => self.path().join(MANIFEST_FILE),
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
            Origin::Package(path) => format!("the package {}", path.display()),
            Origin::Found(found) => format!("{} ({})", found.by, found.path.display()),
        }
    }

    /// Reads and checks the manifest (bytes read once, their seal taken
    /// from the same bytes), unpacking a package under `unpack_root`.
    pub(crate) fn open(&self, unpack_root: &Path, limits: Limits) -> Result<Opened> {
        match self {
            Origin::Dir(dir) => {
                let (manifest, bytes) = Manifest::read_dir(dir)?;
                Ok(Opened {
                    seal: Seal::read(dir, &bytes),
                    manifest,
                    dir: dir.clone(),
                    unpacked: None,
                })
            }
            Origin::Package(path) => {
                let unpacked = Unpacked::new(path, unpack_root, limits)?;
                let manifest_path = path.join(MANIFEST_FILE);
                let bytes = read_file(&unpacked.dir().join(MANIFEST_FILE), MAX_MANIFEST_BYTES)
                    .map_err(|source| Error::Io {
                        plugin: String::new(),
                        action: "reading",
                        path: manifest_path.clone(),
                        source,
                    })?;
                let manifest = Manifest::parse(&bytes, &manifest_path, "")?;
                crate::package::check_file_name(&manifest, path)?;
                Ok(Opened {
                    seal: Seal::read(unpacked.dir(), &bytes)
                        .shown_as(path.join(crate::signing::SIGNATURE_FILE)),
                    manifest,
                    dir: unpacked.dir().to_owned(),
                    unpacked: Some(unpacked),
                })
            }
            // Its finder checked the socket; there is nothing to sign.
            Origin::Found(found) => Ok(Opened {
                manifest: found.manifest(),
                seal: Seal::none(),
                dir: found.dir.clone(),
                unpacked: None,
            }),
        }
    }

    /// Identifies the content. A directory: the manifest's bytes and the
    /// artifact's size, modification time and inode (a rename-in is a new
    /// inode). A package: its file's size, time and inode. A found plugin:
    /// its manifest.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        let dir = match self {
            Origin::Found(found) => {
                serde_json::to_string(&found.manifest())
                    .unwrap_or_default()
                    .hash(&mut hasher);
                return hasher.finish();
            }
            Origin::Package(path) => {
                path.hash(&mut hasher);
                stamp(path).hash(&mut hasher);
                return hasher.finish();
            }
            Origin::Dir(dir) => dir,
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = read_file(&manifest_path, MAX_MANIFEST_BYTES).unwrap_or_default();
        bytes.hash(&mut hasher);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let artifact = Manifest::parse(&bytes, &manifest_path, &name)
            .ok()
            .and_then(|m| m.artifact_path(dir));
        if let Some(path) = artifact {
            stamp(&path).hash(&mut hasher);
        }
        stamp(&dir.join(crate::signing::SIGNATURE_FILE)).hash(&mut hasher);
        hasher.finish()
    }
}

/// Size, modification time and inode of a file, if it exists.
fn stamp(path: &Path) -> Option<(u64, Option<std::time::SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.len(), meta.modified().ok(), inode))
}

/// Which plugin each package file of the plugins directory holds.
#[derive(Debug)]
pub(crate) struct PackageIndex {
    limits: Limits,
    /// File name → what its content (by stamp) holds.
    entries: Mutex<HashMap<String, Indexed>>,
    /// The package file names last listed in the plugins directory.
    listing: Mutex<Option<Listing>>,
}

/// A listing of the package names in a directory, kept while the directory
/// is unchanged: locating each plugin used to list the whole directory,
/// which made loading N plugins O(N²) (10,000 plugins: 117 s).
#[derive(Debug)]
struct Listing {
    base: PathBuf,
    /// The directory's mtime when listed.
    mtime: std::time::SystemTime,
    /// When the listing was read.
    read_at: std::time::SystemTime,
    names: std::sync::Arc<Vec<String>>,
}

/// How much older than its listing a directory's mtime must be for the
/// listing to be trusted: an entry added within the same tick of the
/// filesystem's clock leaves the mtime as it was (as git's "racy" index
/// entries), so a directory changed that recently is listed again.
const LISTING_TRUSTED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Indexed {
    stamp: Option<(u64, Option<std::time::SystemTime>, u64)>,
    /// The plugin's name and version; `None` when unreadable.
    held: Option<(String, semver::Version)>,
}

impl PackageIndex {
    pub(crate) fn new(limits: Limits) -> PackageIndex {
        PackageIndex {
            limits,
            entries: Mutex::new(HashMap::new()),
            listing: Mutex::new(None),
        }
    }

    /// The package file names in `base`: listed again unless the directory
    /// is unchanged since the last listing and was already settled then.
    fn package_names(&self, base: &Path) -> std::sync::Arc<Vec<String>> {
        let mtime = std::fs::metadata(base).and_then(|m| m.modified()).ok();
        let mut listing = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(kept), Some(mtime)) = (listing.as_ref(), mtime)
            && kept.base == base
            && kept.mtime == mtime
            && mtime
                .checked_add(LISTING_TRUSTED_AFTER)
                .is_some_and(|settled| settled < kept.read_at)
        {
            return std::sync::Arc::clone(&kept.names);
        }
        let read_at = std::time::SystemTime::now();
        let names: Vec<String> = std::fs::read_dir(base)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| is_package_name(n))
                    .collect()
            })
            .unwrap_or_default();
        let names = std::sync::Arc::new(names);
        *listing = mtime.map(|mtime| Listing {
            base: base.to_owned(),
            mtime,
            read_at,
            names: std::sync::Arc::clone(&names),
        });
        names
    }

    /// The plugin the entry `name` holds (or held, if it is gone): the
    /// entry itself for a directory, the manifest's name for a package
    /// (its file name if unreadable). `None` for a package never seen.
    pub(crate) fn plugin_of(&self, base: &Path, name: &str) -> Option<String> {
        if !is_package_name(name) {
            return Some(name.to_owned());
        }
        let path = base.join(name);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(now) = stamp(&path).filter(|_| path.is_file()) else {
            let gone = entries.remove(name)?;
            return Some(
                gone.held
                    .map_or_else(|| name.to_owned(), |(plugin, _)| plugin),
            );
        };
        let current = entries.get(name).filter(|e| e.stamp == Some(now)).cloned();
        let indexed = match current {
            Some(indexed) => indexed,
            None => {
                let held = match crate::package::read_manifest(&path, self.limits) {
                    Ok(manifest) => Some((manifest.name, manifest.version)),
                    Err(e) => {
                        tracing::debug!(entry = name, "package unreadable: {e}");
                        None
                    }
                };
                let indexed = Indexed {
                    stamp: Some(now),
                    held,
                };
                entries.insert(name.to_owned(), indexed.clone());
                indexed
            }
        };
        Some(
            indexed
                .held
                .map_or_else(|| name.to_owned(), |(plugin, _)| plugin),
        )
    }

    /// Whether the package file `name` was found unreadable.
    fn is_unreadable(&self, name: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(name).is_some_and(|e| e.held.is_none())
    }

    /// The packages in `base` that hold `plugin`, with their versions.
    fn packages_of(&self, base: &Path, plugin: &str) -> Vec<(semver::Version, PathBuf)> {
        let mut found = Vec::new();
        for name in self.package_names(base).iter() {
            if self.plugin_of(base, name).as_deref() != Some(plugin) {
                continue;
            }
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, version)) = entries.get(name).and_then(|e| e.held.clone()) {
                found.push((version, base.join(name)));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn set_mtime(dir: &Path, at: SystemTime) {
        std::fs::File::open(dir).unwrap().set_modified(at).unwrap();
    }

    #[test]
    fn the_package_listing_is_kept_only_while_the_directory_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let index = PackageIndex::new(Limits::for_library(1 << 20));
        std::fs::write(base.join("a-1.0.0.plg"), b"").unwrap();
        std::fs::create_dir(base.join("plain")).unwrap();
        assert_eq!(*index.package_names(base), ["a-1.0.0.plg"]);

        // Changed just now: listed again, so a new package is seen.
        std::fs::write(base.join("b-1.0.0.plg"), b"").unwrap();
        let mut names = index.package_names(base).to_vec();
        names.sort();
        assert_eq!(names, ["a-1.0.0.plg", "b-1.0.0.plg"]);

        // Settled (changed long before the listing): kept, not listed again
        // (shown by a change that leaves the mtime as it was).
        let old = SystemTime::now() - Duration::from_secs(60);
        set_mtime(base, old);
        let listed = index.package_names(base);
        assert_eq!(listed.len(), 2);
        std::fs::write(base.join("c-1.0.0.plg"), b"").unwrap();
        set_mtime(base, old);
        assert!(
            std::sync::Arc::ptr_eq(&listed, &index.package_names(base)),
            "kept"
        );

        // Any change of the mtime lists it again.
        set_mtime(base, SystemTime::now());
        assert_eq!(index.package_names(base).len(), 3);
    }
}
