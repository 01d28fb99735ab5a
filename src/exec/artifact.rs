//! The executable of an exec plugin: checked, then copied where nobody else
//! can write, and run from there.
//!
//! The reference (goplugin) checks the MD5 of one file and runs another, so
//! what runs is not what was checked. Here the file is read once (a regular
//! file, bounded), the checksum is computed over those bytes, and exactly
//! those bytes are written to a new file (`O_EXCL`, no symlink followed,
//! mode 0500) in a private directory; that copy is what is executed, on
//! every restart of the version.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Source};

/// What was checked, with the bytes to run.
pub(crate) struct Checked {
    /// The executable as the manifest names it, resolved in the plugin directory.
    pub(crate) path: PathBuf,
    pub(crate) bytes: Vec<u8>,
    /// What the file is, in words (`dynplug verify` prints it).
    pub(crate) what: String,
}

/// The private copy of a version's executable; removed when dropped.
#[derive(Debug)]
pub(crate) struct Executable {
    /// The copy, which is executed.
    pub(crate) copy: PathBuf,
    /// The file as the manifest names it: `argv[0]` and messages.
    pub(crate) original: PathBuf,
}

impl Drop for Executable {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.copy);
    }
}

/// Checks the executable an exec manifest names: its directory and itself
/// not writable by every user, a regular file with an execute bit, within
/// `max_size`, its checksums, and that it is an ELF for this machine or a
/// `#!` script whose interpreter exists.
/// `signature`, when given, is the caller's check of the bytes read (their
/// SHA-256), before anything else looks at them.
pub(crate) fn check(
    manifest: &Manifest,
    dir: &Path,
    max_size: u64,
    signature: Option<&crate::native::ArtifactCheck<'_>>,
) -> Result<Checked> {
    let plugin = manifest.name.clone();
    let Source::Exec { sha256, md5, .. } = &manifest.source else {
        unreachable!("only exec manifests are checked here");
    };
    let path = manifest
        .artifact_path(dir)
        .expect("exec manifests name an executable");
    let io = |source| Error::Io {
        plugin: plugin.clone(),
        action: "reading",
        path: path.clone(),
        source,
    };
    let refuse = |reason: String| Error::Start {
        plugin: plugin.clone(),
        path: path.clone(),
        reason,
        stderr: Vec::new(),
    };
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
    if let Some(why) = [dir, &manifest_path, &path]
        .into_iter()
        .find_map(crate::private_dir::world_writable)
    {
        return Err(Error::Insecure {
            plugin,
            path: path.clone(),
            reason: why,
        });
    }
    let file = crate::untrusted::open_regular(&path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io)?.permissions().mode();
        if mode & 0o111 == 0 {
            return Err(refuse(format!(
                "not executable (mode {:04o}): give it an execute bit (chmod +x)",
                mode & 0o7777
            )));
        }
    }
    drop(file);
    let bytes = crate::untrusted::read_file(&path, max_size).map_err(io)?;
    if let Some(signature) = signature {
        signature(&crate::digest::sha256_hex(&bytes))?;
    }
    let mut checked = Vec::new();
    if let Some(expected) = sha256 {
        let found = crate::digest::sha256_hex(&bytes);
        if !crate::digest::digests_equal(expected, &found) {
            return Err(Error::Checksum {
                plugin,
                path,
                algorithm: "sha256",
                expected: expected.clone(),
                found,
            });
        }
        checked.push("sha256");
    }
    if let Some(expected) = md5 {
        let found = crate::digest::md5_hex(&bytes);
        if !crate::digest::digests_equal(expected, &found) {
            return Err(Error::Checksum {
                plugin,
                path,
                algorithm: "md5",
                expected: expected.clone(),
                found,
            });
        }
        checked.push("md5");
    }
    let kind = sniff(&bytes).map_err(refuse)?;
    let what = match checked.as_slice() {
        [] => format!("{kind}, {} bytes, no checksum in the manifest", bytes.len()),
        sums => format!(
            "{kind}, {} bytes, {} verified",
            bytes.len(),
            sums.join(" and ")
        ),
    };
    Ok(Checked { path, bytes, what })
}

/// What the bytes are, if this machine can run them.
fn sniff(bytes: &[u8]) -> std::result::Result<String, String> {
    if let Some(rest) = bytes.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let interpreter = line.split_whitespace().next().unwrap_or_default();
        if interpreter.is_empty() {
            return Err("a `#!` line without an interpreter".into());
        }
        let shown = crate::text::printable(interpreter, 120);
        match std::fs::metadata(interpreter) {
            Ok(meta) if meta.is_file() => Ok(format!("a script for {shown}")),
            _ => Err(format!("its `#!` interpreter {shown} does not exist")),
        }
    } else if bytes.starts_with(b"\x7fELF") {
        use object::Object;
        let file = object::File::parse(bytes)
            .map_err(|e| format!("not a complete ELF executable: {e}"))?;
        let found = file.architecture();
        match crate::native::host_architecture() {
            Some(host) if host != found => Err(format!(
                "an executable for {found:?}, but this machine is {host:?}"
            )),
            _ => Ok(format!("an ELF executable for {found:?}")),
        }
    } else {
        Err("neither an ELF executable nor a `#!` script".into())
    }
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A name for a file of this process in the work directory:
/// `<plugin>.<pid>.<n><suffix>` (what `remove_stale` recognises).
pub(crate) fn private_name(plugin: &str, suffix: &str) -> String {
    format!(
        "{plugin}.{}.{}{suffix}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes the checked bytes to a new private copy in `work_dir`.
pub(crate) fn install(checked: Checked, plugin: &str, work_dir: &Path) -> Result<Executable> {
    crate::private_dir::ensure(work_dir, false).map_err(|e| Error::Insecure {
        plugin: plugin.to_owned(),
        path: work_dir.to_owned(),
        reason: e.to_string(),
    })?;
    let copy = work_dir.join(private_name(plugin, ""));
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o500).custom_flags(libc::O_NOFOLLOW);
        }
        // The descriptor is closed before anything runs the copy: a
        // file open for writing cannot be executed (ETXTBSY).
        let mut file = options.open(&copy)?;
        file.write_all(&checked.bytes)
    };
    if let Err(source) = write() {
        let _ = std::fs::remove_file(&copy);
        return Err(Error::Io {
            plugin: plugin.to_owned(),
            action: "writing the private copy",
            path: copy,
            source,
        });
    }
    Ok(Executable {
        copy,
        original: checked.path,
    })
}

/// Removes what dead processes left in the work directory (copies and
/// sockets named by `private_name`, owned by us).
#[cfg(target_os = "linux")]
pub(crate) fn remove_stale(work_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(pid_of) else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.uid() == me && !m.is_dir());
        if ours && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Without `/proc`, a live process cannot be told from a dead one.
#[cfg(not(target_os = "linux"))]
pub(crate) fn remove_stale(_work_dir: &Path) {}

/// The pid in a name `private_name` made.
fn pid_of(name: &str) -> Option<u32> {
    let name = name.strip_suffix(".sock").unwrap_or(name);
    let mut parts = name.rsplitn(3, '.');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse().ok()?;
    crate::manifest::is_path_safe(parts.next()?).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        let name = private_name("my.plugin", ".sock");
        assert_eq!(pid_of(&name), Some(std::process::id()));
        assert_eq!(pid_of("x.12.3"), Some(12));
        assert_eq!(pid_of("x.12"), None);
        assert_eq!(pid_of("../x.12.3"), None);
    }

    #[test]
    fn only_elf_for_this_machine_and_scripts_run() {
        assert!(sniff(b"#!/bin/sh\necho").unwrap().contains("/bin/sh"));
        assert!(
            sniff(b"#!/no/such/python\n")
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(sniff(b"MZ\x90\x00").unwrap_err().contains("neither"));
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(sniff(&me).unwrap().starts_with("an ELF executable"));
        assert!(sniff(&me[..64]).is_err());
    }
}
