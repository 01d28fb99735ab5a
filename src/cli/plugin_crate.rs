//! A plugin crate (`Cargo.toml` + `plugin.json`, as `dynplug new` writes
//! it): built with cargo, and staged as a plugin directory for `pack`,
//! `install` and `dev`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use dynplug::Manifest;

#[derive(Clone)]
pub(crate) struct PluginCrate {
    pub(crate) dir: PathBuf,
}

/// A build that did not produce a library: the compiler's last lines.
#[derive(Debug)]
pub(crate) struct BuildFailed(pub(crate) String);

/// How many of cargo's last output lines a failure shows.
const TAIL_LINES: usize = 40;

impl PluginCrate {
    /// Whether `dir` looks like a plugin crate.
    pub(crate) fn is_crate(dir: &Path) -> bool {
        dir.join("Cargo.toml").is_file() && dir.join("plugin.json").is_file()
    }

    pub(crate) fn open(dir: &Path) -> anyhow::Result<PluginCrate> {
        if !PluginCrate::is_crate(dir) {
            bail!(
                "{} is not a plugin crate: it needs a Cargo.toml and a plugin.json (see `dynplug new`)",
                dir.display()
            );
        }
        Ok(PluginCrate {
            dir: dir.canonicalize()?,
        })
    }

    /// The manifest as it is now (it may change between builds).
    pub(crate) fn manifest(&self) -> anyhow::Result<Manifest> {
        let path = self.dir.join("plugin.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Manifest::parse(&bytes, &path, "")?)
    }

    /// `cargo build` (`--release` if asked): the cdylib it produced (the
    /// executable, for an exec plugin), or the
    /// compiler's last lines. Diagnostics are also shown on our stderr when
    /// `show` is set.
    pub(crate) fn build(&self, release: bool, show: bool) -> Result<PathBuf, BuildFailed> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .current_dir(&self.dir)
            .args(["build", "--message-format=json-render-diagnostics"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if release {
            command.arg("--release");
        }
        let output = command
            .output()
            .map_err(|e| BuildFailed(format!("running cargo: {e}")))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if show {
            eprint!("{stderr}");
        }
        if !output.status.success() {
            return Err(BuildFailed(tail(&stderr, TAIL_LINES)));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let exec = self
            .manifest()
            .is_ok_and(|m| matches!(m.source, dynplug::manifest::Source::Exec { .. }));
        if exec {
            return executable_of(&stdout).ok_or_else(|| {
                BuildFailed("cargo built no executable: an exec plugin crate needs a binary".into())
            });
        }
        cdylib_of(&stdout).ok_or_else(|| {
            BuildFailed(
                "cargo built no cdylib: the crate needs `[lib] crate-type = [\"cdylib\"]`".into(),
            )
        })
    }

    /// Puts `plugin.json` and `library` (under the name the manifest
    /// gives) in `<parent>/<name>`, replacing it with two renames so a
    /// watching host sees one change.
    pub(crate) fn stage(&self, library: &Path, parent: &Path) -> anyhow::Result<PathBuf> {
        let manifest = self.manifest()?;
        let dest = parent.join(&manifest.name);
        let staging = parent.join(format!(".{}.staging-{}", manifest.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        std::fs::copy(self.dir.join("plugin.json"), staging.join("plugin.json"))?;
        // The library of `local_so`, the executable of `exec` (copied with
        // its execute bit).
        let target = manifest
            .artifact_path(&staging)
            .filter(|path| path.starts_with(&staging))
            .context("plugin.json must say source.mode \"local_so\" or \"exec\" (with a relative path) for a crate")?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(library, &target)
            .with_context(|| format!("copying {}", library.display()))?;
        replace_dir(&staging, &dest)?;
        Ok(dest)
    }
}

/// Moves `staging` onto `dest`: the old directory renamed away to a dot
/// name first, then the new one renamed in, then the old one removed.
pub(crate) fn replace_dir(staging: &Path, dest: &Path) -> anyhow::Result<()> {
    let name = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let old = dest.with_file_name(format!(".{name}.old-{}", std::process::id()));
    let had_old = std::fs::rename(dest, &old).is_ok();
    std::fs::rename(staging, dest)
        .with_context(|| format!("renaming {} to {}", staging.display(), dest.display()))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The cdylib of the last `compiler-artifact` message cargo printed.
fn cdylib_of(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .filter_map(|m| {
            m["filenames"].as_array()?.iter().find_map(|f| {
                let f = f.as_str()?;
                f.ends_with(std::env::consts::DLL_SUFFIX)
                    .then(|| PathBuf::from(f))
            })
        })
        .next_back()
}

/// The executable of the last `compiler-artifact` message that has one.
fn executable_of(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A private scratch directory, removed when dropped.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(what: &str) -> anyhow::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dynplug-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
