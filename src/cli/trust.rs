//! `--trusted-keys` and `--require-signatures`: which signatures a command
//! checks (see `dynplug::signing`).

use std::path::PathBuf;

use super::config;

/// Which signatures are checked.
#[derive(Debug, Default, Clone, clap::Args)]
pub(crate) struct TrustArgs {
    /// Trust signatures by these keys: a directory of `*.pub` files or a file
    /// of key lines. A signed plugin then loads only if its signature
    /// verifies and its key is trusted.
    #[arg(long, env = "DYNPLUG_TRUSTED_KEYS", value_name = "PATH")]
    pub(crate) trusted_keys: Option<PathBuf>,
    /// Refuse unsigned plugins (needs --trusted-keys).
    #[arg(long, requires = "trusted_keys")]
    pub(crate) require_signatures: bool,
}

impl TrustArgs {
    pub(crate) fn apply(&mut self, config: &config::Config) {
        self.trusted_keys = self
            .trusted_keys
            .take()
            .or_else(|| config.trusted_keys.clone());
        self.require_signatures |= config.require_signatures.unwrap_or(false);
    }

    pub(crate) fn keys(&self) -> anyhow::Result<Vec<dynplug::signing::PublicKey>> {
        match &self.trusted_keys {
            Some(path) => Ok(dynplug::signing::PublicKey::load_all(path)?),
            None => Ok(Vec::new()),
        }
    }
}
