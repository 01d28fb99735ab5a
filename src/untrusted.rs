//! Reading files from the plugins directory, which is hostile until checked.
//!
//! Measured in an adversarial probe: a `plugin.json` (or library) that is a
//! FIFO blocked every reader forever (the watcher, the management API's
//! reload, shutdown), `/dev/zero` was read until memory ran out, and an ELF
//! padded to 2 GB was copied whole. So every plugin file is opened without
//! blocking, must be a regular file, and is read up to a size cap.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Largest `plugin.json` read.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// Default largest plugin library read (`Builder::max_library_size`).
pub(crate) const DEFAULT_MAX_LIBRARY_BYTES: u64 = 256 * 1024 * 1024;

/// Reads the regular file at `path`, refusing anything else (FIFO, device,
/// socket, directory) and anything larger than `limit` bytes, without ever
/// blocking on the open.
pub(crate) fn read_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_open(&open_regular(path)?, limit)
}

/// Reads a file opened by [`open_regular`], refusing more than `limit` bytes.
pub(crate) fn read_open(file: &File, limit: u64) -> io::Result<Vec<u8>> {
    let len = checked_len(file, limit)?;
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may grow between the stat and the read: read one byte past
    // the limit to notice.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

/// Copies a file opened by [`open_regular`] to `to`, refusing more than
/// `limit` bytes. File to file, so the kernel copies (`copy_file_range` or
/// `sendfile`): the bytes never pass through this process's memory.
// Only the memfd image (Linux) copies; elsewhere the bytes are read.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn copy_open(file: &File, to: &mut File, limit: u64) -> io::Result<()> {
    checked_len(file, limit)?;
    let copied = io::copy(&mut file.take(limit + 1), to)?;
    if copied > limit {
        return Err(too_large(copied, limit));
    }
    Ok(())
}

/// The file's length, if it is at most `limit` (refused at once otherwise).
pub(crate) fn checked_len(file: &File, limit: u64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len > limit {
        return Err(too_large(len, limit));
    }
    Ok(len)
}

/// Opens `path` for reading without blocking (a FIFO with no writer would
/// block a plain open) and checks that it is a regular file.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    #[cfg(unix)]
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?
    };
    #[cfg(not(unix))]
    let file = File::open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file (a {})", describe(&kind)),
        ));
    }
    // O_NONBLOCK has no effect on regular files; reads behave as usual.
    Ok(file)
}

fn too_large(len: u64, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{len} bytes or more, over the limit of {limit} bytes"),
    )
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "device";
        }
        if kind.is_socket() {
            return "socket";
        }
    }
    if kind.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_file(&path, 5).unwrap(), b"12345");
        let err = read_file(&path, 4).unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 4 bytes"),
            "{err}"
        );
    }

    #[test]
    fn copies_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        let copy = |limit| {
            let mut to = tempfile::tempfile().unwrap();
            copy_open(&open_regular(&path).unwrap(), &mut to, limit)
                .map(|()| to.metadata().unwrap().len())
        };
        assert_eq!(copy(5).unwrap(), 5);
        let err = copy(4).unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 4 bytes"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let err = read_file(&path, 1024).unwrap_err();
        assert!(
            err.to_string().contains("not a regular file (a FIFO)"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_directories_are_refused() {
        let err = read_file(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(err.to_string().contains("(a device)"), "{err}");
        let err = read_file(Path::new("/"), 1024).unwrap_err();
        assert!(err.to_string().contains("(a directory)"), "{err}");
    }
}
