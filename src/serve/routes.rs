//! The HTTP route table: rebuilt from the serving plugins' manifests whenever
//! a lifecycle event says something changed, and swapped in atomically, so
//! routes follow plugins without restarting the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::State;
use super::metrics::{Latency, Metrics};
use crate::manifest::Route;
use crate::{Executor, PluginManager, PluginState, Value};

/// Where a matched request goes.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) plugin: String,
    pub(crate) label: String,
    pub(crate) timeout: Option<Duration>,
    pub(crate) executor: Executor,
    pub(crate) latency: Arc<Latency>,
}

#[derive(Default)]
pub(crate) struct RouteTable {
    by_method: HashMap<String, matchit::Router<Arc<Target>>>,
    /// Every mounted route, per plugin.
    pub(crate) mounted: HashMap<String, Vec<Route>>,
}

/// `/api/hello/:id` (manifest syntax) → `/api/hello/{id}` (matchit syntax).
fn pattern(route: &str) -> String {
    route
        .split('/')
        .map(|seg| match (seg.strip_prefix(':'), seg.strip_prefix('*')) {
            (Some(name), _) => format!("{{{name}}}"),
            (_, Some(name)) => format!("{{*{name}}}"),
            _ => seg.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl RouteTable {
    pub(crate) fn build(manager: &PluginManager, metrics: &Metrics) -> RouteTable {
        let mut table = RouteTable::default();
        for info in manager.list() {
            if info.state != PluginState::Loaded {
                continue;
            }
            let Ok((manifest, executor)) = manager.get_plugin(&info.name) else {
                continue;
            };
            let latency = metrics.latency(&info.name);
            for route in manifest.routes() {
                let target = Arc::new(Target {
                    plugin: info.name.clone(),
                    label: route.label.clone(),
                    timeout: route.timeout_ms.map(Duration::from_millis),
                    executor: executor.clone(),
                    latency: Arc::clone(&latency),
                });
                let router = table.by_method.entry(route.method.clone()).or_default();
                // The manager refuses plugins whose routes clash; what matchit
                // still refuses (e.g. `/a/:x` beside `/a/*rest`) is logged.
                match router.insert(pattern(&route.route), target) {
                    Ok(()) => table
                        .mounted
                        .entry(info.name.clone())
                        .or_default()
                        .push(route.clone()),
                    Err(e) => {
                        tracing::warn!(plugin = %info.name, route = %route.route, "route not mounted: {e}")
                    }
                }
            }
        }
        table
    }

    /// The target of `method path`, with the path parameters (decoded) as
    /// the `params` map value. `HEAD` falls back to the `GET` route, as in
    /// axum (the plugin sees `method` = `HEAD`; hyper sends no body).
    pub(crate) fn lookup(&self, method: &str, path: &str) -> Option<(Arc<Target>, Value)> {
        let at = |method: &str| self.by_method.get(method)?.at(path).ok();
        let matched = match at(method) {
            None if method == "HEAD" => at("GET")?,
            matched => matched?,
        };
        let mut params = std::collections::BTreeMap::new();
        for (k, v) in matched.params.iter() {
            params.insert(k.to_owned(), Value::String(super::http::decode(v, false)));
        }
        Some((Arc::clone(matched.value), Value::Map(params)))
    }
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
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    state.routes.store(Arc::new(RouteTable::build(&state.manager, &state.metrics)));
                }
                Err(RecvError::Closed) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_routes_become_matchit_patterns() {
        assert_eq!(pattern("/api/hello/:name"), "/api/hello/{name}");
        assert_eq!(pattern("/files/*path"), "/files/{*path}");
        assert_eq!(pattern("/plain"), "/plain");
    }
}
