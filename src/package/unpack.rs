//! Reading a `.plg`, which is hostile until checked: a gzipped tar whose
//! every entry is checked before a byte of it is written.
//!
//! The rules: only regular files and directories (no symlinks, hard links,
//! devices, FIFOs); relative paths without `..`, empty or hidden tricks
//! (only normal components, a leading `./` aside); each path once (a second
//! `plugin.json` could differ from the one read first); at most
//! `max_entries` entries; and at most `max_bytes` bytes out of the
//! decompressor in total, counted as they come, not as headers claim, so a
//! gzip bomb stops at the cap.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

/// What one package may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_entries: usize,
    /// Decompressed bytes in all (headers, contents, padding).
    pub(crate) max_bytes: u64,
}

/// Longest path inside a package, in bytes, and deepest.
const MAX_PATH: usize = 1024;
const MAX_DEPTH: usize = 16;

impl Limits {
    /// The limits of a host whose largest library is `max_library`: room for
    /// that library and a few small files.
    pub(crate) fn for_library(max_library: u64) -> Limits {
        Limits {
            max_entries: 256,
            max_bytes: max_library.saturating_add(16 * 1024 * 1024),
        }
    }
}

/// One entry, checked, as the callback of [`walk`] sees it.
pub(crate) struct Entry<'a> {
    /// Relative, normal components only.
    pub(crate) path: PathBuf,
    pub(crate) is_dir: bool,
    /// Whether the owner's execute bit is set (executables of exec plugins).
    pub(crate) executable: bool,
    pub(crate) contents: &'a mut dyn Read,
}

/// Whether [`walk`] goes on after an entry.
pub(crate) enum Flow {
    Next,
    Stop,
}

/// Checks every entry of the gzipped tar `input` and hands it to `visit`,
/// in archive order. Errors are messages naming the entry.
pub(crate) fn walk(
    input: impl Read,
    limits: Limits,
    mut visit: impl FnMut(Entry<'_>) -> Result<Flow, String>,
) -> Result<(), String> {
    let exceeded = Rc::new(Cell::new(false));
    let capped = Capped {
        inner: flate2::read::GzDecoder::new(input),
        left: limits.max_bytes,
        exceeded: Rc::clone(&exceeded),
    };
    let bomb = || {
        format!(
            "unpacks to more than {} bytes (the limit; a gzip bomb?)",
            limits.max_bytes
        )
    };
    let mut archive = tar::Archive::new(capped);
    let entries = archive
        .entries()
        .map_err(|e| format!("not a gzipped tar: {e}"))?;
    let mut seen = HashSet::new();
    for (index, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| {
            if exceeded.get() {
                bomb()
            } else {
                format!("entry {}: not a gzipped tar: {e}", index + 1)
            }
        })?;
        if index >= limits.max_entries {
            return Err(format!(
                "more than {} entries (the limit)",
                limits.max_entries
            ));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = crate::text::printable(&String::from_utf8_lossy(&raw), 120).into_owned();
        let at = |why: String| format!("entry {} `{shown}`: {why}", index + 1);
        let path = check_path(&raw).map_err(at)?;
        let kind = entry.header().entry_type();
        let is_dir = match kind {
            tar::EntryType::Regular => false,
            tar::EntryType::Directory => true,
            other => {
                return Err(at(format!(
                    "{}: only regular files and directories are allowed",
                    describe(other)
                )));
            }
        };
        if path.as_os_str().is_empty() {
            // `./` itself, as `tar -C dir .` writes it.
            if is_dir {
                continue;
            }
            return Err(at("a file without a name".into()));
        }
        if !seen.insert(path.clone()) {
            return Err(at("appears twice".into()));
        }
        let executable = entry.header().mode().is_ok_and(|m| m & 0o100 != 0);
        let flow = visit(Entry {
            path,
            is_dir,
            executable,
            contents: &mut entry,
        });
        match flow {
            Err(_) if exceeded.get() => return Err(bomb()),
            Err(why) => return Err(at(why)),
            Ok(Flow::Stop) => return Ok(()),
            Ok(Flow::Next) => {}
        }
    }
    if exceeded.get() {
        return Err(bomb());
    }
    Ok(())
}

/// A relative path of normal components (a leading `./` allowed), bounded.
fn check_path(raw: &[u8]) -> Result<PathBuf, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "a path that is not UTF-8".to_owned())?;
    if text.len() > MAX_PATH {
        return Err(format!("a path longer than {MAX_PATH} bytes"));
    }
    if text.contains('\0') || text.contains('\\') {
        return Err("a path with a NUL or a backslash".into());
    }
    let mut path = PathBuf::new();
    for component in Path::new(text).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("a path with `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path".into());
            }
        }
    }
    if path.components().count() > MAX_DEPTH {
        return Err(format!("a path deeper than {MAX_DEPTH} directories"));
    }
    Ok(path)
}

fn describe(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Symlink => "a symbolic link".into(),
        tar::EntryType::Link => "a hard link".into(),
        tar::EntryType::Char | tar::EntryType::Block => "a device".into(),
        tar::EntryType::Fifo => "a FIFO".into(),
        other => format!("an entry of type {:?}", other.as_byte() as char),
    }
}

/// Counts what comes out of the decompressor and fails past the cap.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // One byte more tells a stream that ends exactly at the cap
            // from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded.set(true);
            return Err(io::Error::other("over the unpacked size limit"));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks `input` into `dest`, a fresh private directory: files are
/// created new (never through an existing name), `0600` (`0700` with an
/// execute bit), directories `0700`.
pub(crate) fn unpack(input: impl Read, dest: &Path, limits: Limits) -> Result<(), String> {
    walk(input, limits, |entry| {
        let target = dest.join(&entry.path);
        if let Some(parent) = target.parent() {
            create_dirs(dest, parent)?;
        }
        if entry.is_dir {
            create_dirs(dest, &target)?;
            return Ok(Flow::Next);
        }
        let mut file = create_new(&target, entry.executable).map_err(|e| e.to_string())?;
        io::copy(entry.contents, &mut file).map_err(|e| e.to_string())?;
        Ok(Flow::Next)
    })
}

/// The bytes of `name` (a top-level file), without writing anything;
/// `None` if the package has no such file. Every entry up to it is checked.
pub(crate) fn read_one(
    input: impl Read,
    name: &str,
    limits: Limits,
) -> Result<Option<Vec<u8>>, String> {
    let mut found = None;
    walk(input, limits, |entry| {
        if entry.is_dir || entry.path != Path::new(name) {
            return Ok(Flow::Next);
        }
        let mut bytes = Vec::new();
        entry
            .contents
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        found = Some(bytes);
        Ok(Flow::Stop)
    })?;
    Ok(found)
}

fn create_dirs(root: &Path, dir: &Path) -> Result<(), String> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| "outside the package".to_owned())?;
    let mut at = root.to_owned();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return Err(format!("{} is a file and a directory", rel.display())),
            Err(_) => {}
        }
        make_dir(&at).map_err(|e| format!("creating {}: {e}", rel.display()))?;
    }
    Ok(())
}

fn make_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(path)
    }
    #[cfg(not(unix))]
    std::fs::create_dir(path)
}

fn create_new(path: &Path, executable: bool) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(if executable { 0o700 } else { 0o600 })
            .custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = executable;
    options.open(path)
}
