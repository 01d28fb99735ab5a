//! The file a version's code is loaded from: the checked bytes, in a file
//! nobody else can change before `dlopen` opens it.
//!
//! Measured on Linux/glibc: `dlopen` caches by path and by device+inode, so
//! reopening a replaced file returns the *old* library, and writing over a
//! loaded `.so` crashes the process. So every version is loaded from a new
//! file of its own, holding exactly the bytes that were verified:
//!
//! * On Linux, a sealed `memfd` (no writes, no resizing, seals sealed),
//!   opened as `/proc/self/fd/N`: there is no file in any directory to race.
//!   The kernel copies the plugin's file into it (`copy_file_range` or
//!   `sendfile`), and the checks read the sealed memfd through a read-only
//!   mapping: the bytes checked are the pages `dlopen` maps, and they are
//!   copied once, not read into the process and written out again.
//!   glibc's `dlopen` also returns an already loaded library whose *name*
//!   matches, so the descriptor stays open while the image is mapped: no
//!   other image can get the same `/proc/self/fd/N` name meanwhile.
//! * Elsewhere (or if memfds are unavailable), a read-only copy created
//!   exclusively (`O_EXCL`, no symlink followed) in a private directory
//!   (`0700`, owned by us; see `private_dir`), unlinked right after `dlopen`.
//!
//! Either way the image is identified by device and inode in messages (and
//! in `/proc/self/maps`, for whoever looks). Whether it is still mapped after
//! `dlclose` is asked of the loader (`ffi`), not read from `/proc/self/maps`:
//! scanning every mapping for each unload took 4.3 s to shut 1,000 plugins
//! down.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file's identity: what `/proc/self/maps` lists beside each mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    major: u32,
    minor: u32,
    ino: u64,
}

pub(crate) struct Image {
    /// What `dlopen` opens.
    path: PathBuf,
    id: FileId,
    /// The memfd, held open while the image is mapped; `None` for a copy.
    #[cfg(target_os = "linux")]
    memfd: Option<std::os::fd::OwnedFd>,
}

/// Prefix of every copy dynplug writes; nothing else is ever deleted.
const COPY_PREFIX: &str = "dynplug-shadow-";

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Image {
    /// Puts `bytes` where `dlopen` can open them and nobody can change them.
    /// `origin` (the plugin directory) names a memfd in `/proc/self/maps`.
    pub(crate) fn create(
        bytes: &[u8],
        plugin: &str,
        origin: &Path,
        shadow_dir: &Path,
    ) -> io::Result<Image> {
        #[cfg(target_os = "linux")]
        match Image::memfd(bytes, origin) {
            Ok(image) => return Ok(image),
            Err(e) => tracing::debug!(plugin, "no memfd ({e}); loading from a private copy"),
        }
        Image::copy(bytes, plugin, shadow_dir)
    }

    #[cfg(target_os = "linux")]
    fn memfd(bytes: &[u8], origin: &Path) -> io::Result<Image> {
        let mut file = Image::new_memfd(origin)?;
        file.write_all(bytes)?;
        Image::sealed(file)
    }

    /// An empty memfd to copy a library into, then seal with
    /// [`sealed`](Self::sealed). `origin` (the plugin directory) names it in
    /// `/proc/self/maps`.
    #[cfg(target_os = "linux")]
    pub(crate) fn new_memfd(origin: &Path) -> io::Result<std::fs::File> {
        use rustix::fs::MemfdFlags;
        if !Path::new("/proc/self/fd").is_dir() {
            return Err(io::Error::other("/proc is not mounted"));
        }
        // Shown in /proc/<pid>/maps as `/memfd:dynplug:<dir> (deleted)`;
        // the kernel takes at most 249 bytes.
        let mut name = format!("dynplug:{}", origin.display());
        while name.len() > 249 {
            name.pop();
        }
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        // Since Linux 6.3 an executable memfd must say so (vm.memfd_noexec);
        // older kernels refuse the flag.
        let fd = rustix::fs::memfd_create(&name, flags | MemfdFlags::EXEC)
            .or_else(|_| rustix::fs::memfd_create(&name, flags))?;
        Ok(std::fs::File::from(fd))
    }

    /// Seals a memfd from [`new_memfd`](Self::new_memfd): from now on its
    /// bytes can change no more (no writes, no resizing, no unsealing).
    #[cfg(target_os = "linux")]
    pub(crate) fn sealed(file: std::fs::File) -> io::Result<Image> {
        use rustix::fs::SealFlags;
        use std::os::fd::AsRawFd;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )?;
        let id = file_id(&file)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Ok(Image {
            path,
            id,
            memfd: Some(file.into()),
        })
    }

    /// A sealed memfd image's bytes, mapped read-only: the very pages
    /// `dlopen` maps, which nobody can change. An error for a copy.
    #[cfg(target_os = "linux")]
    pub(crate) fn map(&self) -> io::Result<super::ffi::Mapped> {
        let fd = self
            .memfd
            .as_ref()
            .ok_or_else(|| io::Error::other("not a memfd"))?;
        super::ffi::Mapped::sealed(fd)
    }

    fn copy(bytes: &[u8], plugin: &str, shadow_dir: &Path) -> io::Result<Image> {
        crate::private_dir::ensure(shadow_dir, false)?;
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{COPY_PREFIX}{}-{seq}-{plugin}.{}",
            std::process::id(),
            std::env::consts::DLL_EXTENSION
        );
        let path = shadow_dir.join(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Read-only from birth (the open descriptor may still write),
            // and never through a symlink someone planted.
            options.mode(0o500).custom_flags(libc::O_NOFOLLOW);
        }
        let mut file = options.open(&path)?;
        let written = file.write_all(bytes).and_then(|()| file_id(&file));
        match written {
            Ok(id) => Ok(Image {
                path,
                id,
                #[cfg(target_os = "linux")]
                memfd: None,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// What `dlopen` opens.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// After `dlopen`: a copy's name is no longer needed (the mapping keeps
    /// the inode alive, and no file is left behind if the process dies).
    pub(crate) fn opened(&self) {
        if !self.is_memfd() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn is_memfd(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.memfd.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// After `dlclose`: an image still mapped keeps its memfd open for the
    /// life of the process, so its name stays unique (see the module docs).
    pub(crate) fn release(self, still_mapped: bool) {
        if still_mapped {
            std::mem::forget(self);
        }
    }

    /// The image as messages name it.
    pub(crate) fn describe(&self) -> String {
        let FileId { major, minor, ino } = self.id;
        let what = if self.is_memfd() { "memfd" } else { "copy" };
        format!(
            "{what} {} (device {major}:{minor}, inode {ino})",
            self.path.display()
        )
    }
}

fn file_id(file: &std::fs::File) -> io::Result<FileId> {
    #[cfg(unix)]
    {
        let stat = rustix::fs::fstat(file)?;
        Ok(FileId {
            major: rustix::fs::major(stat.st_dev),
            minor: rustix::fs::minor(stat.st_dev),
            ino: stat.st_ino,
        })
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(FileId {
            major: 0,
            minor: 0,
            ino: 0,
        })
    }
}

/// Removes copies left in `dir` by dynplug processes that no longer run (a
/// crash between copy and unlink). Only files dynplug names
/// (`dynplug-shadow-<pid>-<n>-<plugin>.<ext>`), owned by us, are candidates.
/// Best effort; Linux only (it asks `/proc` whether the pid runs).
#[cfg(target_os = "linux")]
pub(crate) fn remove_stale(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(copy_pid) else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.is_file() && m.uid() == me);
        if ours && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Without `/proc`, a live process cannot be told from a dead one: keep everything.
#[cfg(not(target_os = "linux"))]
pub(crate) fn remove_stale(_dir: &Path) {}

/// The pid in a copy's name, if `name` is exactly a name dynplug gives copies.
fn copy_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(COPY_PREFIX)?;
    let rest = rest.strip_suffix(std::env::consts::DLL_EXTENSION)?;
    let rest = rest.strip_suffix('.')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u64>().ok()?;
    let plugin = parts.next()?;
    crate::manifest::is_path_safe(plugin).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_dynplug_gives_are_copies() {
        let ext = std::env::consts::DLL_EXTENSION;
        assert_eq!(
            copy_pid(&format!("dynplug-shadow-42-7-hello.{ext}")),
            Some(42)
        );
        assert_eq!(
            copy_pid(&format!("dynplug-shadow-42-7-my-plugin.{ext}")),
            Some(42)
        );
        for name in [
            "report-2024-01.txt".to_owned(),
            format!("hello-1.0.0-42-7.{ext}"),
            format!("dynplug-shadow-x-7-hello.{ext}"),
            format!("dynplug-shadow-42-7-.{ext}"),
            "dynplug-shadow-42-7-hello.txt".to_owned(),
        ] {
            assert_eq!(copy_pid(&name), None, "{name}");
        }
    }

    #[test]
    fn images_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let a = Image::create(b"x", "p", dir.path(), dir.path()).unwrap();
        let b = Image::create(b"x", "p", dir.path(), dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert_ne!(a.id, b.id);
        assert_eq!(std::fs::read(a.path()).unwrap(), b"x");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_memfd_image_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let image = Image::create(b"code", "p", dir.path(), dir.path()).unwrap();
        assert!(image.is_memfd(), "memfd expected on Linux");
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(image.path())
            .and_then(|mut f| f.write_all(b"evil"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert_eq!(std::fs::read(image.path()).unwrap(), b"code");
    }

    #[cfg(unix)]
    #[test]
    fn copies_are_read_only_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("shadow");
        let image = Image::copy(b"code", "p", &dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(image.path()), 0o500);
        image.opened();
        assert!(!image.path().exists());
    }
}
