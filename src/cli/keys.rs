//! `dynplug keygen` and `dynplug sign`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dynplug::signing::{SecretKey, sign_dir, sign_package};

/// Writes `out` (default `NAME.key`) and `out.pub`.
pub(crate) fn keygen(name: &str, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.key")));
    let key = SecretKey::generate(name)?;
    key.save(&out)?;
    println!(
        "{} (secret: keep it private) and {}.pub (give it to hosts), key {}",
        out.display(),
        out.display(),
        key.public().fingerprint()
    );
    Ok(ExitCode::SUCCESS)
}

/// Signs a plugin directory, or a package in place.
pub(crate) fn sign(key: &Path, path: &Path) -> anyhow::Result<ExitCode> {
    let key = SecretKey::load(key)?;
    let signed = if path.is_file() {
        sign_package(path, &key)?
    } else {
        sign_dir(path, &key)?
    };
    println!(
        "{} signed by {} (key {})",
        signed.display(),
        key.public().name(),
        key.public().fingerprint()
    );
    Ok(ExitCode::SUCCESS)
}
