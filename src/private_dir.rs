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

/// Creates `dir` (and missing parents) with mode `0700` if it is missing,
/// then checks it as [`check`] does. An existing directory is never chmod-ed
/// or taken over: it is accepted or refused, with the reason.
#[cfg(unix)]
pub(crate) fn ensure(dir: &Path, group: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check(dir, group)
}

/// Checks that `dir` is private: a real directory (not a symlink), owned by
/// the effective user, that nobody else may write to, enter or list (with
/// `group`, the group may enter and list it, never write). No ancestor may
/// be writable by every user without the sticky bit, nor owned by another
/// user than root or us: they could rename the directory away and put
/// their own in its place.
#[cfg(unix)]
pub(crate) fn check(dir: &Path, group: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(refused(dir, "not a directory (a symlink?)".into()));
    }
    let us = rustix::process::geteuid().as_raw();
    if meta.uid() != us {
        return Err(refused(
            dir,
            format!(
                "owned by uid {}, not by us (uid {us}); it must be a directory of our own",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o777;
    let allowed = if group { 0o750 } else { 0o700 };
    let extra = mode & !allowed;
    if extra != 0 {
        let who = match (extra & 0o070 != 0, extra & 0o007 != 0) {
            (true, true) => "group and others",
            (true, false) => "the group",
            _ => "others",
        };
        let what = if extra & 0o022 != 0 {
            "write to it"
        } else if extra & 0o011 != 0 {
            "enter it"
        } else {
            "list it"
        };
        return Err(refused(
            dir,
            format!("mode {mode:04o}: {who} can {what} (make it {allowed:04o})"),
        ));
    }
    let dir = dir.canonicalize()?;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(refused(
                &dir,
                format!(
                    "its ancestor {} is writable by every user (and not sticky)",
                    ancestor.display()
                ),
            ));
        }
        // Its owner can rename what is inside: only root or us.
        if meta.uid() != 0 && meta.uid() != us {
            return Err(refused(
                &dir,
                format!(
                    "its ancestor {} is owned by uid {}, who could replace it",
                    ancestor.display(),
                    meta.uid()
                ),
            ));
        }
    }
    Ok(())
}

/// Off Unix there are no modes to check: the directory is created.
#[cfg(not(unix))]
pub(crate) fn ensure(dir: &Path, _group: bool) -> io::Result<()> {
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

/// A warning when the group of `path` may write to it: accepted (a deploy
/// group is a choice), but every member can run code in this process.
#[cfg(unix)]
pub(crate) fn group_writable(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    (meta.mode() & 0o020 != 0).then(|| {
        format!(
            "{} is writable by its group (gid {}): every member can run code in this process",
            path.display(),
            meta.gid()
        )
    })
}

/// Off Unix there are no modes to check.
#[cfg(not(unix))]
pub(crate) fn group_writable(_path: &Path) -> Option<String> {
    None
}

fn refused(dir: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("directory {}: {why}", dir.display()),
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
        ensure(&dir, false).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn modes_name_who_can_do_what() {
        let dir = tempfile::tempdir().unwrap();
        let set =
            |m| std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(m)).unwrap();
        set(0o755);
        let err = check(dir.path(), false).unwrap_err().to_string();
        assert!(
            err.contains("mode 0755: group and others can enter it"),
            "{err}"
        );
        assert_eq!(mode(dir.path()), 0o755, "never chmod-ed");
        set(0o770);
        let err = check(dir.path(), true).unwrap_err().to_string();
        assert!(
            err.contains("mode 0770: the group can write to it"),
            "{err}"
        );
        set(0o750);
        check(dir.path(), true).expect("the group may enter for group sockets");
        assert!(check(dir.path(), false).is_err());
        set(0o700);
        check(dir.path(), false).unwrap();
    }

    #[test]
    fn symlinks_open_ancestors_and_foreign_owners_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(base.path(), &link).unwrap();
        let err = ensure(&link, false).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        // An open ancestor: anyone could swap the directory.
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure(&open.join("mine"), false).unwrap_err();
        assert!(err.to_string().contains("writable by every user"), "{err}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure(&open.join("mine"), false).unwrap();

        if rustix::process::geteuid().is_root() {
            let foreign = base.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let err = ensure(&foreign, false).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
            // A directory of ours inside another user's: they could swap it.
            let inside = foreign.join("ours");
            std::fs::create_dir(&inside).unwrap();
            std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o700)).unwrap();
            let err = ensure(&inside, false).unwrap_err();
            assert!(
                err.to_string()
                    .contains("is owned by uid 65534, who could replace it"),
                "{err}"
            );
        }
    }
}
