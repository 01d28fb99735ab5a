//! Shadow copies: every loaded version is `dlopen`ed from a fresh file of its own.
//!
//! Measured on Linux/glibc: `dlopen` caches by path and by device+inode, so
//! reopening a replaced file at the same path returns the *old* library, and
//! writing over a loaded `.so` crashes the process. Loading from a new file
//! (a real copy, not a hard link) per version avoids both. The copy is
//! unlinked right after `dlopen`; its name stays unique so `/proc/self/maps`
//! tells whether it is still mapped after `dlclose`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to a new, uniquely named file in `dir`.
pub(crate) fn write_copy(
    dir: &Path,
    plugin: &str,
    version: &str,
    bytes: &[u8],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "{plugin}-{version}-{}-{seq}.{}",
        std::process::id(),
        std::env::consts::DLL_EXTENSION
    );
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all(bytes)?;
    Ok(path)
}

/// Removes shadow copies left by processes that no longer run (a crash
/// between copy and unlink). Best effort; Linux only (it asks `/proc`).
#[cfg(target_os = "linux")]
pub(crate) fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Checks that `bytes` is a complete shared library of the platform's object
/// format before it is handed to `dlopen`.
///
/// Measured: glibc maps a truncated library whose headers are intact, then
/// the process dies of SIGBUS while relocating pages past the end of the
/// file. Every loadable segment must lie inside the file.
pub(crate) fn check_library(bytes: &[u8]) -> Result<(), String> {
    use object::{Object, ObjectSegment};
    let file =
        object::File::parse(bytes).map_err(|e| format!("{e} (truncated or not a library?)"))?;
    if file.kind() != object::ObjectKind::Dynamic {
        return Err(format!(
            "expected a shared library, found a {:?} object",
            file.kind()
        ));
    }
    for segment in file.segments() {
        let (offset, size) = segment.file_range();
        let end = offset.saturating_add(size);
        if end > bytes.len() as u64 {
            return Err(format!(
                "a segment spans bytes {offset}..{end} but the file has {} bytes (truncated?)",
                bytes.len()
            ));
        }
    }
    Ok(())
}

/// Without `/proc`, a live process cannot be told from a dead one: keep everything.
#[cfg(not(target_os = "linux"))]
pub(crate) fn remove_stale(_dir: &Path) {}

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Compares two hex digests in constant time (case-insensitive).
pub(crate) fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

/// Whether a file at `path` is still mapped into this process.
#[cfg(target_os = "linux")]
pub(crate) fn is_mapped(path: &Path) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let needle = path.to_string_lossy();
    maps.lines().filter_map(mapped_path).any(|p| p == needle)
}

/// The file of a `/proc/self/maps` line: everything from the first `/` (a
/// path may contain spaces), without the " (deleted)" of an unlinked file.
pub(crate) fn mapped_path(line: &str) -> Option<&str> {
    let path = &line[line.find('/')?..];
    Some(path.strip_suffix(" (deleted)").unwrap_or(path))
}

/// Whether a file at `path` is still mapped into this process (not checked
/// off Linux: reported as unmapped).
#[cfg(not(target_os = "linux"))]
pub(crate) fn is_mapped(_path: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_case_insensitively() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(digests_equal(&h, &h.to_uppercase()));
        assert!(!digests_equal(&h, &sha256_hex(b"abd")));
        assert!(!digests_equal(&h, "ba"));
    }

    #[test]
    fn maps_lines_yield_whole_paths() {
        let line =
            "7f1c2a000000-7f1c2a001000 r-xp 00001000 fd:01 1234    /tmp/a dir/libx.so (deleted)";
        assert_eq!(mapped_path(line), Some("/tmp/a dir/libx.so"));
        assert_eq!(mapped_path("7f-7f rw-p 00000000 00:00 0 "), None);
    }

    #[test]
    fn copies_are_unique_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_copy(dir.path(), "p", "1.0.0", b"x").unwrap();
        let b = write_copy(dir.path(), "p", "1.0.0", b"x").unwrap();
        assert_ne!(a, b);
        assert!(!is_mapped(&a));
    }
}
