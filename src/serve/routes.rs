//! The HTTP route table: rebuilt from the serving plugins' manifests whenever
//! a lifecycle event says something changed, and swapped in atomically, so
//! routes follow plugins without restarting the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::EventsError;

use super::State;
use super::metrics::{Latency, Metrics};
use crate::manifest::Route;
use crate::route::{Method, Router};
use crate::{Executor, PluginManager, Value};

/// The default route of plugins found in a sockets directory or
/// registered (they have no manifest routes): `POST /plugins/<name>/<method>`,
/// the body the params, the reply the result.
pub(crate) const DEFAULT_ROUTE_PREFIX: &str = "/plugins";

/// Where a matched request goes.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) plugin: String,
    /// The label; for a default route, empty: the path's `method` is.
    pub(crate) label: String,
    /// A default route: label from the path, params from the body.
    pub(crate) default: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) executor: Executor,
    pub(crate) latency: Arc<Latency>,
}

/// A serving plugin called by name (gRPC `Exec`).
pub(crate) struct Callee {
    pub(crate) executor: Executor,
    pub(crate) latency: Arc<Latency>,
}

/// The routes of every serving plugin, matched by the same rules
/// (`crate::route`) that the manager's conflict check applies, and every
/// serving plugin by name: a call finds its executor and histograms here
/// without the manager's lock or the metrics' map.
#[derive(Default)]
pub(crate) struct RouteTable {
    router: Router<Arc<Target>>,
    /// Every mounted route, per plugin.
    pub(crate) mounted: HashMap<String, Vec<Route>>,
    callees: HashMap<String, Arc<Callee>>,
    /// The manager's [`changes`](crate::PluginManager::changes) when built.
    generation: u64,
}

impl RouteTable {
    pub(crate) fn build(manager: &PluginManager, metrics: &Metrics) -> RouteTable {
        let mut table = RouteTable {
            generation: manager.changes(),
            ..RouteTable::default()
        };
        for info in manager.list() {
            // Whatever its state, a plugin with a version keeps that
            // version's routes: a restarting process, or a first load that
            // failed, answers 503 with why, not 404. Without a version
            // (failed to load, unloaded, draining) it has none.
            let Ok((manifest, executor)) = manager.get_plugin(&info.name) else {
                continue;
            };
            let latency = metrics.latency(&info.name);
            table.callees.insert(
                info.name.clone(),
                Arc::new(Callee {
                    executor: executor.clone(),
                    latency: Arc::clone(&latency),
                }),
            );
            for (method, pattern, route) in manifest.parsed_routes() {
                let target = Arc::new(Target {
                    plugin: info.name.clone(),
                    label: route.label.clone(),
                    default: false,
                    timeout: route.timeout_ms.map(Duration::from_millis),
                    executor: executor.clone(),
                    latency: Arc::clone(&latency),
                });
                // The manager never lets two serving plugins overlap, and a
                // manifest never repeats a route, so this refuses nothing; if
                // it ever did, the route mounted first (in name order) stays.
                match table.router.insert(method, &pattern, target) {
                    Ok(()) => table
                        .mounted
                        .entry(info.name.clone())
                        .or_default()
                        .push(route.clone()),
                    Err(owner) => {
                        tracing::warn!(plugin = %info.name, route = %route.route, owner = %owner.plugin, "route not mounted: the same route is mounted already")
                    }
                }
            }
        }
        table.mount_defaults(manager, metrics);
        table
    }

    /// A serving plugin by name (one that started serving since the last
    /// rebuild is not here yet: ask the manager).
    pub(crate) fn callee(&self, plugin: &str) -> Option<Arc<Callee>> {
        self.callees.get(plugin).cloned()
    }

    /// Mounts `POST /plugins/<name>/:method` for every serving plugin found
    /// outside the plugins directory, after every manifest route (which
    /// wins a conflict).
    fn mount_defaults(&mut self, manager: &PluginManager, metrics: &Metrics) {
        for info in manager.list() {
            let found = info
                .socket
                .as_ref()
                .is_some_and(|socket| socket.found_by != "manifest");
            if !info.state.in_service() || !found {
                continue;
            }
            let Ok((_, executor)) = manager.get_plugin(&info.name) else {
                continue;
            };
            let route = format!("{DEFAULT_ROUTE_PREFIX}/{}/:method", info.name);
            let Ok(pattern) = crate::route::Pattern::parse(&route) else {
                continue;
            };
            let target = Arc::new(Target {
                plugin: info.name.clone(),
                label: String::new(),
                default: true,
                timeout: None,
                executor,
                latency: metrics.latency(&info.name),
            });
            match self.router.insert(Method::Post, &pattern, target) {
                Ok(()) => self
                    .mounted
                    .entry(info.name.clone())
                    .or_default()
                    .push(Route {
                        route,
                        method: "POST".into(),
                        label: ":method".into(),
                        timeout_ms: None,
                    }),
                Err(owner) => {
                    tracing::warn!(plugin = %info.name, %route, owner = %owner.plugin, "default route not mounted: a manifest route has it")
                }
            }
        }
    }

    /// The target of `method path`, with the path parameters (decoded) as
    /// the `params` map value. `HEAD` falls back to the `GET` route, as in
    /// axum (the plugin sees `method` = `HEAD`; hyper sends no body).
    pub(crate) fn lookup(&self, method: &str, path: &str) -> Option<(Arc<Target>, Value)> {
        let (target, raw) = self.router.lookup(Method::parse(method)?, path)?;
        let mut params = std::collections::BTreeMap::new();
        for (name, value) in raw.iter() {
            params.insert(name.to_owned(), Value::String(decode(value)));
        }
        Some((Arc::clone(target), Value::Map(params)))
    }
}

/// Percent-decodes a path segment or cookie (`+` stays a plus); invalid
/// UTF-8 becomes U+FFFD.
pub(crate) fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The target of `method path` in the current table. A miss in a table
/// older than the manager's state (a plugin loaded a moment ago, its event
/// not yet followed) rebuilds the table first: a route is served as soon as
/// the call that loaded its plugin returns, not when `follow` gets to it.
pub(crate) fn lookup(state: &State, method: &str, path: &str) -> Option<(Arc<Target>, Value)> {
    let table = state.routes.load();
    if let Some(found) = table.lookup(method, path) {
        return Some(found);
    }
    if table.generation == state.manager.changes() {
        return None;
    }
    let fresh = Arc::new(RouteTable::build(&state.manager, &state.metrics));
    state.routes.store(Arc::clone(&fresh));
    fresh.lookup(method, path)
}

/// Rebuilds the table after every lifecycle event until shutdown.
pub(crate) async fn follow(state: State) {
    let mut events = state.manager.subscribe();
    let mut shutdown = state.shutdown.clone();
    // Anything that happened between the first build and the subscription.
    state
        .routes
        .store(Arc::new(RouteTable::build(&state.manager, &state.metrics)));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(_) | Err(EventsError::Lagged(_)) => {
                    state.routes.store(Arc::new(RouteTable::build(&state.manager, &state.metrics)));
                }
                Err(EventsError::Closed) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
