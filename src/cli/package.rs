//! `dynplug pack` and `dynplug verify`: packages made and checked.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;

use super::trust::TrustArgs;

/// `dynplug pack`: a crate is built (release) and staged first.
pub(crate) fn pack(path: &Path, out: &Path) -> anyhow::Result<dynplug::package::Packed> {
    if super::plugin_crate::PluginCrate::is_crate(path) {
        let krate = super::plugin_crate::PluginCrate::open(path)?;
        eprintln!("building {}", krate.dir.display());
        let library = krate
            .build(true, false)
            .map_err(|failed| anyhow::anyhow!("cargo build failed:\n{}", failed.0))?;
        let scratch = super::plugin_crate::Scratch::new("pack")?;
        let staged = krate.stage(&library, &scratch.0)?;
        return Ok(dynplug::package::pack(&staged, out)?);
    }
    Ok(dynplug::package::pack(path, out)?)
}

/// `dynplug verify`: the load checks, then who signed it.
pub(crate) fn verify(path: &Path, trust: &TrustArgs) -> anyhow::Result<ExitCode> {
    let scratch;
    let dir = if path.is_file() {
        scratch = super::plugin_crate::Scratch::new("verify")?;
        dynplug::package::unpack(path, &scratch.0)?
    } else {
        path.to_owned()
    };
    let verified = dynplug::verify_report(&dir)?;
    let manifest = &verified.manifest;
    let keys = trust.keys()?;
    let signer = dynplug::signing::signer_of(&dir, &keys)?;
    let signed = match &signer {
        Some(signer) => format!("signed by {signer}"),
        None => "not signed".to_owned(),
    };
    if trust.trusted_keys.is_some() && signer.as_ref().is_some_and(|s| !s.trusted) {
        bail!("{}: {signed}: not among the trusted keys", path.display());
    }
    if trust.require_signatures && signer.is_none() {
        bail!(
            "{}: not signed, and signatures are required",
            path.display()
        );
    }
    println!(
        "ok: {} {} ({}, {}; {}; {signed})",
        manifest.name,
        manifest.version,
        manifest.source.mode(),
        manifest.isolation.as_str(),
        verified.checked
    );
    Ok(ExitCode::SUCCESS)
}
