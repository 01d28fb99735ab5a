//! `.plg` packages: a plugin directory as one file, to copy, download,
//! sign and drop into a plugins directory.
//!
//! A package is a gzipped tar of the plugin directory's files, at its top
//! level (`plugin.json` first, with `source.sha256` filled in, then the
//! artifact, then any other file, and `plugin.sig` when signed), named
//! `NAME-VERSION.plg` after its manifest. Reading one is hostile-input safe
//! (see `unpack.rs` for the rules); the host unpacks a package into a
//! private directory, loads it from there like a plugin directory, and
//! removes the copy once the version is loaded.

mod pack;
mod unpack;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) use pack::write_atomically;
pub(crate) use unpack::Limits;

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, Manifest};

/// The extension of package files.
pub const EXTENSION: &str = "plg";

/// The largest library a manager loads by default
/// ([`Builder::max_library_size`](crate::Builder::max_library_size)), which
/// also bounds packages.
pub const DEFAULT_MAX_LIBRARY_SIZE: u64 = crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES;

/// The signature file, beside `plugin.json` (see [`crate::signing`]).
pub(crate) const SIGNATURE_FILE: &str = "plugin.sig";

/// What [`pack`] wrote.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Packed {
    /// The package, `NAME-VERSION.plg`.
    pub path: PathBuf,
    /// Its manifest, as packed.
    pub manifest: Manifest,
    /// Whether it carries the directory's `plugin.sig`.
    pub signed: bool,
    /// Whether the directory's `plugin.sig` was left out: filling in
    /// `source.sha256` changed the manifest it signed. Sign the package.
    pub dropped_signature: bool,
}

/// Packs the plugin directory `dir` (its `plugin.json`, artifact and other
/// files; dot files left out) into `<out_dir>/NAME-VERSION.plg`, filling in
/// `source.sha256` when the manifest has none.
///
/// # Errors
/// [`Error::Manifest`] for an invalid manifest, [`Error::Checksum`] when the
/// manifest's `sha256` does not match the library, [`Error::Io`] when a file
/// cannot be read (or is a link or special file) or the package cannot be
/// written.
pub fn pack(dir: impl AsRef<Path>, out_dir: impl AsRef<Path>) -> Result<Packed> {
    pack::pack(dir.as_ref(), out_dir.as_ref())
}

/// The file name a package of `manifest` must have.
pub(crate) fn file_name(manifest: &Manifest) -> String {
    format!("{}-{}.{EXTENSION}", manifest.name, manifest.version)
}

/// Whether the entry `name` of a plugins directory is a package file.
pub(crate) fn is_package_name(name: &str) -> bool {
    name.strip_suffix(EXTENSION)
        .is_some_and(|stem| stem.ends_with('.') && stem.len() > 1)
        && !name.starts_with('.')
}

fn package_error(plugin: &str, path: &Path, message: impl Into<String>) -> Error {
    Error::Package {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        message: crate::text::printable(&message.into(), 1024).into_owned(),
    }
}

/// Opens a package file as the plugins directory may hold it: a regular
/// file, opened without blocking, no larger than the limit.
fn open(path: &Path, limits: Limits) -> Result<std::fs::File> {
    let io = |source| Error::Io {
        plugin: String::new(),
        action: "reading",
        path: path.to_owned(),
        source,
    };
    let file = crate::untrusted::open_regular(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > limits.max_bytes {
        return Err(package_error(
            "",
            path,
            format!("{len} bytes, over the limit of {} bytes", limits.max_bytes),
        ));
    }
    Ok(file)
}

/// The manifest of the package at `path`, checked, and checked against the
/// file's name. Only the entries up to `plugin.json` are read.
pub(crate) fn read_manifest(path: &Path, limits: Limits) -> Result<Manifest> {
    let file = open(path, limits)?;
    let bytes = unpack::read_one(std::io::BufReader::new(file), MANIFEST_FILE, limits)
        .map_err(|why| package_error("", path, why))?
        .ok_or_else(|| package_error("", path, format!("no {MANIFEST_FILE} in the package")))?;
    let manifest_path = path.join(MANIFEST_FILE);
    let manifest = Manifest::parse(&bytes, &manifest_path, "")?;
    check_file_name(&manifest, path)?;
    Ok(manifest)
}

pub(crate) fn check_file_name(manifest: &Manifest, path: &Path) -> Result<()> {
    let expected = file_name(manifest);
    let found = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if found != expected {
        return Err(package_error(
            &manifest.name,
            path,
            format!(
                "its manifest says {} {}, so the file must be named `{expected}`",
                manifest.name, manifest.version
            ),
        ));
    }
    Ok(())
}

/// A package unpacked into a private directory, removed when dropped.
#[derive(Debug)]
pub(crate) struct Unpacked {
    dir: PathBuf,
}

impl Unpacked {
    /// Unpacks the package at `path` into a new private directory under
    /// `root` (created `0700` if missing, and checked).
    pub(crate) fn new(path: &Path, root: &Path, limits: Limits) -> Result<Unpacked> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let io = |action, source| Error::Io {
            plugin: String::new(),
            action,
            path: root.to_owned(),
            source,
        };
        crate::private_dir::ensure(root, false).map_err(|e| io("preparing", e))?;
        let dir = root.join(format!(
            "{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        make_private_dir(&dir).map_err(|e| io("preparing", e))?;
        let unpacked = Unpacked { dir };
        let file = open(path, limits)?;
        unpack::unpack(std::io::BufReader::new(file), &unpacked.dir, limits)
            .map_err(|why| package_error("", path, why))?;
        Ok(unpacked)
    }

    /// Where the files are.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)
    }
    #[cfg(not(unix))]
    std::fs::create_dir(dir)
}

/// Removes unpacked copies left by processes that died (Linux: their
/// names start with a process id that no longer runs).
pub(crate) fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if cfg!(target_os = "linux") && !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Unpacks the package file `package` into `<dest>/NAME` (its manifest's
/// name), with every rule of the plugins directory applied, and returns
/// that directory.
///
/// # Errors
/// [`Error::Package`] for a package that breaks a rule or is misnamed,
/// [`Error::Manifest`] for its manifest, [`Error::Io`] when writing fails.
pub fn unpack(package: impl AsRef<Path>, dest: impl AsRef<Path>) -> Result<PathBuf> {
    let (package, dest) = (package.as_ref(), dest.as_ref());
    let limits = Limits::for_library(DEFAULT_MAX_LIBRARY_SIZE);
    let manifest = read_manifest(package, limits)?;
    let root = dest.join(format!(".dynplug-unpack-{}", std::process::id()));
    let unpacked = Unpacked::new(package, &root, limits)?;
    let target = dest.join(&manifest.name);
    let moved = std::fs::rename(unpacked.dir(), &target);
    drop(unpacked);
    let _ = std::fs::remove_dir_all(&root);
    moved.map_err(|source| Error::Io {
        plugin: manifest.name.clone(),
        action: "unpacking to",
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

/// What [`install`] put in the plugins directory.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Installed {
    /// The package file in the plugins directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Checks the package `bytes` (every unpacking rule, the manifest, the
/// artifact's checksum) and writes it into the plugins directory `plugins`
/// as `NAME-VERSION.plg`, atomically: a watching host sees it once, whole.
/// `max_library` bounds the package as a host with that library limit does.
///
/// # Errors
/// [`Error::Package`] when the bytes break a rule, [`Error::Manifest`] or
/// [`Error::Checksum`] for their content, [`Error::Io`] when writing fails.
pub fn install(bytes: &[u8], plugins: impl AsRef<Path>, max_library: u64) -> Result<Installed> {
    let plugins = plugins.as_ref();
    let limits = Limits::for_library(max_library);
    let shown = plugins.join(format!("(uploaded).{EXTENSION}"));
    if bytes.len() as u64 > limits.max_bytes {
        return Err(package_error(
            "",
            &shown,
            format!(
                "{} bytes, over the limit of {} bytes",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    let root = plugins.join(".dynplug").join("unpacked");
    crate::private_dir::ensure(&root, false).map_err(|source| Error::Io {
        plugin: String::new(),
        action: "preparing",
        path: root.clone(),
        source,
    })?;
    // Uploads may run in parallel: each checks a file of its own.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let check = root.join(format!(
        "check-{}-{}.{EXTENSION}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    write_atomically(
        &root,
        check
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("check"),
        bytes,
    )
    .map_err(|source| Error::Io {
        plugin: String::new(),
        action: "writing",
        path: check.clone(),
        source,
    })?;
    let checked = Unpacked::new(&check, &root, limits).and_then(|unpacked| {
        let manifest = check_contents(unpacked.dir(), &shown)?;
        check_file_name(&manifest, &plugins.join(file_name(&manifest)))?;
        Ok(manifest)
    });
    let _ = std::fs::remove_file(&check);
    let manifest = checked?;
    let name = file_name(&manifest);
    let path = write_atomically(plugins, &name, bytes).map_err(|source| Error::Io {
        plugin: manifest.name.clone(),
        action: "writing",
        path: plugins.join(&name),
        source,
    })?;
    Ok(Installed { path, manifest })
}

/// Checks an unpacked package as far as can be done without loading it:
/// the manifest, and the artifact's checksum when the manifest has one.
fn check_contents(dir: &Path, shown: &Path) -> Result<Manifest> {
    let read = |path: &Path, limit| {
        crate::untrusted::read_file(path, limit).map_err(|source| Error::Io {
            plugin: String::new(),
            action: "reading",
            path: shown.join(path.strip_prefix(dir).unwrap_or(path)),
            source,
        })
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read(&manifest_path, crate::untrusted::MAX_MANIFEST_BYTES)?;
    let manifest = Manifest::parse(&bytes, &shown.join(MANIFEST_FILE), "")?;
    if let (crate::manifest::Source::LocalSo { sha256, .. }, Some(library)) =
        (&manifest.source, manifest.library_path(dir))
    {
        let contents = read(&library, crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES)?;
        let found = crate::digest::sha256_hex(&contents);
        if let Some(expected) = sha256
            && !crate::digest::digests_equal(expected, &found)
        {
            return Err(Error::Checksum {
                plugin: manifest.name.clone(),
                path: shown.join(library.strip_prefix(dir).unwrap_or(&library)),
                algorithm: "sha256",
                expected: expected.clone(),
                found,
            });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests;
