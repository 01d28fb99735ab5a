//! The HTTP façade: manifest routes to plugin calls, plus the management API
//! and `/metrics`. Errors become responses here and only here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::conn::Peer;
use super::reply::error_json;
use super::routes::decode;
use super::{State, admin, auth, origin};
use crate::{Context, Error, Value};

/// The HTTP façade as a tower service, to mount in a host's own axum app
/// (from [`Running::http_service`](super::Running::http_service)): plugin
/// routes, the management API under `/_dynplug/` and `/metrics`.
///
/// ```no_run
/// # async fn run(manager: dynplug::PluginManager) -> Result<(), Box<dyn std::error::Error>> {
/// // No endpoints: the host serves HTTP itself.
/// let running = dynplug::serve::Server::new(manager).start().await?;
/// let app = axum::Router::new()
///     .route("/", axum::routing::get(|| async { "the host's own page" }))
///     .fallback_service(running.http_service());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(listener, app).await?;
/// # Ok(()) }
/// ```
///
/// The management API can reload and unload plugins: without a management
/// token or clients it is open to whoever reaches the service, so mount it
/// where only operators reach it, or take
/// [`without_management`](Self::without_management) for a public listener.
/// Either way it checks the `Host` and refuses cross-site state changes.
/// Under `nest_service`, plugins see the path after the prefix (`path`
/// value, route matching).
///
/// Internally, the management API and `/metrics` go through an axum router
/// and every other request straight to the façade, so a plugin route pays
/// for one routing pass (the route table's), not two.
#[derive(Clone)]
pub struct HttpService {
    pub(super) state: State,
    /// `None`: the reserved paths answer 404 like any unknown route.
    management: Option<Router>,
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpService").finish_non_exhaustive()
    }
}

impl HttpService {
    pub(crate) fn new(state: State) -> HttpService {
        let management = Router::new()
            .nest("/_dynplug", admin::router())
            // The page uses relative URLs (so it works wherever a host mounts
            // the service): it lives at `/_dynplug/`, and `/_dynplug` redirects
            // there, relatively, for the same reason.
            .route("/_dynplug/", get(admin::page))
            .route(
                "/_dynplug",
                get(|| async { Redirect::permanent("_dynplug/") }),
            )
            .route("/metrics", get(metrics))
            .fallback(|request: Request| async move {
                let message = format!("no route for {} {}", request.method(), request.uri().path());
                error_json(StatusCode::NOT_FOUND, &message, None)
            })
            .with_state(Arc::clone(&state));
        HttpService {
            state,
            management: Some(management),
        }
    }

    /// The same service with only the plugin routes: `/_dynplug/...` and
    /// `/metrics` answer 404 like any unknown path.
    #[must_use]
    pub fn without_management(mut self) -> HttpService {
        self.management = None;
        self
    }
}

impl tower_service::Service<Request> for HttpService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if self
            .state
            .stopped
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let response = error_json(
                StatusCode::SERVICE_UNAVAILABLE,
                "the dynplug server has shut down",
                None,
            );
            return Box::pin(std::future::ready(Ok(response)));
        }
        match &mut self.management {
            // An axum `Router` is always ready: `call` without `poll_ready`
            // is within its contract.
            Some(management) if crate::manifest::is_reserved_path(request.uri().path()) => {
                let checked = origin::check(&request, &self.state.allowed_hosts)
                    .and_then(|()| check_management(&self.state, &request));
                if let Err(denied) = checked {
                    return Box::pin(std::future::ready(Ok(denied.into_response())));
                }
                Box::pin(management.call(request))
            }
            _ => {
                let state = Arc::clone(&self.state);
                Box::pin(async move { Ok(facade(state, request).await) })
            }
        }
    }
}

/// With a management token or clients, the management API's data and
/// actions need credentials: the token, or a client allowed the management
/// API (its token or its certificate), as `Authorization: Bearer <token>` or
/// the `dynplug_token` cookie the web page sets. The page,
/// `/_dynplug/health` and `/metrics` stay open (load balancers and
/// scrapers).
fn check_management(state: &super::Shared, request: &Request) -> Result<(), Error> {
    if !state.management_guarded()
        || matches!(
            request.uri().path(),
            "/_dynplug" | "/_dynplug/" | "/_dynplug/health" | "/metrics"
        )
    {
        return Ok(());
    }
    let headers = request.headers();
    // Every cookie of that name is tried (a stale one may come first).
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .map(str::to_owned);
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("dynplug_token="))
        .map(decode);
    let mut client = None;
    for given in bearer.into_iter().chain(cookies) {
        if let Some(token) = &state.management_token
            && same_secret(&given, &token.0)
        {
            return Ok(());
        }
        client = client.or_else(|| state.clients.by_token(&given));
    }
    if client.is_none()
        && let Some(names) = request
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.cert_names.as_deref())
    {
        client = state.clients.by_cert(names);
    }
    match client {
        Some(client) if client.management => Ok(()),
        Some(client) => Err(Error::Forbidden {
            plugin: String::new(),
            reason: format!("client `{}` may not use the management API", client.name),
        }),
        None => Err(Error::Unauthenticated {
            reason: "the management API needs its token: Authorization: Bearer <token>".into(),
        }),
    }
}

/// Compares two secrets without leaking, through timing, where they differ
/// or how long the right one is: both are hashed to 32 bytes first.
fn same_secret(given: &str, expected: &str) -> bool {
    use sha2::Digest as _;
    auth::same_hash(
        &sha2::Sha256::digest(given).into(),
        &sha2::Sha256::digest(expected).into(),
    )
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    let mut body = state.metrics.render(&state.manager);
    let open = state.max_connections - state.slots.available_permits();
    super::metrics::render_connections(&mut body, open, state.max_connections);
    if let Some(stats) = &state.registry {
        super::registry::render(stats, &mut body);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Largest request body passed to a plugin.
const BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Largest JSON body also parsed into the `json` value (a parsed tree takes
/// many times the bytes).
const JSON_LIMIT: usize = 1024 * 1024;

/// Response headers a plugin may not set.
const FRAMING: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Every request that is not the management API: look the route up, call the plugin.
async fn facade(state: State, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    // Who calls, before the route is looked up: routes are not shown to
    // callers who cannot say who they are.
    let caller = if state.clients.enabled() {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        match state
            .clients
            .identify(bearer, parts.extensions.get::<Peer>())
        {
            Ok(caller) => caller,
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let Some((target, params)) = super::routes::lookup(&state, method.as_str(), uri.path()) else {
        let message = format!("no route for {method} {}", uri.path());
        return error_json(StatusCode::NOT_FOUND, &message, None);
    };
    if let Some(Err(e)) = caller.map(|c| c.may_call(&target.plugin)) {
        return e.into_response();
    }
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(body) => body,
        Err(e) => {
            let message = format!("reading the request body: {e}");
            return error_json(
                super::reply::body_error_status(&e),
                &message,
                Some(&target.plugin),
            );
        }
    };
    if target.default {
        // Boxed: its future is large, and most requests do not take it.
        return Box::pin(default_route(&state, &target, params, &body)).await;
    }
    // A client's token is dynplug's, not the plugin's to see (or replay).
    let hide_authorization = state.clients.enabled();
    let mut ctx = request_context(
        &target.label,
        method,
        uri,
        headers,
        hide_authorization,
        body,
        params,
    );
    let timeout = target.timeout.unwrap_or(state.timeout);
    match super::call(
        &state,
        &target.executor,
        Some(&target.latency),
        &mut ctx,
        timeout,
        super::Facade::Http,
    )
    .await
    {
        Ok(()) => plugin_response(&target.plugin, ctx),
        Err(e) => e.into_response(),
    }
}

/// `POST /plugins/<name>/<method>` of a plugin found in a sockets directory
/// or registered: the label is the path's method, the values are the body
/// (a JSON object; empty means none), and the reply is the plugin's result:
/// the JSON object of the values it set, or the value under
/// [`RESULT_KEY`](crate::RESULT_KEY) alone when that is all it set (a
/// JSON-RPC result that is not an object).
async fn default_route(
    state: &State,
    target: &super::routes::Target,
    params: Value,
    body: &[u8],
) -> Response {
    let method = match params {
        Value::Map(mut map) => match map.remove("method") {
            Some(Value::String(method)) => method,
            _ => String::new(),
        },
        _ => String::new(),
    };
    // Parsed JSON takes many times its size: the same limit as the `json` value.
    if body.len() > JSON_LIMIT {
        let message = format!("the body is over {JSON_LIMIT} bytes of JSON");
        return error_json(
            StatusCode::PAYLOAD_TOO_LARGE,
            &message,
            Some(&target.plugin),
        );
    }
    let values = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(values)) => values,
            _ => {
                let message = "the body must be a JSON object (the params), or empty";
                return error_json(StatusCode::BAD_REQUEST, message, Some(&target.plugin));
            }
        }
    };
    if let Err(status) = super::grpc_request::check_value_count(values.len()) {
        return error_json(
            StatusCode::BAD_REQUEST,
            status.message(),
            Some(&target.plugin),
        );
    }
    let mut ctx = Context::with_capacity(&method, values.len());
    for (key, value) in values {
        ctx.set(key, Value::from(value));
    }
    let called = super::call(
        state,
        &target.executor,
        Some(&target.latency),
        &mut ctx,
        state.timeout,
        super::Facade::Http,
    )
    .await;
    if let Err(e) = called {
        return e.into_response();
    }
    let mut written: BTreeMap<String, Value> = ctx
        .written()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
    let result = match written.remove(crate::RESULT_KEY) {
        Some(result) if written.is_empty() => result,
        Some(result) => {
            written.insert(crate::RESULT_KEY.to_owned(), result);
            Value::Map(written)
        }
        None => Value::Map(written),
    };
    let mut json = Vec::with_capacity(128);
    let _ = serde_json::to_writer(&mut json, &result);
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// The request as context values: `label`, `method`, `path`, `params`,
/// `query`, `headers`, `body` (bytes) and, for JSON bodies, `json`.
fn request_context(
    label: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    hide_authorization: bool,
    body: Bytes,
    params: Value,
) -> Context {
    // Built by insertion: `collect` into a BTreeMap sorts through a Vec first,
    // which showed in the per-request profile.
    let map = |pairs: Vec<(String, String)>| {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            map.insert(k, Value::String(v));
        }
        Value::Map(map)
    };
    let query = uri.query().map_or_else(Vec::new, parse_query);
    let mut header_map: BTreeMap<String, Value> = BTreeMap::new();
    for (name, value) in headers {
        if hide_authorization && name == header::AUTHORIZATION {
            continue;
        }
        // Header values are almost always visible ASCII: checked faster than UTF-8.
        let value = match value.to_str() {
            Ok(value) => std::borrow::Cow::Borrowed(value),
            Err(_) => String::from_utf8_lossy(value.as_bytes()),
        };
        match header_map.get_mut(name.as_str()) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                header_map.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
            }
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    // The request's 8 values plus what a plugin typically sets back.
    let mut ctx = Context::with_capacity(label, 14)
        .with("label", label)
        .with("method", method.as_str())
        .with("path", uri.path())
        .with("params", params)
        .with("query", map(query))
        .with("headers", Value::Map(header_map));
    if is_json
        && body.len() <= JSON_LIMIT
        && let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        ctx.set("json", Value::from(json));
    }
    // No copy when the buffer is not shared.
    ctx.set("body", Value::Bytes(Vec::from(body)));
    ctx
}

/// `a=1&b=x%20y` → pairs, percent- and plus-decoded (`form_urlencoded`, as
/// browsers encode forms); a repeated key keeps the last value.
fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The plugin's answer: `response.status`, `response.headers`, `response.body`;
/// without any of them, the values the plugin set as a JSON object (200), or
/// 204 when it set nothing. A body without status gives 200.
fn plugin_response(plugin: &str, mut ctx: Context) -> Response {
    // Taken out, not cloned: a body moves into the response as it is.
    let body = ctx.remove("response.body");
    // A plugin need not know it is called over HTTP: one that shapes no
    // response gets the values it set, as a JSON object.
    let shaped = body.is_some()
        || ctx.get("response.status").is_some()
        || ctx.get("response.headers").is_some();
    let (content_type, body) = match body {
        None if !shaped => match written_json(&ctx) {
            Some(json) => ("application/json", Some(json.into())),
            None => ("", None),
        },
        None => ("", None),
        Some(Value::String(s)) => ("text/plain; charset=utf-8", Some(s.into())),
        Some(Value::Bytes(b)) => ("application/octet-stream", Some(b.into())),
        Some(other) => {
            let mut json = Vec::with_capacity(128);
            let _ = serde_json::to_writer(&mut json, &other);
            ("application/json", Some(json.into()))
        }
    };
    let status = match ctx.get("response.status") {
        None if body.is_none() => StatusCode::NO_CONTENT,
        None => StatusCode::OK,
        // Only final statuses: a 1xx would switch protocols or confuse hyper.
        Some(v) => match v
            .as_i64()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(status) => status,
            None => {
                let message = format!("plugin set an invalid response.status: {v:?}");
                return error_json(StatusCode::INTERNAL_SERVER_ERROR, &message, Some(plugin));
            }
        },
    };
    let body: axum::body::Body = body.unwrap_or_else(axum::body::Body::empty);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if !content_type.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if let Some(Value::Map(set)) = ctx.get("response.headers") {
        for (name, value) in set {
            let value = match value {
                Value::String(s) => s.clone(),
                other => serde_json::to_string(other).unwrap_or_default(),
            };
            match (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value),
            ) {
                // Framing and hop-by-hop headers belong to the server: a wrong
                // content-length would cut or stall the response.
                (Ok(name), Ok(_)) if FRAMING.contains(&name.as_str()) => {
                    tracing::warn!(plugin, header = %name, "plugin set a framing header; dropped")
                }
                (Ok(name), Ok(value)) => {
                    headers.insert(name, value);
                }
                _ => {
                    tracing::warn!(plugin, header = %name, "plugin set an invalid response header; dropped")
                }
            }
        }
    }
    response
}

/// The values the plugin set as a JSON object, keys sorted; `None` when it
/// set none. Written from the context's own values: no map is built and no
/// value copied (it was three allocations of a request's 32).
fn written_json(ctx: &Context) -> Option<Vec<u8>> {
    struct Object<'a>(&'a [(&'a str, &'a Value)]);
    impl serde::Serialize for Object<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }
    let mut written = ctx.written();
    let first = written.next()?;
    let mut json = Vec::with_capacity(128);
    match written.next() {
        None => {
            let _ = serde_json::to_writer(&mut json, &Object(&[first]));
        }
        Some(second) => {
            let mut all: Vec<(&str, &Value)> = [first, second].into_iter().chain(written).collect();
            all.sort_unstable_by_key(|&(k, _)| k);
            let _ = serde_json::to_writer(&mut json, &Object(&all));
        }
    }
    Some(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_values_are_a_json_object_with_sorted_keys() {
        let mut ctx = Context::new("l").with("input", "not written");
        assert_eq!(written_json(&ctx), None);
        ctx.set_from_plugin("zeta", Value::Int(1));
        assert_eq!(written_json(&ctx).unwrap(), br#"{"zeta":1}"#);
        ctx.set_from_plugin("alpha", Value::String("a".into()));
        ctx.set_from_plugin("mid", Value::Bool(true));
        assert_eq!(
            String::from_utf8(written_json(&ctx).unwrap()).unwrap(),
            r#"{"alpha":"a","mid":true,"zeta":1}"#
        );
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&c&d=%zz&&e=%41"),
            [
                ("a", "1"),
                ("b", "x y z"),
                ("c", ""),
                ("d", "%zz"),
                ("e", "A")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
