//! `dynplug new NAME`: a plugin crate that builds and loads the first time,
//! with a unit test of its `execute`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where the new crate's `plugin-abi` comes from.
pub(crate) enum AbiSource {
    /// A `plugin-abi` crate directory.
    Path(PathBuf),
    /// crates.io, this host's exact version.
    Registry,
}

impl AbiSource {
    /// `--plugin-abi` (or `$DYNPLUG_PLUGIN_ABI`) when given, else this
    /// checkout's `plugin-abi` when the binary was built from source, else
    /// crates.io at this host's version.
    pub(crate) fn choose(given: Option<PathBuf>) -> AbiSource {
        if let Some(path) = given {
            return AbiSource::Path(path);
        }
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-abi");
        if checkout.join("Cargo.toml").is_file() {
            AbiSource::Path(checkout)
        } else {
            AbiSource::Registry
        }
    }

    fn dependency(&self) -> String {
        match self {
            AbiSource::Path(path) => {
                let path = path.canonicalize().unwrap_or_else(|_| path.clone());
                format!("plugin-abi = {{ path = {:?} }}", path.display().to_string())
            }
            AbiSource::Registry => format!("plugin-abi = \"={}\"", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Writes the crate `dir/NAME` and returns its directory.
pub(crate) fn create(name: &str, parent: &Path, abi: &AbiSource) -> anyhow::Result<PathBuf> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}` cannot name a plugin crate: use 1-64 letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let lib = name.replace('-', "_");
    let files = [
        ("Cargo.toml", cargo_toml(name, abi)),
        ("src/lib.rs", LIB_RS.replace("NAME", name)),
        (
            "plugin.json",
            PLUGIN_JSON.replace("LIB", &lib).replace("NAME", name),
        ),
        ("README.md", README.replace("NAME", name)),
        (".gitignore", "/target\n".to_owned()),
    ];
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn cargo_toml(name: &str, abi: &AbiSource) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# A C-compatible dynamic library: what a dynplug host loads.
crate-type = ["cdylib"]

[dependencies]
# The plugin ABI of the dynplug that created this crate. A host refuses a
# plugin built against another ABI: keep this in step with your host (a
# path to its checkout, a git dependency, or its exact crates.io version).
{dependency}

# A workspace of its own, so the crate builds wherever it is created.
[workspace]
"#,
        dependency = abi.dependency()
    )
}

const LIB_RS: &str = r#"//! NAME: a dynplug plugin.

use plugin_abi::{Context, PluginError, export_plugin};

/// Runs one call; the label says which operation. Over HTTP the reply is
/// what it sets: `{"greeting": "hello, Ada"}`.
fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    match ctx.label() {
        "NAME.hello" => {
            // A value set by the caller, else the route's `:name`.
            let who = ctx
                .get_str("name")
                .or_else(|| ctx.get_str_in("params", "name"))
                .unwrap_or("world");
            let greeting = format!("hello, {who}");
            ctx.set("greeting", greeting);
            Ok(())
        }
        other => Err(PluginError::new(format!("unknown label {other}"))),
    }
}

export_plugin!(execute);

#[cfg(test)]
mod tests {
    use plugin_abi::TestContext;

    use super::execute;

    #[test]
    fn says_hello() {
        let mut ctx = TestContext::new("NAME.hello").with("name", "Ada");
        execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
    }

    #[test]
    fn refuses_unknown_labels() {
        let mut ctx = TestContext::new("NAME.nope");
        assert!(execute(&mut ctx).is_err());
    }
}
"#;

const PLUGIN_JSON: &str = r#"{
  "name": "NAME",
  "version": "0.1.0",
  "description": "A dynplug plugin",
  "source": { "mode": "local_so", "path": "libLIB" },
  "http_services": {
    "routes": [
      { "route": "/api/NAME/:name", "method": "GET", "label": "NAME.hello" }
    ]
  }
}
"#;

const README: &str = r#"# NAME

A [dynplug](https://github.com/dynplug/dynplug) plugin.

```sh
cargo test                      # unit tests of execute, no host needed
dynplug dev                     # build, serve, rebuild and hot-upgrade on save
curl http://127.0.0.1:8080/api/NAME/Ada
dynplug pack                    # NAME-0.1.0.plg, ready to drop into a plugins directory
```
"#;
