//! Signed plugins: who vouches for a plugin, checked over exactly what is
//! loaded.
//!
//! A signature is an ed25519 signature over three lines:
//!
//! ```text
//! dynplug-signature-v1
//! manifest sha256 <hex of the exact plugin.json bytes>
//! artifact sha256 <hex of the library's bytes, or - for remote_git>
//! ```
//!
//! It travels as `plugin.sig` beside `plugin.json` (and so inside a `.plg`):
//! `{"format": "dynplug-signature-v1", "signer": NAME, "public_key": HEX,
//! "signature": HEX}`. The manifest's digest is taken over the bytes that
//! were parsed, and the artifact's over the bytes the loader loads (the
//! sealed image, or the bytes read once where there is no memfd;
//! `native::open_checked` calls `Trust::check` with them): what is verified
//! is what runs.

mod keys;

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, Verifier as _};
pub use keys::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, Manifest};
pub(crate) use crate::package::SIGNATURE_FILE;

const FORMAT: &str = "dynplug-signature-v1";
/// Largest `plugin.sig` read.
const MAX_SIGNATURE_FILE: u64 = 64 * 1024;

/// Who signed a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Signer {
    /// The key's name: the trusted key file's, else as the signature says.
    pub name: String,
    /// The key's fingerprint (first 16 hex digits of its SHA-256).
    pub fingerprint: String,
    /// Whether the key is among the trusted keys given.
    pub trusted: bool,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let trust = if self.trusted {
            "trusted"
        } else {
            "not trusted"
        };
        write!(f, "{} (key {}, {trust})", self.name, self.fingerprint)
    }
}

/// `plugin.sig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignatureFile {
    format: String,
    signer: String,
    public_key: String,
    signature: String,
}

/// What a plugin's origin says about it, read with its manifest: the digest
/// of the manifest bytes parsed, and the signature file if there is one.
#[derive(Debug, Clone)]
pub(crate) struct Seal {
    manifest_sha256: String,
    signature: Option<std::result::Result<SignatureFile, String>>,
    /// `plugin.sig`, as errors name it.
    path: PathBuf,
}

impl Seal {
    /// The seal of the manifest `bytes` read from `dir`.
    pub(crate) fn read(dir: &Path, manifest_bytes: &[u8]) -> Seal {
        let path = dir.join(SIGNATURE_FILE);
        let signature = match crate::untrusted::read_file(&path, MAX_SIGNATURE_FILE) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(format!("cannot be read: {e}"))),
            Ok(bytes) => {
                Some(serde_json::from_slice(&bytes).map_err(|e| format!("malformed: {e}")))
            }
        };
        Seal {
            manifest_sha256: crate::digest::sha256_hex(manifest_bytes),
            signature,
            path,
        }
    }

    /// No seal: a plugin dynplug neither loads nor executes (a socket it
    /// found or that registered) has no files to sign.
    #[cfg_attr(not(feature = "exec"), allow(dead_code))]
    pub(crate) fn none() -> Seal {
        Seal {
            manifest_sha256: String::new(),
            signature: None,
            path: PathBuf::new(),
        }
    }

    /// The same seal, naming its signature file `path` in errors (an
    /// unpacked package's file by the package).
    pub(crate) fn shown_as(mut self, path: PathBuf) -> Seal {
        self.path = path;
        self
    }

    /// The signature's signer when it verifies over the manifest and
    /// `artifact_sha256`; `None` when unsigned; why not when it does not.
    fn verify(
        &self,
        artifact_sha256: Option<&str>,
    ) -> std::result::Result<Option<PublicKey>, String> {
        let Some((key, signature)) = self.parse()? else {
            return Ok(None);
        };
        let message = message(&self.manifest_sha256, artifact_sha256);
        key.key
            .verify(message.as_bytes(), &signature)
            .map_err(|_| {
                format!(
                    "does not match: the manifest or the artifact changed after key {} signed it",
                    key.fingerprint()
                )
            })?;
        Ok(Some(key))
    }

    /// The key and signature the signature file holds, not yet verified;
    /// `None` when unsigned; why not when it cannot be read or parsed.
    fn parse(&self) -> std::result::Result<Option<(PublicKey, Signature)>, String> {
        let file = match &self.signature {
            None => return Ok(None),
            Some(Err(why)) => return Err(why.clone()),
            Some(Ok(file)) => file,
        };
        if file.format != FORMAT {
            return Err(format!(
                "format `{}` is not {FORMAT}",
                crate::text::printable(&file.format, 64)
            ));
        }
        let key = keys::unhex::<32>(&file.public_key)
            .and_then(|bytes| PublicKey::from_bytes(&bytes, &file.signer))
            .ok_or("public_key: not an ed25519 public key in hex")?;
        let signature = keys::unhex::<64>(&file.signature)
            .map(|bytes| Signature::from_bytes(&bytes))
            .ok_or("signature: not 128 hex digits")?;
        Ok(Some((key, signature)))
    }
}

fn message(manifest_sha256: &str, artifact_sha256: Option<&str>) -> String {
    format!(
        "{FORMAT}\nmanifest sha256 {manifest_sha256}\nartifact sha256 {}\n",
        artifact_sha256.unwrap_or("-")
    )
}

/// A host's trust policy: the keys it trusts, and whether unsigned plugins
/// are refused.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    keys: Vec<PublicKey>,
    require: bool,
    /// Where the keys came from, for messages.
    source: String,
}

impl Trust {
    pub(crate) fn new(keys: Vec<PublicKey>, require: bool, source: String) -> Trust {
        Trust {
            keys,
            require,
            source,
        }
    }

    /// Whether loads check signatures at all (keys given, or required).
    pub(crate) fn is_on(&self) -> bool {
        self.require || !self.keys.is_empty()
    }

    /// Checks the seal against the artifact's digest (of the bytes about to
    /// be loaded): a signature that does not verify, or by a key not
    /// trusted, is refused; so is no signature when signatures are required.
    pub(crate) fn check(
        &self,
        plugin: &str,
        seal: &Seal,
        artifact_sha256: Option<&str>,
    ) -> Result<Option<Signer>> {
        self.judge(plugin, seal, seal.verify(artifact_sha256))
    }

    /// What can be decided before the artifact is read (a plugin loaded on
    /// its first call is registered without a digest of it): no signature
    /// where one is required, a signature file that cannot be read or
    /// parsed, a key not trusted. Whether the signature verifies over the
    /// bytes is [`check`](Self::check)'s, at the load.
    pub(crate) fn precheck(&self, plugin: &str, seal: &Seal) -> Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        let key = seal.parse().map(|parsed| parsed.map(|(key, _)| key));
        self.judge(plugin, seal, key).map(drop)
    }

    /// The policy's verdict on a seal's signer (`None`: unsigned).
    fn judge(
        &self,
        plugin: &str,
        seal: &Seal,
        signer: std::result::Result<Option<PublicKey>, String>,
    ) -> Result<Option<Signer>> {
        let refuse = |reason: String| Error::Signature {
            plugin: plugin.to_owned(),
            path: seal.path.clone(),
            reason,
        };
        match signer.map_err(|why| refuse(format!("signature {why}")))? {
            None if self.require => Err(refuse(format!(
                "not signed, and this host requires signatures (trusted keys: {})",
                self.source
            ))),
            None => Ok(None),
            Some(key) => match self.keys.iter().find(|k| k.key == key.key) {
                Some(trusted) => Ok(Some(Signer {
                    name: trusted.name().to_owned(),
                    fingerprint: trusted.fingerprint(),
                    trusted: true,
                })),
                None => Err(refuse(format!(
                    "signed by key {} (`{}`), which is not among the trusted keys ({})",
                    key.fingerprint(),
                    crate::text::printable(key.name(), 64),
                    self.source
                ))),
            },
        }
    }

    /// The check a load runs on its artifact's digest (`None` when this
    /// host checks no signatures): [`check`](Self::check), logging the signer.
    pub(crate) fn artifact_check<'a>(
        &'a self,
        plugin: &'a str,
        seal: &'a Seal,
    ) -> Option<impl Fn(&str) -> Result<()> + 'a> {
        self.is_on().then_some(move |digest: &str| {
            if let Some(signer) = self.check(plugin, seal, Some(digest))? {
                tracing::info!(plugin, %signer, "signature verified");
            }
            Ok(())
        })
    }

    /// Who signed (verified cryptographically), trusted or not, for `verify`.
    pub(crate) fn signer(
        &self,
        seal: &Seal,
        artifact_sha256: Option<&str>,
    ) -> std::result::Result<Option<Signer>, String> {
        Ok(seal.verify(artifact_sha256)?.map(|key| {
            let trusted = self.keys.iter().find(|k| k.key == key.key);
            Signer {
                name: trusted.map_or_else(|| key.name().to_owned(), |k| k.name().to_owned()),
                fingerprint: key.fingerprint(),
                trusted: trusted.is_some(),
            }
        }))
    }
}

/// Signs the plugin directory `dir`: writes `plugin.sig` over its
/// `plugin.json` and its artifact (replacing an older signature).
///
/// # Errors
/// [`Error::Io`] when a file cannot be read or written, [`Error::Manifest`]
/// for an invalid manifest.
pub fn sign_dir(dir: impl AsRef<Path>, key: &SecretKey) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let file = signature_for(dir, key)?;
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    bytes.push(b'\n');
    crate::package::write_atomically(dir, SIGNATURE_FILE, &bytes).map_err(|source| Error::Io {
        plugin: String::new(),
        action: "writing",
        path: dir.join(SIGNATURE_FILE),
        source,
    })
}

/// The signature of the plugin in `dir` by `key`.
fn signature_for(dir: &Path, key: &SecretKey) -> Result<SignatureFile> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let read = |path: &Path, limit| {
        crate::untrusted::read_file(path, limit).map_err(|source| Error::Io {
            plugin: String::new(),
            action: "reading",
            path: path.to_owned(),
            source,
        })
    };
    let bytes = read(&manifest_path, crate::untrusted::MAX_MANIFEST_BYTES)?;
    let manifest = Manifest::parse(&bytes, &manifest_path, "")?;
    let artifact = match manifest.artifact_path(dir) {
        Some(path) => Some(crate::digest::sha256_hex(&read(
            &path,
            crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES,
        )?)),
        None => None,
    };
    let message = message(&crate::digest::sha256_hex(&bytes), artifact.as_deref());
    let public = key.public();
    Ok(SignatureFile {
        format: FORMAT.into(),
        signer: public.name().to_owned(),
        public_key: public.to_hex(),
        signature: keys::hex(&key.key.sign(message.as_bytes()).to_bytes()),
    })
}

/// Signs the package at `path` in place: unpacks it (every rule of the
/// plugins directory applies), signs its manifest and artifact, and writes
/// the package again with `plugin.sig`, atomically.
///
/// # Errors
/// As [`sign_dir`], and [`Error::Package`] for a package that breaks a rule.
pub fn sign_package(path: impl AsRef<Path>, key: &SecretKey) -> Result<PathBuf> {
    let path = path.as_ref();
    let out_dir = path.parent().unwrap_or(Path::new("."));
    let root = out_dir.join(format!(".dynplug-sign-{}", std::process::id()));
    let unpacked = crate::package::Unpacked::new(
        path,
        &root,
        crate::package::Limits::for_library(crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES),
    );
    let result = unpacked.and_then(|unpacked| {
        // Packing fills in `source.sha256` when missing, which changes the
        // manifest: normalise first, then sign what will be shipped.
        let normal = crate::package::pack(unpacked.dir(), &root)?;
        let again = crate::package::Unpacked::new(
            &normal.path,
            &root,
            crate::package::Limits::for_library(crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES),
        )?;
        sign_dir(again.dir(), key)?;
        let packed = crate::package::pack(again.dir(), out_dir)?;
        Ok(packed.path)
    });
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// Who signed the plugin directory `dir`, checked over its files, trusted
/// or not by `trusted`; `None` if it is not signed.
///
/// # Errors
/// [`Error::Signature`] when the signature does not verify, [`Error::Io`]
/// or [`Error::Manifest`] when the plugin cannot be read.
pub fn signer_of(dir: impl AsRef<Path>, trusted: &[PublicKey]) -> Result<Option<Signer>> {
    let dir = dir.as_ref();
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = crate::untrusted::read_file(&manifest_path, crate::untrusted::MAX_MANIFEST_BYTES)
        .map_err(|source| Error::Io {
        plugin: String::new(),
        action: "reading",
        path: manifest_path.clone(),
        source,
    })?;
    let manifest = Manifest::parse(&bytes, &manifest_path, "")?;
    let artifact = match manifest.artifact_path(dir) {
        Some(path) => Some(crate::digest::sha256_hex(
            &crate::untrusted::read_file(&path, crate::untrusted::DEFAULT_MAX_LIBRARY_BYTES)
                .map_err(|source| Error::Io {
                    plugin: manifest.name.clone(),
                    action: "reading",
                    path: path.clone(),
                    source,
                })?,
        )),
        None => None,
    };
    let seal = Seal::read(dir, &bytes);
    let trust = Trust::new(trusted.to_vec(), false, String::new());
    trust
        .signer(&seal, artifact.as_deref())
        .map_err(|why| Error::Signature {
            plugin: manifest.name.clone(),
            path: dir.join(SIGNATURE_FILE),
            reason: format!("signature {why}"),
        })
}

#[cfg(test)]
mod tests;
