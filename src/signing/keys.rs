//! Ed25519 keys and their files: one line each, so a trusted-keys file is
//! a list of lines and a directory of `*.pub` files is the same thing.
//!
//! ```text
//! dynplug-ed25519-public <64 hex digits> <name>
//! dynplug-ed25519-secret <64 hex digits> <name>     (mode 0600)
//! ```

use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::{Error, Result};

const PUBLIC_TAG: &str = "dynplug-ed25519-public";
const SECRET_TAG: &str = "dynplug-ed25519-secret";

/// Longest key file read, in bytes (a trusted-keys file of many keys).
const MAX_KEY_FILE: u64 = 1024 * 1024;

/// A public key that signatures are checked against, with the name its
/// owner gave it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub(crate) key: VerifyingKey,
    name: String,
}

/// A secret key that signs plugins. Its bytes are wiped when dropped.
pub struct SecretKey {
    pub(crate) key: SigningKey,
    name: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} {})", self.name, self.fingerprint())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SecretKey({} {})",
            self.name,
            self.public().fingerprint()
        )
    }
}

impl PublicKey {
    pub(crate) fn from_bytes(bytes: &[u8; 32], name: &str) -> Option<PublicKey> {
        Some(PublicKey {
            key: VerifyingKey::from_bytes(bytes).ok()?,
            name: name.to_owned(),
        })
    }

    /// The name given at `keygen`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key in hex (64 digits).
    pub fn to_hex(&self) -> String {
        hex(self.key.as_bytes())
    }

    /// A short identifier: the first 16 hex digits of the key's SHA-256.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.key.as_bytes())
    }

    /// The key file's line.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_TAG} {} {}\n", self.to_hex(), self.name)
    }

    /// Every public key in `path`: a file of key lines, or a directory of
    /// `*.pub` files.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::Config`] naming the
    /// file and line of a malformed key.
    pub fn load_all(path: impl AsRef<Path>) -> Result<Vec<PublicKey>> {
        let path = path.as_ref();
        let files = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| io_error(path, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "pub"))
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_owned()]
        };
        let mut keys = Vec::new();
        for file in files {
            let text = read_text(&file)?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (bytes, name) = parse_line(line, PUBLIC_TAG).map_err(|why| Error::Config {
                    what: format!("trusted key {}:{}", file.display(), n + 1),
                    message: why,
                })?;
                let key = PublicKey::from_bytes(&bytes, &name).ok_or_else(|| Error::Config {
                    what: format!("trusted key {}:{}", file.display(), n + 1),
                    message: "not a valid ed25519 public key".into(),
                })?;
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

impl SecretKey {
    /// A new key pair named `name` (a label for people; it does not have
    /// to be unique), from the operating system's randomness.
    ///
    /// # Errors
    /// [`Error::Config`] if the system has no randomness to give.
    pub fn generate(name: &str) -> Result<SecretKey> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut seed[..]).map_err(|e| Error::Config {
            what: "generating a key".into(),
            message: e.to_string(),
        })?;
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
            name: clean_name(name),
        })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
            name: self.name.clone(),
        }
    }

    /// Writes the secret key to `path` (mode `0600`, never over an existing
    /// file) and the public key beside it, as `path` with `.pub` added.
    ///
    /// # Errors
    /// [`Error::Io`] when a file exists or cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let secret = zeroize::Zeroizing::new(format!(
            "{SECRET_TAG} {} {}\n",
            hex(self.key.as_bytes()),
            self.name
        ));
        write_new(path, secret.as_bytes(), 0o600)?;
        let mut public = path.as_os_str().to_owned();
        public.push(".pub");
        write_new(
            Path::new(&public),
            self.public().to_line().as_bytes(),
            0o644,
        )
    }

    /// Reads a secret key file written by [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::Config`] when it is
    /// not a secret key.
    pub fn load(path: impl AsRef<Path>) -> Result<SecretKey> {
        let path = path.as_ref();
        let text = zeroize::Zeroizing::new(read_text(path)?);
        let (seed, name) = parse_line(text.trim(), SECRET_TAG).map_err(|why| Error::Config {
            what: format!("secret key {}", path.display()),
            message: why,
        })?;
        let seed = zeroize::Zeroizing::new(seed);
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
            name,
        })
    }
}

fn clean_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if c.is_whitespace() { '-' } else { c })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "key".into()
    } else {
        cleaned
    }
}

/// `TAG <64 hex> NAME` → the 32 bytes and the name.
fn parse_line(line: &str, tag: &str) -> std::result::Result<([u8; 32], String), String> {
    let mut parts = line.splitn(3, ' ');
    if parts.next() != Some(tag) {
        return Err(format!("expected a line starting with `{tag}`"));
    }
    let hex_key = parts.next().unwrap_or_default();
    let bytes = unhex::<32>(hex_key).ok_or("expected 64 hex digits after the tag")?;
    let name = parts.next().map(clean_name).unwrap_or_else(|| "key".into());
    Ok((bytes, name))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn fingerprint(key: &[u8; 32]) -> String {
    crate::digest::sha256_hex(key)[..16].to_owned()
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        plugin: String::new(),
        action: "reading",
        path: path.to_owned(),
        source,
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = crate::untrusted::read_file(path, MAX_KEY_FILE).map_err(|e| io_error(path, e))?;
    String::from_utf8(bytes).map_err(|_| Error::Config {
        what: format!("key file {}", path.display()),
        message: "not UTF-8 text".into(),
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| Error::Io {
            plugin: String::new(),
            action: "writing",
            path: path.to_owned(),
            source,
        })
}
