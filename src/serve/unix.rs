//! Unix sockets and the directories they live in, private to the user dynplug
//! runs as whatever the umask. Found by a probe: a `--goplugin-dir` created
//! earlier by another user kept its owner, who replaced a socket and received
//! a root client's traffic; and sockets took the umask's mode.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every socket dynplug creates unless configured otherwise.
pub(crate) const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Whether a socket of `mode` is meant for the group: its directory may
/// then let the group in (but never write).
fn for_group(mode: u32) -> bool {
    mode & 0o070 != 0
}

/// Creates `dir` 0700 if missing and checks it is private (see
/// `crate::private_dir`), letting the group in for group sockets.
pub(crate) fn private_dir(dir: &Path, socket_mode: u32) -> io::Result<()> {
    crate::private_dir::ensure(dir, for_group(socket_mode))
}

/// Binds a Unix socket at `path` with `mode`, whatever the umask. Its
/// directory must be private (`crate::private_dir::check`). A stale socket file is
/// replaced, never another kind of file, and never a socket some process
/// still accepts on.
///
/// The socket is bound inside a fresh 0700 directory next to `path`, given
/// its mode, then renamed into place: it is never reachable with a wider
/// mode, and the rename replaces a stale socket atomically.
pub(crate) fn bind(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    crate::private_dir::check(dir, for_group(mode))?;
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            ));
        }
    }
    let staging = staging_dir(dir)?;
    let temporary = staging.join("s");
    let bound = (|| -> io::Result<std::os::unix::net::UnixListener> {
        let listener = std::os::unix::net::UnixListener::bind(&temporary)?;
        fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))?;
        fs::rename(&temporary, path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&temporary);
    let _ = fs::remove_dir(&staging);
    tokio::net::UnixListener::from_std(bound?)
}

/// A new directory only we can enter, in `dir`. Its name is short: a socket
/// path is limited to 107 bytes.
fn staging_dir(dir: &Path) -> io::Result<PathBuf> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let candidate = dir.join(format!(".dynplug-{}-{seq}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[tokio::test]
    async fn sockets_get_their_mode_and_replace_only_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind(&path, 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let err = bind(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o750)).unwrap();
        let _listener = bind(&path, 0o660).expect("a stale socket is replaced");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert_eq!(
            bind(&file, 0o660).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".dynplug-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
