//! Opening a native plugin: everything that can be checked without
//! running it (manifest mode, artifact, checksum, header), then `dlopen` of
//! an image holding exactly the checked bytes.

use std::path::{Path, PathBuf};

use super::ffi::{self, Library, OpenError};
use super::header::{self, Refusal};
use super::image::Image;
use super::{Closing, NativeOptions};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Source};

/// The pre-`dlopen` checks alone, for the fuzz targets.
pub(crate) fn inspect(bytes: &[u8]) -> std::result::Result<(), String> {
    header::inspect(bytes)
        .map(|_| ())
        .map_err(|refusal| format!("{refusal:?}"))
}

/// Checks everything about a native plugin that can be checked without
/// running it (manifest mode, artifact, checksum, header) and loads it from
/// an image of exactly the checked bytes.
/// With `registered`, only that file is loaded (a plugin registered to be
/// loaded on its first call): another one in its place is a reload's.
pub(super) fn open_checked(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
    check: Option<&ArtifactCheck<'_>>,
    registered: Option<&FileId>,
) -> Result<(Library, Image)> {
    let (path, real_dir, file) = open_library(manifest, dir)?;
    let io = |action, source| Error::Io {
        plugin: manifest.name.clone(),
        action,
        path: path.clone(),
        source,
    };
    // Checked before the copy and again after it: a file rewritten in
    // place meanwhile is not the one registered.
    let still_registered = |file: &std::fs::File| match registered {
        Some(registered) if FileId::of_file(file).map_err(|e| io("reading", e))? != *registered => {
            Err(io(
                "loading",
                std::io::Error::other(
                    "changed since the plugin was registered; reload the plugin (the \
                     watcher does) to load the new file",
                ),
            ))
        }
        _ => Ok(()),
    };
    still_registered(&file)?;
    // On Linux the kernel copies the file into a memfd, which is sealed and
    // then checked through a read-only mapping: the bytes checked are the
    // pages `dlopen` maps, and they never pass through this process (a
    // third of the CPU of loading 1,000 plugins was copying them twice).
    #[cfg(target_os = "linux")]
    match Image::new_memfd(&real_dir) {
        Ok(mut memfd) => {
            crate::untrusted::copy_open(&file, &mut memfd, options.max_library_size)
                .map_err(|e| io("reading", e))?;
            still_registered(&file)?;
            drop(file);
            let image = Image::sealed(memfd).map_err(|e| io("preparing an image of", e))?;
            let bytes = image.map().map_err(|e| io("preparing an image of", e))?;
            let checked = check_bytes(manifest, &path, &bytes, check)?;
            drop(bytes);
            return open_image(manifest, &path, image, &checked);
        }
        Err(e) => tracing::debug!(
            plugin = manifest.name,
            "no memfd ({e}); loading from a private copy"
        ),
    }
    // Read once: every later step uses these bytes, and the image holds
    // exactly them, so what is checked is what is loaded.
    let bytes = crate::untrusted::read_open(&file, options.max_library_size)
        .map_err(|e| io("reading", e))?;
    still_registered(&file)?;
    drop(file);
    let checked = check_bytes(manifest, &path, &bytes, check)?;
    open_bytes(manifest, &path, &real_dir, options, bytes, &checked)
}

/// Everything [`open_checked`] does before the image and `dlopen`: the
/// library's bytes, read once, checksum and header checked. What a
/// `process` plugin's host does before handing the bytes to its runner.
#[cfg(feature = "exec")]
pub(crate) fn read_checked(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
    check: Option<&ArtifactCheck<'_>>,
) -> Result<(PathBuf, Vec<u8>)> {
    let (path, _, file) = open_library(manifest, dir)?;
    let bytes = crate::untrusted::read_open(&file, options.max_library_size).map_err(|source| {
        Error::Io {
            plugin: manifest.name.clone(),
            action: "reading",
            path: path.clone(),
            source,
        }
    })?;
    check_bytes(manifest, &path, &bytes, check)?;
    Ok((path, bytes))
}

/// The checks of [`open_checked`] that run none of the library's code and
/// need no digest of it, for a plugin loaded on its first call: where the
/// file is, what it is, who can write it, its size, and its header (a
/// truncated file, a non-plugin or another ABI). Its registration fails as
/// its load would have for these causes. The checksum and the signature
/// are checked by the load, on the bytes it loads (as everything here is
/// again). Returns which file it is, to tell later whether it is still the
/// same.
pub(super) fn check_library_file(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
) -> Result<FileId> {
    let (path, _, file) = open_library(manifest, dir)?;
    let io = |action, source| Error::Io {
        plugin: manifest.name.clone(),
        action,
        path: path.clone(),
        source,
    };
    // The identity of the file as it was read: a file changed meanwhile is
    // refused (a copy still being written; the watcher tries again).
    let id = FileId::of_file(&file).map_err(|e| io("reading", e))?;
    // Read into the heap: the fastest of three ways measured (1,000
    // registrations on 16 threads: 89-117 ms, against 210 ms through a
    // memfd image and 360-390 ms through fresh anonymous mappings, whose
    // page setup and teardown serialize). The price: each registering
    // thread's allocator arena keeps about one library's size of free
    // memory, which later allocations reuse.
    let bytes = crate::untrusted::read_open(&file, options.max_library_size)
        .map_err(|e| io("reading", e))?;
    let read = bytes.len() as u64;
    header::inspect(&bytes).map_err(|refusal| refused(manifest, &path, refusal))?;
    drop(bytes);
    let after = FileId::of_file(&file).map_err(|e| io("reading", e))?;
    if after != id || read != id.len {
        return Err(io(
            "reading",
            std::io::Error::other("the file changed while it was read"),
        ));
    }
    Ok(id)
}

/// Whether the library `manifest` names in `dir` is still the file
/// `registered` describes (one `stat`, following the same links).
pub(super) fn is_registered_file(manifest: &Manifest, dir: &Path, registered: &FileId) -> bool {
    manifest
        .library_path(dir)
        .and_then(|path| std::fs::metadata(path).ok())
        .is_some_and(|now| FileId::of(&now) == *registered)
}

/// Which file, in which state: device, inode, length and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileId {
    node: (u64, u64),
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileId {
    fn of_file(file: &std::fs::File) -> std::io::Result<FileId> {
        file.metadata().map(|m| FileId::of(&m))
    }

    fn of(metadata: &std::fs::Metadata) -> FileId {
        #[cfg(unix)]
        let node = {
            use std::os::unix::fs::MetadataExt;
            (metadata.dev(), metadata.ino())
        };
        #[cfg(not(unix))]
        let node = (0, 0);
        FileId {
            node,
            len: metadata.len(),
            modified: metadata.modified().ok(),
        }
    }
}

/// Opens the library a `local_so` manifest names, once it is known to be
/// inside the plugin directory, a regular file, and writable by nobody
/// else: the path as the manifest names it, the real plugin directory, and
/// the open file.
fn open_library(manifest: &Manifest, dir: &Path) -> Result<(PathBuf, PathBuf, std::fs::File)> {
    let plugin = manifest.name.clone();
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
    let path = manifest
        .library_path(dir)
        .expect("local_so always has a library path");
    let io = |action, source| Error::Io {
        plugin: plugin.clone(),
        action,
        path: path.clone(),
        source,
    };
    // `source.path` was checked to be relative without `..`; a symlink
    // could still point outside the plugin directory.
    let real = path.canonicalize().map_err(|e| io("reading", e))?;
    let real_dir = dir.canonicalize().map_err(|e| io("reading", e))?;
    if !real.starts_with(&real_dir) {
        return Err(Error::Manifest {
            plugin,
            path: manifest_path,
            field: "source.path".into(),
            message: format!(
                "resolves outside the plugin directory, to {}",
                real.display()
            ),
        });
    }
    if let Some(why) = [&real_dir, &manifest_path, &real]
        .into_iter()
        .find_map(|p| crate::private_dir::world_writable(p))
    {
        return Err(Error::Insecure {
            plugin,
            path: path.clone(),
            reason: why,
        });
    }
    let file = crate::untrusted::open_regular(&real).map_err(|e| io("reading", e))?;
    Ok((path, real_dir, file))
}

/// A check of the artifact by the caller (its signature), given the hex
/// SHA-256 of the bytes read, before anything else looks at them.
pub(crate) type ArtifactCheck<'a> = dyn Fn(&str) -> Result<()> + 'a;

/// The caller's check (a signature), the checksum and the header check, on
/// the bytes that will be loaded.
pub(super) fn check_bytes(
    manifest: &Manifest,
    path: &Path,
    bytes: &[u8],
    check: Option<&ArtifactCheck<'_>>,
) -> Result<header::HeaderInfo> {
    let plugin = manifest.name.clone();
    let path = path.to_owned();
    let Source::LocalSo { sha256, .. } = &manifest.source else {
        unreachable!("Version::load sends only local_so manifests here");
    };
    // One digest for the signature and the checksum.
    let digest = (sha256.is_some() || check.is_some()).then(|| crate::digest::sha256_hex(bytes));
    if let (Some(check), Some(digest)) = (check, &digest) {
        check(digest)?;
    }
    if let (Some(expected), Some(found)) = (sha256, digest)
        && !crate::digest::digests_equal(expected, &found)
    {
        return Err(Error::Checksum {
            plugin,
            path,
            algorithm: "sha256",
            expected: expected.clone(),
            found,
        });
    }
    header::inspect(bytes).map_err(|refusal| refused(manifest, &path, refusal))
}

/// The error for bytes the header check refused.
fn refused(manifest: &Manifest, path: &Path, refusal: Refusal) -> Error {
    let plugin = manifest.name.clone();
    let path = path.to_owned();
    match refusal {
        Refusal::NotALibrary(message) => Error::BadLibrary {
            plugin,
            path,
            message,
        },
        Refusal::MissingRoot => Error::MissingRoot {
            plugin,
            path,
            symbol: plugin_abi::ffi::ROOT_SYMBOL,
        },
        Refusal::BadRoot(why) => Error::AbiMismatch {
            plugin,
            path,
            found: format!("a malformed root: {why}"),
            expected: ffi::expected_abi(),
        },
        Refusal::Abi(info) => Error::AbiMismatch {
            plugin,
            path,
            found: info.describe(),
            expected: ffi::expected_abi(),
        },
    }
}

/// Puts checked bytes in an image and opens it.
pub(super) fn open_bytes(
    manifest: &Manifest,
    path: &Path,
    real_dir: &Path,
    options: &NativeOptions,
    bytes: Vec<u8>,
    checked: &header::HeaderInfo,
) -> Result<(Library, Image)> {
    let plugin = manifest.name.as_str();
    let image = Image::create(&bytes, plugin, real_dir, &options.shadow_dir).map_err(|source| {
        Error::Io {
            plugin: plugin.to_owned(),
            action: "preparing an image of",
            path: path.to_owned(),
            source,
        }
    })?;
    drop(bytes);
    open_image(manifest, path, image, checked)
}

/// Opens an image of checked bytes.
fn open_image(
    manifest: &Manifest,
    path: &Path,
    image: Image,
    checked: &header::HeaderInfo,
) -> Result<(Library, Image)> {
    let opened = Library::open(image.path(), checked);
    image.opened();
    match opened {
        Ok(library) => Ok((library, image)),
        Err(refused) => {
            // A library refused after `dlopen` may stay mapped (NODELETE):
            // its `/proc/self/fd/N` name must then stay unique.
            image.release(refused.still_mapped);
            Err(open_error(refused.error, &manifest.name, path))
        }
    }
}

fn open_error(e: OpenError, plugin: &str, path: &Path) -> Error {
    let (plugin, path) = (plugin.to_owned(), path.to_owned());
    match e {
        OpenError::Dlopen(message) => Error::Open {
            plugin,
            path,
            message,
        },
        OpenError::MissingRoot => Error::MissingRoot {
            plugin,
            path,
            symbol: plugin_abi::ffi::ROOT_SYMBOL,
        },
        OpenError::Abi { found, expected } => Error::AbiMismatch {
            plugin,
            path,
            found,
            expected,
        },
    }
}

/// Verifies a native plugin without calling it: the artifact's bytes are
/// checked, loaded from an image, its ABI checked, and it is closed again.
/// The constructors of a library that passed the checks on its bytes run.
pub(crate) fn verify(manifest: &Manifest, dir: &Path, options: &NativeOptions) -> Result<()> {
    let (library, image) = open_checked(manifest, dir, options, None, None)?;
    Closing::new(library, Some(image)).close_now();
    Ok(())
}
