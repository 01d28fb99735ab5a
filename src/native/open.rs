//! Opening a native plugin: everything that can be checked without
//! running it (manifest mode, artifact, checksum, header), then `dlopen` of
//! an image holding exactly the checked bytes.

use std::path::Path;

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
pub(super) fn open_checked(
    manifest: &Manifest,
    dir: &Path,
    options: &NativeOptions,
) -> Result<(Library, Image)> {
    let plugin = manifest.name.clone();
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
    let Source::LocalSo { sha256, .. } = &manifest.source else {
        unreachable!("Version::load sends only local_so manifests here");
    };
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
    // Read once: every later step uses these bytes, and the image holds
    // exactly them, so what is checked is what is loaded.
    let bytes = crate::untrusted::read_file(&real, options.max_library_size)
        .map_err(|e| io("reading", e))?;
    if let Some(expected) = sha256 {
        let found = crate::digest::sha256_hex(&bytes);
        if !crate::digest::digests_equal(expected, &found) {
            return Err(Error::Checksum {
                plugin,
                path,
                expected: expected.clone(),
                found,
            });
        }
    }
    let checked = header::inspect(&bytes).map_err(|refusal| match refusal {
        Refusal::NotALibrary(message) => Error::BadLibrary {
            plugin: plugin.clone(),
            path: path.clone(),
            message,
        },
        Refusal::MissingRoot => Error::MissingRoot {
            plugin: plugin.clone(),
            path: path.clone(),
            symbol: plugin_abi::ffi::ROOT_SYMBOL,
        },
        Refusal::BadRoot(why) => Error::AbiMismatch {
            plugin: plugin.clone(),
            path: path.clone(),
            found: format!("a malformed root: {why}"),
            expected: ffi::expected_abi(),
        },
        Refusal::Abi(info) => Error::AbiMismatch {
            plugin: plugin.clone(),
            path: path.clone(),
            found: info.describe(),
            expected: ffi::expected_abi(),
        },
    })?;
    let image = Image::create(&bytes, &plugin, &real_dir, &options.shadow_dir)
        .map_err(|e| io("preparing an image of", e))?;
    drop(bytes);
    let opened = Library::open(image.path(), &checked);
    image.opened();
    match opened {
        Ok(library) => Ok((library, image)),
        Err(refused) => {
            // A library refused after `dlopen` may stay mapped (NODELETE):
            // its `/proc/self/fd/N` name must then stay unique.
            image.release(refused.still_mapped);
            Err(open_error(refused.error, &plugin, &path))
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
    let (library, image) = open_checked(manifest, dir, options)?;
    Closing::new(library, Some(image)).close_now();
    Ok(())
}
