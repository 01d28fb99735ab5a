//! What an exec manifest asks for, with the defaults filled in.

use std::time::Duration;

use crate::manifest::{Listen, Manifest, Protocol, Source};
use crate::remote::link::Wire;

/// How long a plugin may take to answer its first Ping.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between health pings.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTH_MISSES: u32 = 3;
/// 100 ms doubling to 30 s, as the go-plugin users asked for in place of
/// a fixed sleep.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// go-plugin's own grace between the polite and the final signal.
const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) wire: Wire,
    pub(crate) listen: Listen,
    pub(crate) flag: String,
    pub(crate) args: Vec<String>,
    pub(crate) start_timeout: Duration,
    /// `None`: no health pings.
    pub(crate) health_interval: Option<Duration>,
    pub(crate) health_timeout: Duration,
    pub(crate) health_misses: u32,
    pub(crate) backoff_first: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) stop_grace: Duration,
}

impl Settings {
    /// The settings of an `exec` manifest (validated by `Manifest::parse`).
    pub(crate) fn of(manifest: &Manifest) -> Option<Settings> {
        let Source::Exec {
            args,
            protocol,
            listen,
            listen_flag,
            start_timeout_ms,
            health_interval_ms,
            health_timeout_ms,
            health_misses,
            restart_backoff_ms,
            restart_backoff_max_ms,
            stop_grace_ms,
            ..
        } = &manifest.source
        else {
            return None;
        };
        let ms =
            |value: &Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let wire = match protocol {
            Protocol::Grpc => Wire::Grpc,
            // `jsonrpc` and `docker` are refused by the manifest check.
            _ => Wire::Rest,
        };
        let flag = listen_flag.clone().unwrap_or_else(|| {
            match listen {
                Listen::Unix => "--socket",
                _ => "--port",
            }
            .to_owned()
        });
        let backoff_max = ms(restart_backoff_max_ms, BACKOFF_MAX);
        Some(Settings {
            wire,
            listen: *listen,
            flag,
            args: args.clone(),
            start_timeout: ms(start_timeout_ms, START_TIMEOUT),
            health_interval: Some(ms(health_interval_ms, HEALTH_INTERVAL)).filter(|d| !d.is_zero()),
            health_timeout: ms(health_timeout_ms, HEALTH_TIMEOUT),
            health_misses: health_misses.unwrap_or(HEALTH_MISSES),
            backoff_first: ms(restart_backoff_ms, BACKOFF_FIRST).min(backoff_max),
            backoff_max,
            stop_grace: ms(stop_grace_ms, STOP_GRACE),
        })
    }

    /// The settings of a native plugin's runner: a Unix socket, readiness
    /// bounded by `start_timeout` (which includes the plugin's `init`),
    /// the same health pings and backoff as exec plugins, and `stop_grace`
    /// for its `shutdown`.
    pub(crate) fn process(
        start_timeout: Duration,
        stop_grace: Duration,
        (backoff_first, backoff_max): (Duration, Duration),
    ) -> Settings {
        Settings {
            wire: Wire::Process,
            listen: Listen::Unix,
            flag: "--socket".into(),
            args: Vec::new(),
            start_timeout,
            health_interval: Some(HEALTH_INTERVAL),
            health_timeout: HEALTH_TIMEOUT,
            health_misses: HEALTH_MISSES,
            backoff_first,
            backoff_max,
            stop_grace,
        }
    }

    /// The delay before restart number `crashes` of a row of crashes
    /// (1 for the first): at once, then the first backoff doubling to the
    /// longest.
    pub(crate) fn backoff(&self, crashes: u32) -> Duration {
        match crashes {
            0 | 1 => Duration::ZERO,
            n => self
                .backoff_first
                .saturating_mul(1u32 << (n - 2).min(20))
                .min(self.backoff_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap() {
        let json = r#"{"name":"p","version":"1.0.0","source":{"mode":"exec","path":"x","protocol":"rest"}}"#;
        let manifest = Manifest::parse(json.as_bytes(), "p/plugin.json".as_ref(), "p").unwrap();
        let settings = Settings::of(&manifest).unwrap();
        let delays: Vec<u64> = (1..=14)
            .map(|n| settings.backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [
                0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000
            ]
        );
        assert_eq!(settings.flag, "--port");
        assert_eq!(settings.start_timeout, Duration::from_secs(10));
    }
}
