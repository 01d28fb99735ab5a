//! Directories that only this process's user may write.
//!
//! Found by an adversarial probe: a shadow directory created `0777` under
//! umask 000 let another local user overwrite a copy between its write and
//! `dlopen`, and their constructor ran inside a root `dynplug serve`; a socket
//! directory created earlier by another user kept its owner, who replaced a
//! socket. Whatever dynplug writes code or sockets into must be owned by the
//! effective user and closed to everyone else, or refused with the reason.

use std::io;
use std::path::Path;

/// Creates `dir` (and missing parents) with mode `0700` and checks it is
/// private: a real directory (not a symlink), owned by the effective user,
/// with no access for group or others. A directory we own that others may
/// only read or enter is tightened to `0700`; one others may write, or one
/// owned by someone else, is refused. No ancestor may be writable by every
/// user without the sticky bit (anyone could rename the directory away and
/// put their own in its place).
#[cfg(unix)]
pub(crate) fn ensure(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(refused(dir, "not a directory (a symlink?)".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refused(
            dir,
            format!(
                "owned by uid {}, not by this process's uid {me}",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refused(
            dir,
            format!("mode {mode:04o}: other users can write to it"),
        ));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    for ancestor in dir
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
    {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(refused(
                dir,
                format!(
                    "its ancestor {} is writable by every user (and not sticky)",
                    ancestor.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Off Unix there are no modes to check: the directory is created.
#[cfg(not(unix))]
pub(crate) fn ensure(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Why a path from the plugins directory may not be trusted, if it may not:
/// every user can write to it. Group-writable paths are the operator's
/// choice (a deploy group) and pass.
#[cfg(unix)]
pub(crate) fn world_writable(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    (mode & 0o002 != 0).then(|| {
        format!(
            "{} is writable by every user (mode {mode:04o}): anyone could replace plugin code; \
             remove the write bit for others (chmod o-w)",
            path.display()
        )
    })
}

/// Off Unix there are no modes to check.
#[cfg(not(unix))]
pub(crate) fn world_writable(_path: &Path) -> Option<String> {
    None
}

fn refused(dir: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("refusing {}: {why}", dir.display()),
    )
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_private_whatever_the_umask_said() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // Ours but readable by others: tightened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn writable_by_others_or_foreign_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure(&dir).unwrap_err();
        assert!(err.to_string().contains("other users can write"), "{err}");

        let link = base.path().join("link");
        std::os::unix::fs::symlink(base.path(), &link).unwrap();
        let err = ensure(&link).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        // An open ancestor: anyone could swap the directory.
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure(&open.join("mine")).unwrap_err();
        assert!(err.to_string().contains("writable by every user"), "{err}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure(&open.join("mine")).unwrap();

        if rustix::process::geteuid().is_root() {
            let foreign = base.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let err = ensure(&foreign).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }
}
