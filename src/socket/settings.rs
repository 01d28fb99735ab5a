//! What a socket manifest asks for, with the defaults filled in.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use crate::manifest::{Manifest, Protocol, SocketPath, Source};
use crate::remote::link::{Address, Wire};

/// Time between health checks.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTH_MISSES: u32 = 3;
/// 100 ms doubling to 30 s. Docker's client gives up after about 15 s;
/// dynplug never gives up on a socket it was told about.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) wire: Wire,
    pub(crate) address: Address,
    /// `None`: no health checks (a failed connect still takes the plugin
    /// out of service until it answers).
    pub(crate) health_interval: Option<Duration>,
    pub(crate) health_timeout: Duration,
    pub(crate) health_misses: u32,
    pub(crate) backoff_first: Duration,
    pub(crate) backoff_max: Duration,
}

impl Settings {
    /// The settings of a `socket` manifest (validated by `Manifest::parse`),
    /// relative paths resolved against `dir`; a `tcp://` host is resolved
    /// now. `Err` says why the address cannot be used.
    pub(crate) fn of(manifest: &Manifest, dir: &Path) -> Result<Settings, String> {
        let Source::Socket {
            path,
            protocol,
            health_interval_ms,
            health_timeout_ms,
            health_misses,
            reconnect_backoff_ms,
            reconnect_backoff_max_ms,
            peer_uid,
        } = &manifest.source
        else {
            return Err("not a socket plugin".into());
        };
        let address = match SocketPath::parse(path)? {
            SocketPath::Unix(path) => Address::Unix(dir.join(path), *peer_uid),
            SocketPath::Tcp { host, port } => {
                let resolved = (host, port)
                    .to_socket_addrs()
                    .map_err(|e| format!("resolving {host}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{host} has no address"))?;
                Address::Tcp(resolved)
            }
        };
        let ms =
            |value: &Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let backoff_max = ms(reconnect_backoff_max_ms, BACKOFF_MAX);
        Ok(Settings {
            wire: match protocol {
                Protocol::Grpc => Wire::Grpc,
                Protocol::Rest => Wire::Rest,
                Protocol::Docker => Wire::Docker,
                _ => Wire::JsonRpc,
            },
            address,
            health_interval: Some(ms(health_interval_ms, HEALTH_INTERVAL)).filter(|d| !d.is_zero()),
            health_timeout: ms(health_timeout_ms, HEALTH_TIMEOUT),
            health_misses: health_misses.unwrap_or(HEALTH_MISSES),
            backoff_first: ms(reconnect_backoff_ms, BACKOFF_FIRST).min(backoff_max),
            backoff_max,
        })
    }

    /// The delay before reconnection attempt `n` of a row (1 for the
    /// first): the first backoff, doubling to the longest.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        self.backoff_first
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_paths_and_backoff() {
        let json = r#"{"name":"p","version":"1.0.0","source":{"mode":"socket","path":"p.sock","protocol":"jsonrpc","reconnect_backoff_max_ms":1000}}"#;
        let manifest = Manifest::parse(json.as_bytes(), "p/plugin.json".as_ref(), "p").unwrap();
        let settings = Settings::of(&manifest, Path::new("/srv/p")).unwrap();
        assert_eq!(
            settings.address,
            Address::Unix("/srv/p/p.sock".into(), None)
        );
        assert_eq!(settings.wire, Wire::JsonRpc);
        assert_eq!(settings.health_interval, Some(Duration::from_secs(2)));
        let delays: Vec<u128> = (1..=6).map(|n| settings.backoff(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        let json = r#"{"name":"p","version":"1.0.0","source":{"mode":"socket","path":"tcp://127.0.0.1:7","protocol":"grpc","health_interval_ms":0}}"#;
        let manifest = Manifest::parse(json.as_bytes(), "p/plugin.json".as_ref(), "p").unwrap();
        let settings = Settings::of(&manifest, Path::new("/")).unwrap();
        assert_eq!(
            settings.address,
            Address::Tcp("127.0.0.1:7".parse().unwrap())
        );
        assert_eq!(settings.health_interval, None);
    }
}
