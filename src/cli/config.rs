//! The optional configuration file: `--config FILE` (or `$DYNPLUG_CONFIG`),
//! TOML. A flag (or its environment variable) wins over the file, the file
//! over the built-in default. Relative paths in the file are relative to the
//! file's directory.
//!
//! ```toml
//! plugins = "plugins"        # the plugins directory
//! pool_size = 2              # worker threads per pooled version
//! queue_limit = 256          # calls that may wait for a pooled version's workers
//! drain_timeout = "30s"
//! allow_downgrades = false
//! load_on_first_call = false # native libraries loaded by their first call
//! unload_idle_after = "10m"  # and unloaded when no call came for that long
//! trusted_keys = "keys"      # a directory of *.pub files, or one file of key lines
//! require_signatures = false
//! sockets = ["/run/dynplug/plugins"]  # sockets directories (JSON-RPC, Docker style)
//!
//! [serve]
//! http = ["127.0.0.1:8080"]
//! http_unix = ["/run/dynplug/http.sock"]
//! grpc = ["127.0.0.1:50051"]
//! grpc_unix = []
//! goplugin_dir = "/run/dynplug/goplugin"
//! registry_unix = "/run/dynplug/registry/registry.sock"
//! registry_endpoint_dirs = ["/run/dynplug/registry"]
//! registry_allowed_uids = [1000]
//! registry_probe_interval = "1s"
//! registry_probe_misses = 3
//! watch = true
//! timeout = "30s"
//! management_token = "…"  # keep the file private, or use the environment
//! allow_open_management = false
//! allowed_hosts = ["dynplug.internal"]
//! max_connections = 1024
//! header_read_timeout = "10s"
//! idle_timeout = "60s"
//! max_header_bytes = 32768
//! max_concurrent_streams = 100
//! grpc_max_message_size = 4194304
//! unix_socket_mode = 0o600
//! tls_cert = "cert.pem"
//! tls_key = "key.pem"
//! tls_client_ca = "clients-ca.pem"
//!
//! [[clients]]
//! name = "billing"
//! token_sha256 = "…"          # printf %s TOKEN | sha256sum
//! cert_name = "billing"       # or a client certificate with this CN / DNS name
//! plugins = ["hello", "counter"]  # or ["*"]
//! management = false
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

/// The file's contents; every key is optional, unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) plugins: Option<PathBuf>,
    pub(crate) pool_size: Option<u16>,
    pub(crate) queue_limit: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) drain_timeout: Option<Duration>,
    pub(crate) allow_downgrades: Option<bool>,
    pub(crate) load_on_first_call: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) unload_idle_after: Option<Duration>,
    pub(crate) trusted_keys: Option<PathBuf>,
    pub(crate) require_signatures: Option<bool>,
    #[serde(default)]
    pub(crate) sockets: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) serve: ServeConfig,
    #[serde(default)]
    pub(crate) clients: Vec<ClientConfig>,
}

/// `[[clients]]`: a named caller of plugins (see `dynplug::serve::Client`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientConfig {
    pub(crate) name: String,
    pub(crate) token_sha256: Option<String>,
    pub(crate) cert_name: Option<String>,
    #[serde(default)]
    pub(crate) plugins: Vec<String>,
    #[serde(default)]
    pub(crate) management: bool,
}

impl ClientConfig {
    pub(crate) fn client(&self) -> dynplug::serve::Client {
        let mut client = dynplug::serve::Client::new(&self.name)
            .plugins(self.plugins.iter().cloned())
            .management(self.management);
        if let Some(hex) = &self.token_sha256 {
            client = client.token_sha256(hex);
        }
        if let Some(name) = &self.cert_name {
            client = client.cert_name(name);
        }
        client
    }
}

/// `[serve]`: what `dynplug serve` listens on and how it runs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeConfig {
    #[serde(default)]
    pub(crate) http: Vec<SocketAddr>,
    #[serde(default)]
    pub(crate) http_unix: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) grpc: Vec<SocketAddr>,
    #[serde(default)]
    pub(crate) grpc_unix: Vec<PathBuf>,
    pub(crate) goplugin_dir: Option<PathBuf>,
    pub(crate) registry_unix: Option<PathBuf>,
    #[serde(default)]
    pub(crate) registry_endpoint_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) registry_allowed_uids: Vec<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) registry_probe_interval: Option<Duration>,
    pub(crate) registry_probe_misses: Option<u32>,
    pub(crate) watch: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) timeout: Option<Duration>,
    pub(crate) management_token: Option<String>,
    pub(crate) allow_open_management: Option<bool>,
    #[serde(default)]
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) max_connections: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) header_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_header_bytes: Option<usize>,
    pub(crate) max_concurrent_streams: Option<u32>,
    pub(crate) grpc_max_message_size: Option<usize>,
    pub(crate) unix_socket_mode: Option<u32>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) tls_client_ca: Option<PathBuf>,
}

/// `"30s"`, `"500ms"`, `"2m"`: humantime, as on the command line.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration `{text}`: {e}")))
}

impl Config {
    /// Reads and checks `path`; errors name the file, and TOML's name the key
    /// and the line.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            // One line, as every CLI error: file, line, column, message.
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" line {line}, column {column}:")
            });
            anyhow::anyhow!("{}:{at} {}", path.display(), e.message().trim_end())
        })?;
        if config.pool_size == Some(0) {
            anyhow::bail!(
                "{}: pool_size: expected at least 1, found 0",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config.plugins.iter_mut().for_each(resolve);
        config.trusted_keys.iter_mut().for_each(resolve);
        config.sockets.iter_mut().for_each(resolve);
        config.serve.goplugin_dir.iter_mut().for_each(resolve);
        config.serve.registry_unix.iter_mut().for_each(resolve);
        config
            .serve
            .registry_endpoint_dirs
            .iter_mut()
            .for_each(resolve);
        config.serve.http_unix.iter_mut().for_each(resolve);
        config.serve.grpc_unix.iter_mut().for_each(resolve);
        config.serve.tls_cert.iter_mut().for_each(resolve);
        config.serve.tls_key.iter_mut().for_each(resolve);
        config.serve.tls_client_ca.iter_mut().for_each(resolve);
        if config.serve.tls_cert.is_some() != config.serve.tls_key.is_some() {
            anyhow::bail!(
                "{}: [serve] tls_cert and tls_key go together",
                path.display()
            );
        }
        if config
            .serve
            .unix_socket_mode
            .is_some_and(|mode| mode > 0o777)
        {
            anyhow::bail!(
                "{}: [serve] unix_socket_mode: expected a file mode such as 0o600",
                path.display()
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dynplug.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
            .map_err(|e| anyhow::anyhow!("{e:#}").context(dir.path().display().to_string()))
    }

    #[test]
    fn every_key_parses_and_relative_paths_follow_the_file() {
        let config = parse(
            r#"
            plugins = "plugins"
            pool_size = 3
            queue_limit = 10
            drain_timeout = "5s"
            allow_downgrades = true
            sockets = ["sockets.d"]
            [serve]
            http = ["127.0.0.1:8080"]
            registry_unix = "reg/registry.sock"
            registry_endpoint_dirs = ["/run/plugins"]
            registry_allowed_uids = [1000, 1001]
            registry_probe_interval = "250ms"
            registry_probe_misses = 5
            http_unix = ["http.sock", "/run/abs.sock"]
            grpc = []
            goplugin_dir = "gp"
            watch = true
            timeout = "250ms"
            management_token = "t"
            allow_open_management = true
            allowed_hosts = ["a.example"]
            max_connections = 10
            idle_timeout = "2s"
            unix_socket_mode = 0o660
            tls_cert = "c.pem"
            tls_key = "/k.pem"
            [[clients]]
            name = "billing"
            token_sha256 = "ab"
            plugins = ["hello"]
            [[clients]]
            name = "ops"
            cert_name = "ops"
            plugins = ["*"]
            management = true
            "#,
        )
        .unwrap();
        assert!(config.plugins.unwrap().ends_with("plugins"));
        assert_eq!(config.pool_size, Some(3));
        assert_eq!(config.queue_limit, Some(10));
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(5)));
        assert_eq!(config.allow_downgrades, Some(true));
        assert!(config.sockets[0].is_absolute());
        assert!(config.serve.registry_unix.unwrap().is_absolute());
        assert_eq!(
            config.serve.registry_endpoint_dirs,
            [Path::new("/run/plugins")]
        );
        assert_eq!(config.serve.registry_allowed_uids, [1000, 1001]);
        assert_eq!(
            config.serve.registry_probe_interval,
            Some(Duration::from_millis(250))
        );
        assert_eq!(config.serve.registry_probe_misses, Some(5));
        assert_eq!(config.serve.http, ["127.0.0.1:8080".parse().unwrap()]);
        assert!(config.serve.http_unix[0].is_absolute());
        assert_eq!(config.serve.http_unix[1], Path::new("/run/abs.sock"));
        assert_eq!(config.serve.watch, Some(true));
        assert_eq!(config.serve.timeout, Some(Duration::from_millis(250)));
        assert_eq!(config.serve.management_token.as_deref(), Some("t"));
        assert_eq!(config.serve.allow_open_management, Some(true));
        assert_eq!(config.serve.allowed_hosts, ["a.example"]);
        assert_eq!(config.serve.max_connections, Some(10));
        assert_eq!(config.serve.idle_timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.serve.unix_socket_mode, Some(0o660));
        assert!(config.serve.tls_cert.unwrap().is_absolute());
        assert_eq!(config.clients.len(), 2);
        assert_eq!(config.clients[0].plugins, ["hello"]);
        assert!(config.clients[1].management);
        assert!(
            parse("").unwrap().plugins.is_none(),
            "an empty file is fine"
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        for (text, needle) in [
            ("pool_sise = 2", "unknown field `pool_sise`"),
            ("pool_size = 0", "pool_size: expected at least 1"),
            ("[serve]\ntimeout = \"soon\"", "invalid duration `soon`"),
            (
                "[serve]\nhttp = [\"localhost\"]",
                "line 2, column 9: invalid socket address",
            ),
            ("plugins = ", "dynplug.toml"),
            (
                "[serve]\ntls_cert = \"c.pem\"",
                "tls_cert and tls_key go together",
            ),
            (
                "[[clients]]\nname = \"a\"\ntoken = \"x\"",
                "unknown field `token`",
            ),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("dynplug.toml"), "{text:?}: {err}");
        }
    }
}
