//! `dynplug install SOURCE`: a plugin directory, a plugin crate, a `.plg`
//! file, an `http(s)://` URL of a `.plg`, or a git repository, put into the
//! plugins directory atomically (written under a dot name, then renamed),
//! so a watching host takes it whole.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::plugin_crate::{PluginCrate, Scratch, replace_dir, tail};

/// What SOURCE names.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Dir(PathBuf),
    Crate(PathBuf),
    Package(PathBuf),
    Url(String),
    Git(String),
}

impl Source {
    fn of(text: &str) -> anyhow::Result<Source> {
        if let Some(url) = text.strip_prefix("git+") {
            return Ok(Source::Git(url.to_owned()));
        }
        if text.starts_with("git@") || text.starts_with("ssh://") || text.starts_with("git://") {
            return Ok(Source::Git(text.to_owned()));
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            return Ok(if text.ends_with(".git") {
                Source::Git(text.to_owned())
            } else {
                Source::Url(text.to_owned())
            });
        }
        let path = PathBuf::from(text);
        if path.is_file() {
            return Ok(Source::Package(path));
        }
        if PluginCrate::is_crate(&path) {
            return Ok(Source::Crate(path));
        }
        if path.join("plugin.json").is_file() {
            return Ok(Source::Dir(path));
        }
        if path.join(".git").exists() {
            return Ok(Source::Git(text.to_owned()));
        }
        bail!(
            "{text}: not a plugin directory, plugin crate, .plg file, http(s) URL or git repository"
        )
    }
}

/// Longest a download or a clone may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Installs SOURCE into `plugins`; returns what now holds the plugin.
pub(crate) fn install(source: &str, rev: Option<&str>, plugins: &Path) -> anyhow::Result<PathBuf> {
    let max = dynplug::package::DEFAULT_MAX_LIBRARY_SIZE;
    match Source::of(source)? {
        Source::Dir(dir) => install_dir(&dir, plugins),
        Source::Package(path) => {
            let bytes = read_bounded(&path, max)?;
            Ok(dynplug::package::install(&bytes, plugins, max)?.path)
        }
        Source::Url(url) => {
            let bytes = download(&url, max)?;
            Ok(dynplug::package::install(&bytes, plugins, max)
                .with_context(|| format!("installing the package from {url}"))?
                .path)
        }
        Source::Crate(dir) => install_crate(&PluginCrate::open(&dir)?, plugins, max),
        Source::Git(url) => {
            let scratch = Scratch::new("install")?;
            let checkout = scratch.0.join("src");
            clone(&url, rev, &checkout)?;
            let krate = PluginCrate::open(&checkout)
                .with_context(|| format!("the repository {url} at its root"))?;
            install_crate(&krate, plugins, max)
        }
    }
}

/// Builds the crate in release mode, packs it, installs the package.
fn install_crate(krate: &PluginCrate, plugins: &Path, max: u64) -> anyhow::Result<PathBuf> {
    eprintln!("building {}", krate.dir.display());
    let library = krate
        .build(true, false)
        .map_err(|failed| anyhow::anyhow!("cargo build failed:\n{}", failed.0))?;
    let scratch = Scratch::new("pack")?;
    let staged = krate.stage(&library, &scratch.0)?;
    let packed = dynplug::package::pack(&staged, &scratch.0)?;
    let bytes = read_bounded(&packed.path, max)?;
    Ok(dynplug::package::install(&bytes, plugins, max)?.path)
}

/// Copies a plugin directory in under a dot name, then renames it into place.
fn install_dir(dir: &Path, plugins: &Path) -> anyhow::Result<PathBuf> {
    let manifest = dynplug::Manifest::from_dir(&dir.canonicalize()?)?;
    let dest = plugins.join(&manifest.name);
    let staging = plugins.join(format!(".{}.install-{}", manifest.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    copy_tree(dir, &staging).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&staging);
    })?;
    replace_dir(&staging, &dest)?;
    Ok(dest)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(&name))?;
        } else {
            bail!(
                "{}: not a regular file or directory",
                entry.path().display()
            );
        }
    }
    Ok(())
}

fn read_bounded(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        bail!("{}: larger than {max} bytes", path.display());
    }
    Ok(bytes)
}

/// GETs `url` (following redirects), at most `max` bytes.
fn download(url: &str, max: u64) -> anyhow::Result<Vec<u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?;
    response
        .body_mut()
        .with_config()
        .limit(max)
        .read_to_vec()
        .with_context(|| format!("downloading {url}"))
}

/// `git clone` of `url` into `dest`, at `rev` if given.
fn clone(url: &str, rev: Option<&str>, dest: &Path) -> anyhow::Result<()> {
    let git = |args: &[&str], dir: Option<&Path>| -> anyhow::Result<()> {
        let mut command = Command::new("git");
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let output = command
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .output()
            .context("running git")?;
        if !output.status.success() {
            bail!(
                "git {} failed: {}",
                args.first().unwrap_or(&""),
                tail(&String::from_utf8_lossy(&output.stderr), 10)
            );
        }
        Ok(())
    };
    let dest_text = dest.to_string_lossy();
    git(&["clone", "--quiet", "--", url, &dest_text], None)?;
    if let Some(rev) = rev {
        git(&["checkout", "--quiet", rev, "--"], Some(dest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_told_apart() {
        assert_eq!(
            Source::of("https://example.com/hello-1.0.0.plg").unwrap(),
            Source::Url("https://example.com/hello-1.0.0.plg".into())
        );
        assert_eq!(
            Source::of("https://example.com/hello.git").unwrap(),
            Source::Git("https://example.com/hello.git".into())
        );
        assert_eq!(
            Source::of("git+file:///srv/hello").unwrap(),
            Source::Git("file:///srv/hello".into())
        );
        assert!(Source::of("/nonexistent/x").is_err());
    }
}
