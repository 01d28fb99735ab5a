//! `source.mode = "remote_git"`: a plugin built by the host from a git
//! repository, then loaded as a native plugin.
//!
//! Each repository gets a directory in the build cache: a mirror (`git
//! clone --mirror`, fetched again at every load so a moved branch is
//! picked up), and one build per commit and package, kept. A load
//! resolves `rev` in the mirror; a commit already built loads from the
//! cache, with no network and no compiler (a failed fetch only warns). A
//! build runs on the loading thread (never the serving one: the version
//! serving keeps serving) and holds no lock but its plugin's, under a
//! timeout that kills the whole process group.

mod git;
mod run;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Source};

/// Where and how long builds run.
#[derive(Debug, Clone)]
pub(crate) struct BuildOptions {
    pub(crate) cache: PathBuf,
    pub(crate) timeout: Duration,
}

impl BuildOptions {
    /// `$XDG_CACHE_HOME/dynplug/builds`, else `~/.cache/dynplug/builds`,
    /// else `<base>/.dynplug/builds`: outside the plugins directory when
    /// possible, so the watcher does not see cargo's writes.
    pub(crate) fn default_cache(base: &Path) -> PathBuf {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|cache| cache.join("dynplug").join("builds"))
            .unwrap_or_else(|| base.join(".dynplug").join("builds"))
    }
}

/// A `remote_git` plugin, built: the directory of its library, and the
/// `local_so` manifest to load it with.
pub(crate) struct Built {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
}

/// The file a finished build leaves beside its library, naming it.
const DONE: &str = "library-name";
/// How many of cargo's last lines a failed build reports.
const TAIL: usize = 20;

/// Builds (or finds in the cache) the plugin of a `remote_git` manifest.
pub(crate) fn build(manifest: &Manifest, dir: &Path, options: &BuildOptions) -> Result<Built> {
    let Source::RemoteGit { path, rev, package } = &manifest.source else {
        unreachable!("Version::load sends only remote_git manifests here");
    };
    let fail = |message: String| Error::Build {
        plugin: manifest.name.clone(),
        source_path: path.clone(),
        message,
    };
    let url = git::url(path, dir);
    let repo = options
        .cache
        .join(&crate::digest::sha256_hex(url.as_bytes())[..16]);
    crate::private_dir::ensure(&repo, false).map_err(|e| fail(format!("cache: {e}")))?;
    let mirror = git::Mirror::update(&url, &repo, options.timeout).map_err(fail)?;
    let rev = rev.as_deref().unwrap_or("HEAD");
    let commit = mirror.resolve(rev).map_err(fail)?;
    let package = package.clone().unwrap_or_else(|| manifest.name.clone());
    let out = repo.join("builds").join(format!("{commit}-{package}"));
    let library = match std::fs::read_to_string(out.join(DONE)) {
        Ok(name) => {
            tracing::info!(plugin = %manifest.name, %commit, "build found in the cache");
            name
        }
        Err(_) => {
            tracing::info!(plugin = %manifest.name, %commit, "building");
            compile(&mirror, &commit, &package, &repo, &out, options.timeout).map_err(fail)?
        }
    };
    let mut local = manifest.clone();
    local.source = Source::LocalSo {
        path: library,
        sha256: None,
    };
    Ok(Built {
        dir: out,
        manifest: local,
    })
}

/// Checks out `commit`, builds `package`, and keeps its library in `out`
/// (written aside, then renamed); returns the library's file name.
fn compile(
    mirror: &git::Mirror,
    commit: &str,
    package: &str,
    repo: &Path,
    out: &Path,
    timeout: Duration,
) -> std::result::Result<String, String> {
    let src = repo.join(format!("src-{commit}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&src);
    let built = mirror.checkout(commit, &src, timeout).and_then(|()| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = std::process::Command::new(cargo);
        command.current_dir(&src).args([
            "build",
            "--release",
            "--lib",
            "--message-format=json-render-diagnostics",
            "-p",
            package,
        ]);
        // A target directory per repository, kept across commits, unless the
        // caller chose one.
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            command.env("CARGO_TARGET_DIR", repo.join("target"));
        }
        let output = run::run(&mut command, timeout)?;
        if !output.success {
            return Err(format!(
                "cargo build --release -p {package} failed at {commit}:\n{}",
                crate::text::printable(&tail(&output.stderr, TAIL), 8192)
            ));
        }
        cdylib_of(&output.stdout)
            .ok_or_else(|| format!("cargo built no cdylib for package `{package}`"))
    });
    let _ = std::fs::remove_dir_all(&src);
    let library = built?;
    let name = library
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("the library has no file name")?;
    let staging = out.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let kept = std::fs::create_dir_all(&staging)
        .and_then(|()| std::fs::copy(&library, staging.join(&name)).map(drop))
        .and_then(|()| std::fs::write(staging.join(DONE), &name))
        .and_then(|()| match std::fs::rename(&staging, out) {
            // Another load built the same commit meanwhile: keep theirs.
            Err(_) if out.join(DONE).is_file() => std::fs::remove_dir_all(&staging),
            other => other,
        });
    kept.map_err(|e| format!("keeping the build in {}: {e}", out.display()))?;
    Ok(name)
}

/// The cdylib of cargo's `compiler-artifact` messages.
fn cdylib_of(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            m["filenames"].as_array()?.iter().find_map(|f| {
                let f = f.as_str()?;
                f.ends_with(std::env::consts::DLL_SUFFIX)
                    .then(|| PathBuf::from(f))
            })
        })
        .next_back()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
