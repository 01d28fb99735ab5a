//! Writing a `.plg`: `plugin.json` first (with `source.sha256` filled in),
//! then the artifact and every other file of the plugin directory, with
//! fixed owners, modes and times so the same directory packs to the same
//! bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Packed, SIGNATURE_FILE, file_name};
use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, Manifest, Source};
use crate::untrusted::{DEFAULT_MAX_LIBRARY_BYTES, MAX_MANIFEST_BYTES, read_file};

/// Packs the plugin directory `dir` into `<out_dir>/NAME-VERSION.plg`
/// (written under a dot name, then renamed).
pub(crate) fn pack(dir: &Path, out_dir: &Path) -> Result<Packed> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let io = |action: &'static str, path: &Path, source| Error::Io {
        plugin: label.clone(),
        action,
        path: path.to_owned(),
        source,
    };
    let bytes = read_file(&manifest_path, MAX_MANIFEST_BYTES)
        .map_err(|e| io("reading", &manifest_path, e))?;
    let manifest = Manifest::parse(&bytes, &manifest_path, &label)?;
    let plugin = manifest.name.clone();
    let (manifest_bytes, changed) = fill_checksum(&manifest, &bytes, dir, &manifest_path)?;
    let mut files: Vec<(PathBuf, Vec<u8>, bool)> = Vec::new();
    collect(dir, Path::new(""), &mut files).map_err(|(path, e)| io("packing", &path, e))?;
    let had_signature = files.iter().any(|(p, ..)| p == Path::new(SIGNATURE_FILE));
    // A signature covers the manifest's bytes: one made before sha256 was
    // filled in no longer matches, and is left out rather than shipped broken.
    files.retain(|(p, ..)| !(changed && p == Path::new(SIGNATURE_FILE)));

    let name = file_name(&manifest);
    let out = out_dir.join(&name);
    let staging = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written =
        write(&staging, &manifest_bytes, &files).and_then(|()| std::fs::rename(&staging, &out));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staging);
        return Err(io("writing", &out, e));
    }
    tracing::debug!(%plugin, path = %out.display(), "packed");
    Ok(Packed {
        path: out,
        manifest: Manifest::parse(&manifest_bytes, &manifest_path, &plugin)?,
        signed: had_signature && !changed,
        dropped_signature: had_signature && changed,
    })
}

/// The manifest bytes to pack: as they are when `source.sha256` is given
/// (and matches), else with it filled in. Whether they changed.
fn fill_checksum(
    manifest: &Manifest,
    bytes: &[u8],
    dir: &Path,
    manifest_path: &Path,
) -> Result<(Vec<u8>, bool)> {
    let Source::LocalSo { sha256, .. } = &manifest.source else {
        return Ok((bytes.to_vec(), false));
    };
    let library = manifest
        .library_path(dir)
        .expect("local_so has a library path");
    let contents = read_file(&library, DEFAULT_MAX_LIBRARY_BYTES).map_err(|source| Error::Io {
        plugin: manifest.name.clone(),
        action: "reading",
        path: library.clone(),
        source,
    })?;
    let found = crate::digest::sha256_hex(&contents);
    match sha256 {
        Some(expected) if crate::digest::digests_equal(expected, &found) => {
            Ok((bytes.to_vec(), false))
        }
        Some(expected) => Err(Error::Checksum {
            plugin: manifest.name.clone(),
            path: library,
            algorithm: "sha256",
            expected: expected.clone(),
            found,
        }),
        None => {
            let mut json: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| Error::Manifest {
                    plugin: manifest.name.clone(),
                    path: manifest_path.to_owned(),
                    field: ".".into(),
                    message: e.to_string(),
                })?;
            json["source"]["sha256"] = serde_json::Value::String(found);
            let mut out = serde_json::to_vec_pretty(&json).unwrap_or_default();
            out.push(b'\n');
            Ok((out, true))
        }
    }
}

/// Every regular file under `dir` (dot names left out), but the manifest.
fn collect(
    root: &Path,
    rel: &Path,
    files: &mut Vec<(PathBuf, Vec<u8>, bool)>,
) -> std::result::Result<(), (PathBuf, std::io::Error)> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| (dir.clone(), e))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| (path.clone(), e))?;
        let inner = rel.join(&name);
        if kind.is_dir() {
            collect(root, &inner, files)?;
        } else if kind.is_file() {
            if inner == Path::new(MANIFEST_FILE) {
                continue;
            }
            let bytes =
                read_file(&path, DEFAULT_MAX_LIBRARY_BYTES).map_err(|e| (path.clone(), e))?;
            let executable = is_executable(&entry);
            files.push((inner, bytes, executable));
        } else {
            return Err((
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file or directory (a symlink?): packages hold neither links nor special files",
                ),
            ));
        }
    }
    Ok(())
}

fn is_executable(entry: &std::fs::DirEntry) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        entry
            .metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o100 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = entry;
        false
    }
}

fn write(out: &Path, manifest: &[u8], files: &[(PathBuf, Vec<u8>, bool)]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut append = |path: &Path, bytes: &[u8], executable: bool| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, bytes)
    };
    append(Path::new(MANIFEST_FILE), manifest, false)?;
    for (path, bytes, executable) in files {
        append(path, bytes, *executable)?;
    }
    let file = tar.into_inner()?.finish()?;
    file.sync_all()?;
    Ok(())
}

/// Writes `bytes` to `<dir>/<name>` atomically: a dot file first, synced,
/// then renamed over the name.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let dest = dir.join(name);
    let staging = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&staging, &dest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written.map(|()| dest)
}
