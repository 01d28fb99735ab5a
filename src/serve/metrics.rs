//! `/metrics` in the Prometheus text format.
//!
//! Call counters live in the manager (every call through an `Executor` counts,
//! façade or host code); the latency histogram is measured here, per plugin
//! and façade, around each request, so the hot path of in-process calls pays
//! no clock reads.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::Duration;

use crate::{PluginManager, PluginState};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// Two atomic increments per observation: the bucket (the last one is
/// `+Inf`) and the sum; the count is the sum of the buckets.
///
/// Kept instead of `prometheus-client`'s histogram, which takes a lock per
/// observation: measured by `benches/metrics.rs` (see `docs/performance.md`).
#[derive(Default)]
#[repr(align(64))]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            elapsed.as_nanos().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Which façade a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Facade {
    Http = 0,
    Grpc = 1,
}

impl Facade {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Facade::Http => "http",
            Facade::Grpc => "grpc",
        }
    }
}

/// One plugin's request latencies, per [`Facade`].
pub(crate) type Latency = [Histogram; 2];

type Histograms = HashMap<String, Arc<Latency>>;

/// Request latencies by plugin, then façade. Read on every request, written
/// once per new plugin: an arc-swapped map (copied on write) keeps the read
/// free of a shared lock word that two cores would bounce.
#[derive(Default)]
pub(crate) struct Metrics {
    latency: ArcSwap<Histograms>,
    insert: Mutex<()>,
}

impl Metrics {
    pub(crate) fn observe(&self, plugin: &str, facade: Facade, elapsed: Duration) {
        // Looked up by &str: no allocation once the plugin has been seen.
        if let Some(latency) = self.latency.load().get(plugin) {
            latency[facade as usize].observe(elapsed);
            return;
        }
        self.latency(plugin)[facade as usize].observe(elapsed);
    }

    /// The histograms of `plugin`, created on first use: the HTTP route table
    /// keeps them per route, so a request observes without a lookup.
    pub(crate) fn latency(&self, plugin: &str) -> Arc<Latency> {
        if let Some(latency) = self.latency.load().get(plugin) {
            return Arc::clone(latency);
        }
        let _insert = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let mut copy = Histograms::clone(&self.latency.load());
        let latency = Arc::clone(copy.entry(plugin.to_owned()).or_default());
        self.latency.store(Arc::new(copy));
        latency
    }

    pub(crate) fn render(&self, manager: &PluginManager) -> String {
        let plugins = manager.list();
        let mut out = String::new();
        let mut family =
            |name: &str,
             kind: &str,
             help: &str,
             rows: &mut dyn Iterator<Item = (String, String)>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (labels, value) in rows {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            };
        let plugin = |name: &str| format!("plugin=\"{}\"", escape(name));
        family(
            "dynplug_plugin_info",
            "gauge",
            "The version serving (or last known) and the state of each plugin.",
            &mut plugins.iter().map(|p| {
                let labels = format!(
                    "{},version=\"{}\",mode=\"{}\",isolation=\"{}\",state=\"{}\"",
                    plugin(&p.name),
                    escape(p.version.as_deref().unwrap_or("")),
                    escape(p.mode.as_deref().unwrap_or("")),
                    p.isolation.map_or("", |i| i.as_str()),
                    p.state.as_str()
                );
                (labels, "1".to_owned())
            }),
        );
        family(
            "dynplug_plugin_up",
            "gauge",
            "1 if the plugin is serving calls.",
            &mut plugins.iter().map(|p| {
                (
                    plugin(&p.name),
                    u8::from(matches!(
                        p.state,
                        PluginState::Loaded | PluginState::Deferred
                    ))
                    .to_string(),
                )
            }),
        );
        let counters: [PerPlugin; 7] = [
            (
                "dynplug_calls_total",
                "counter",
                "Calls made to the plugin.",
                |p| p.calls.calls,
            ),
            (
                "dynplug_errors_total",
                "counter",
                "Calls that returned an error.",
                |p| p.calls.errors,
            ),
            (
                "dynplug_panics_total",
                "counter",
                "Calls in which the plugin panicked.",
                |p| p.calls.panics,
            ),
            ("dynplug_in_flight", "gauge", "Calls running now.", |p| {
                p.calls.in_flight
            }),
            (
                "dynplug_upgrades_total",
                "counter",
                "Versions swapped in after the first.",
                |p| p.upgrades,
            ),
            (
                "dynplug_unloads_total",
                "counter",
                "Versions unloaded and unmapped.",
                |p| p.unloads,
            ),
            (
                "dynplug_mapped_retired_copies",
                "gauge",
                "Versions out of service whose code stays mapped (inline retained or leaked).",
                |p| p.retired.len() as u64,
            ),
        ];
        for (name, kind, help, get) in counters {
            family(
                name,
                kind,
                help,
                &mut plugins
                    .iter()
                    .map(|p| (plugin(&p.name), get(p).to_string())),
            );
        }
        family(
            "dynplug_leaked_copies",
            "gauge",
            "Versions whose code stayed mapped against intent.",
            &mut plugins.iter().map(|p| {
                let leaked = p
                    .retired
                    .iter()
                    .filter(|r| r.state == PluginState::Leaked)
                    .count();
                (plugin(&p.name), leaked.to_string())
            }),
        );
        // Plugins that run as a process (exec, isolation "process") only.
        let processes: [PerProcess; 3] = [
            (
                "dynplug_process_up",
                "gauge",
                "1 if the plugin's process is running.",
                |p| u64::from(p.pid.is_some()),
            ),
            (
                "dynplug_process_restarts_total",
                "counter",
                "Times the plugin's process was started again after going down.",
                |p| p.restarts,
            ),
            (
                "dynplug_process_crashes_in_row",
                "gauge",
                "Crashes in a row, each soon after its start (a crash loop at 5).",
                |p| u64::from(p.crashes_in_row),
            ),
        ];
        for (name, kind, help, get) in processes {
            family(
                name,
                kind,
                help,
                &mut plugins
                    .iter()
                    .filter_map(|p| Some((plugin(&p.name), get(p.process.as_ref()?).to_string()))),
            );
        }
        let gauges: [MaybePerProcess; 2] = [
            (
                "dynplug_process_pid",
                "The pid of the plugin's running process.",
                |p| p.pid.map(u64::from),
            ),
            (
                "dynplug_process_resident_bytes",
                "Resident memory of the plugin's running process, in bytes.",
                |p| p.rss_bytes,
            ),
        ];
        for (name, help, get) in gauges {
            family(
                name,
                "gauge",
                help,
                &mut plugins
                    .iter()
                    .filter_map(|p| Some((plugin(&p.name), get(p.process.as_ref()?)?.to_string()))),
            );
        }
        family(
            "dynplug_process_crash_loop",
            "gauge",
            "1 while the plugin's process is in a crash loop (restarted with a growing delay).",
            &mut plugins.iter().filter(|p| p.process.is_some()).map(|p| {
                (
                    plugin(&p.name),
                    u8::from(p.state == PluginState::CrashLoop).to_string(),
                )
            }),
        );
        // Plugins served by a socket dynplug did not start only.
        let sockets: [PerSocket; 2] = [
            (
                "dynplug_socket_up",
                "gauge",
                "1 if the plugin's socket answers.",
                |s| u64::from(s.connected),
            ),
            (
                "dynplug_socket_reconnects_total",
                "counter",
                "Times the plugin's socket answered again after being unreachable.",
                |s| s.reconnects,
            ),
        ];
        for (name, kind, help, get) in sockets {
            family(
                name,
                kind,
                help,
                &mut plugins
                    .iter()
                    .filter_map(|p| Some((plugin(&p.name), get(p.socket.as_ref()?).to_string()))),
            );
        }
        if let Some(keys) = manager.tls_keys_in_use() {
            let _ = writeln!(
                out,
                "# HELP dynplug_pthread_keys_in_use pthread keys used by the process (the limit is 1024).\n\
                 # TYPE dynplug_pthread_keys_in_use gauge\ndynplug_pthread_keys_in_use {keys}"
            );
        }
        self.render_latency(&mut out);
        out
    }

    fn render_latency(&self, out: &mut String) {
        let name = "dynplug_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of plugin requests through the façades.\n# TYPE {name} histogram"
        );
        let latency = self.latency.load();
        let mut plugins: Vec<_> = latency.keys().collect();
        plugins.sort();
        for (plugin, facade) in plugins
            .into_iter()
            .flat_map(|p| [(p, Facade::Http), (p, Facade::Grpc)])
        {
            let h = &latency[plugin][facade as usize];
            let count: u64 = h.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
            if count == 0 {
                continue;
            }
            let labels = format!(
                "plugin=\"{}\",facade=\"{}\"",
                escape(plugin),
                facade.as_str()
            );
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += count.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
}

/// A per-plugin metric: name, type, help, and how to read it from a listing row.
type PerPlugin = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::PluginInfo) -> u64,
);

/// A per-process gauge that not every process has: name, help, and how
/// to read it.
type MaybePerProcess = (
    &'static str,
    &'static str,
    fn(&crate::ProcessInfo) -> Option<u64>,
);

/// A per-process metric: name, type, help, and how to read it.
type PerProcess = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::ProcessInfo) -> u64,
);

/// A per-socket metric: name, type, help, and how to read it.
type PerSocket = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::SocketInfo) -> u64,
);

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The connection cap's use: open connections (every endpoint) and the cap.
pub(crate) fn render_connections(out: &mut String, open: usize, max: usize) {
    let _ = writeln!(
        out,
        "# HELP dynplug_connections_open Connections open now, over every endpoint.\n# TYPE dynplug_connections_open gauge\ndynplug_connections_open {open}"
    );
    let _ = writeln!(
        out,
        "# HELP dynplug_connections_max The cap on open connections; at it, the server stops accepting.\n# TYPE dynplug_connections_max gauge\ndynplug_connections_max {max}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_output() {
        let metrics = Metrics::default();
        metrics.observe("p", Facade::Http, Duration::from_micros(80));
        metrics.observe("p", Facade::Http, Duration::from_millis(3));
        metrics.observe("p", Facade::Http, Duration::from_secs(9));
        let mut out = String::new();
        metrics.render_latency(&mut out);
        assert!(
            out.contains(
                r#"dynplug_request_duration_seconds_bucket{plugin="p",facade="http",le="0.0001"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains(
                r#"dynplug_request_duration_seconds_bucket{plugin="p",facade="http",le="0.005"} 2"#
            ),
            "{out}"
        );
        assert!(
            out.contains(
                r#"dynplug_request_duration_seconds_bucket{plugin="p",facade="http",le="+Inf"} 3"#
            ),
            "{out}"
        );
        assert!(
            out.contains(r#"dynplug_request_duration_seconds_count{plugin="p",facade="http"} 3"#),
            "{out}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
