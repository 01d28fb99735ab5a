//! `dynplug demo`: the README's first command, from a source checkout:
//! build the sample plugins (native and exec), then serve them (see
//! `serve.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use dynplug::Manifest;

const SAMPLES: &[&str] = &["hello", "counter", "exec-rest", "exec-grpc"];

/// Builds the sample plugins in release mode and installs them as plugin
/// directories under `target/demo-plugins`.
pub(crate) fn build_samples() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("sample-plugins").is_dir() {
        bail!(
            "demo needs the dynplug source checkout at {}",
            root.display()
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(root).args(["build", "--release"]);
    for name in SAMPLES {
        build.args(["-p", name]);
    }
    eprintln!("building sample plugins: {}", SAMPLES.join(", "));
    let status = build.status().context("running cargo")?;
    if !status.success() {
        bail!("cargo build of the sample plugins failed ({status})");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let plugins = target.join("demo-plugins");
    for name in SAMPLES {
        install(
            &root.join("sample-plugins").join(name),
            &target.join("release"),
            &plugins.join(name),
        )?;
    }
    Ok(plugins)
}

/// Copies a sample's `plugin.json` and artifact (library or executable)
/// into `dest`, write-then-rename
/// so a watching host never sees half a plugin.
fn install(crate_dir: &Path, built: &Path, dest: &Path) -> anyhow::Result<()> {
    let name = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let manifest_path = crate_dir.join("plugin.json");
    let bytes = std::fs::read(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&bytes, &manifest_path, &name)?;
    let library = manifest
        .artifact_path(built)
        .context("sample plugins run from a file")?;
    let staging = dest.with_file_name(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    std::fs::copy(&manifest_path, staging.join("plugin.json"))?;
    let file_name = library.file_name().context("library file name")?;
    std::fs::copy(&library, staging.join(file_name))
        .with_context(|| format!("copying {}", library.display()))?;
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&staging, dest)?;
    Ok(())
}
