//! What the host hands a runner: the manifest, the settings of the load,
//! and the library's checked bytes, in one sealed memfd that becomes the
//! runner's standard input.
//!
//! Nothing is read from the plugin directory by the runner: a restart
//! loads the very bytes the host checked when the version was loaded, even
//! if the file in the plugin directory has been replaced since (that is a
//! new version, loaded by the watcher). The runner reads the memfd with
//! `pread`, so the offset every restart shares stays at 0.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::manifest::{Limits, Manifest};

const MAGIC: &[u8; 8] = b"DYNPROC\0";
/// The largest spec (the manifest is at most 1 MiB).
const MAX_SPEC: usize = 4 * 1024 * 1024;

/// The load, as the runner carries it out.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Spec {
    /// The host's process protocol version (`wire::VERSION`).
    pub(crate) wire: u32,
    /// The host's plugin ABI, `(major, minor)`.
    pub(crate) abi: (u32, u32),
    pub(crate) manifest: Manifest,
    /// The plugin directory (the runner's working directory, and the name
    /// of its memfd in `/proc/<pid>/maps`).
    pub(crate) dir: PathBuf,
    /// Where a private copy goes if the runner cannot use a memfd.
    pub(crate) shadow_dir: PathBuf,
    pub(crate) max_library_size: u64,
    pub(crate) init_timeout_ms: u64,
    pub(crate) shutdown_timeout_ms: u64,
    pub(crate) limits: Limits,
}

/// Writes `spec` and the library's `bytes` into a sealed memfd.
#[cfg(target_os = "linux")]
pub(crate) fn seal(spec: &Spec, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let json = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
    let name = format!("dynplug-runner:{}", spec.manifest.name);
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(MAGIC)?;
    file.write_all(&(json.len() as u32).to_le_bytes())?;
    file.write_all(&json)?;
    file.write_all(bytes)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(file.into())
}

/// Reads what [`seal`] wrote from `fd` (the runner's standard input).
pub(crate) fn read(fd: OwnedFd) -> std::io::Result<(Spec, Vec<u8>)> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let file = std::fs::File::from(fd);
    let len = file.metadata()?.len();
    let mut head = [0u8; 12];
    file.read_exact_at(&mut head, 0)?;
    if &head[..8] != MAGIC {
        return Err(invalid(
            "standard input is not a load from a dynplug host (the runner is started by the host)",
        ));
    }
    let spec_len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
    if spec_len > MAX_SPEC || 12 + spec_len as u64 > len {
        return Err(invalid("a load whose spec is cut short"));
    }
    let mut json = vec![0u8; spec_len];
    file.read_exact_at(&mut json, 12)?;
    let spec: Spec = serde_json::from_slice(&json).map_err(std::io::Error::other)?;
    let library_len = usize::try_from(len - 12 - spec_len as u64)
        .map_err(|_| invalid("a library too large for this machine"))?;
    if library_len as u64 > spec.max_library_size {
        return Err(invalid("a library over the size limit"));
    }
    let mut bytes = vec![0u8; library_len];
    file.read_exact_at(&mut bytes, 12 + spec_len as u64)?;
    Ok((spec, bytes))
}
