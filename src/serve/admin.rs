//! The management API under `/_dynplug/`, its event stream, and a small web page.

use std::convert::Infallible;

use axum::Router;
use axum::extract::{Path, State as Extract};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};

use super::State;
use crate::manifest::Route;
use crate::{Error, PluginInfo, PluginState};

pub(crate) fn router() -> Router<State> {
    Router::new()
        .route("/health", get(health))
        .route("/plugins", get(list))
        .route("/plugins/{name}", get(one).delete(unload))
        .route("/plugins/{name}/reload", post(reload))
        .route("/packages", post(upload))
        .route("/events", get(events))
}

/// A plugin as the API shows it: its row of `list()` and its mounted routes.
#[derive(Serialize)]
struct PluginView {
    #[serde(flatten)]
    info: PluginInfo,
    description: Option<String>,
    routes: Vec<Route>,
}

fn view(state: &State, info: PluginInfo) -> PluginView {
    let routes = state
        .routes
        .load()
        .mounted
        .get(&info.name)
        .cloned()
        .unwrap_or_default();
    let description = state
        .manager
        .get_plugin(&info.name)
        .ok()
        .and_then(|(manifest, _)| manifest.description.clone());
    PluginView {
        info,
        description,
        routes,
    }
}

async fn health(Extract(state): Extract<State>) -> Response {
    let plugins = state.manager.list();
    let loaded = plugins
        .iter()
        .filter(|p| p.state == PluginState::Loaded)
        .count();
    let deferred = plugins
        .iter()
        .filter(|p| p.state == PluginState::Deferred)
        .count();
    axum::Json(serde_json::json!({
        "status": "ok",
        "plugins": plugins.len(),
        "loaded": loaded,
        "deferred": deferred,
    }))
    .into_response()
}

/// `?interface=Group` keeps the plugins whose handshake says they
/// implement it; `?capability=CONNECTION` those that offer it.
#[derive(serde::Deserialize)]
struct ListFilter {
    interface: Option<String>,
    capability: Option<String>,
}

async fn list(
    Extract(state): Extract<State>,
    axum::extract::Query(filter): axum::extract::Query<ListFilter>,
) -> Response {
    let plugins: Vec<PluginView> = state
        .manager
        .list()
        .into_iter()
        .filter(|i| filter.interface.as_deref().is_none_or(|f| i.implements(f)))
        .filter(|i| {
            filter
                .capability
                .as_deref()
                .is_none_or(|c| i.has_capability(c))
        })
        .map(|i| view(&state, i))
        .collect();
    axum::Json(plugins).into_response()
}

async fn one(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    match state.manager.info(&name) {
        Some(info) => axum::Json(view(&state, info)).into_response(),
        None => Error::NotFound { plugin: name }.into_response(),
    }
}

/// Loads the plugin's directory or newest package again (an upgrade if it
/// changed); the old version keeps serving if the new one fails. A plugin
/// found in a sockets directory or registered is connected to again (its
/// handshake anew).
async fn reload(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let manager = state.manager.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let found = manager
            .info(&name)
            .and_then(|info| info.socket)
            .is_some_and(|socket| socket.found_by != "manifest");
        if !found && !manager.holds(&name) {
            return Err(Error::NotFound { plugin: name });
        }
        let manifest = manager.load_plugin(&name)?;
        Ok((serving_state(&manager, &name), manifest))
    })
    .await;
    match loaded {
        Ok(Ok((state, manifest))) => axum::Json(serde_json::json!({
            "plugin": manifest.name,
            "version": manifest.version.to_string(),
            "state": state,
        }))
        .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => super::reply::error_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
    }
}

/// The state of a plugin just loaded: `loaded`, or `deferred` when the
/// manager loads it on its first call.
fn serving_state(manager: &crate::PluginManager, name: &str) -> &'static str {
    manager
        .info(name)
        .map_or(PluginState::Loaded, |info| info.state)
        .as_str()
}

/// Largest `.plg` accepted by `POST /_dynplug/packages`.
const UPLOAD_LIMIT: usize = 256 * 1024 * 1024;

/// Installs the `.plg` in the body into the plugins directory (checked,
/// written atomically) and loads it. Uploading code is running code: only
/// when the management API is guarded by a token or clients.
async fn upload(Extract(state): Extract<State>, body: axum::body::Body) -> Response {
    if !state.management_guarded() {
        return Error::Forbidden {
            plugin: String::new(),
            reason: "uploading plugins needs a management token or management clients".into(),
        }
        .into_response();
    }
    // Read once allowed: a refused upload buffers nothing.
    let body = match axum::body::to_bytes(body, UPLOAD_LIMIT).await {
        Ok(body) => body,
        Err(e) => {
            let message = format!("reading the package: {e}");
            return super::reply::error_json(super::reply::body_error_status(&e), &message, None);
        }
    };
    let manager = state.manager.clone();
    let installed = tokio::task::spawn_blocking(move || {
        let installed = crate::package::install(
            &body,
            manager.base_dir(),
            crate::package::DEFAULT_MAX_LIBRARY_SIZE,
        )?;
        let manifest = manager.load_plugin(&installed.manifest.name)?;
        let state = serving_state(&manager, &manifest.name);
        Ok::<_, Error>((installed, manifest, state))
    })
    .await;
    match installed {
        Ok(Ok((installed, manifest, state))) => axum::Json(serde_json::json!({
            "plugin": manifest.name,
            "version": manifest.version.to_string(),
            "package": installed.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "state": state,
        }))
        .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => super::reply::error_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
    }
}

/// Drains and unloads the plugin.
async fn unload(Extract(state): Extract<State>, Path(name): Path<String>) -> Response {
    let manager = state.manager.clone();
    let plugin = name.clone();
    match tokio::task::spawn_blocking(move || manager.unload(&plugin)).await {
        Ok(Ok(ended)) => {
            axum::Json(serde_json::json!({ "plugin": name, "state": ended })).into_response()
        }
        // Not serving: retrying will not help, so not the 503 of a call.
        Ok(Err(e @ Error::Unavailable { .. })) => {
            super::reply::error_json(StatusCode::CONFLICT, &e.to_string(), Some(&name))
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => super::reply::error_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
    }
}

/// Lifecycle events as server-sent events (`event:` is the kind, `data:` the JSON).
async fn events(Extract(state): Extract<State>) -> Response {
    let events = BroadcastStream::new(state.manager.subscribe().into_inner())
        .filter_map(Result::ok)
        .map(Some);
    // End the stream at shutdown, or graceful shutdown would wait for the client.
    let stop = WatchStream::new(state.shutdown.clone())
        .filter(|stop| *stop)
        .map(|_| None);
    let stream = events.merge(stop).take_while(Option::is_some).map(|event| {
        let event = event.unwrap_or_else(|| unreachable!("take_while stops before None"));
        let json = serde_json::to_value(&event).unwrap_or_default();
        let kind = json["event"].as_str().unwrap_or("event").to_owned();
        Ok::<_, Infallible>(SseEvent::default().event(kind).data(json.to_string()))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("admin.html"))
}
