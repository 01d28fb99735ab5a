//! Plugins found outside the plugins directory (a socket in a sockets
//! directory, a registration): their finder makes the manifest, and loads
//! and unloads them here, through the same `install` and unload path as
//! every other plugin. The plugins directory never touches them, and a
//! name one source has is refused to another (`Error::NameTaken`).

use std::sync::Arc;

use super::PluginManager;
use crate::error::Result;
use crate::manifest::Manifest;
use crate::origin::{Found, Origin};
use crate::signing::Seal;
use crate::slot::PluginState;
use crate::version::{Defer, Version};

impl PluginManager {
    /// Loads (or reloads) a found plugin.
    pub(crate) fn load_found(&self, found: Found) -> Result<Arc<Manifest>> {
        let manifest = found.manifest();
        let origin = Origin::Found(Arc::new(found));
        // A name another source has is refused before anything is touched.
        let slot = self.slot_for(&manifest.name, origin.clone())?;
        let _ops = slot.ops();
        if let Origin::Found(known) = &slot.origin() {
            // The slot keeps its first `Found`: it now says what this one does.
            known.set_manifest(manifest.clone());
        }
        slot.status().attempted = Some(origin.fingerprint());
        let Origin::Found(found) = &origin else {
            unreachable!("made above")
        };
        match Version::load(
            manifest,
            &Seal::none(),
            &found.dir,
            &self.inner.options,
            Defer::No,
        )
        .and_then(|version| self.install(&slot, version))
        {
            Ok(manifest) => Ok(manifest),
            Err(error) => {
                self.record_failure(&slot, &error);
                Err(error)
            }
        }
    }

    /// Unloads the found plugin `name` if `by` found it and it serves; its
    /// row stays listed (as `unloaded`), as a removed directory's does.
    pub(crate) fn unload_found(&self, name: &str, by: &str) -> Option<PluginState> {
        let slot = self.slot(name)?;
        match &slot.origin() {
            Origin::Found(found) if found.by == by => self.unload(name).ok(),
            _ => None,
        }
    }
}
