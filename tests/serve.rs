//! The façades end to end: the real server on an ephemeral port and
//! temporary Unix sockets, real plugins, raw HTTP and a tonic client.

mod support;

use support::http::exchange;
use support::server::{Fixture, eventually};

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_map_requests_to_plugins_and_responses_back() {
    let f = Fixture::start().await;
    let r = f.get("/api/hello/Ada").await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"greeting": "hello, Ada"}))
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = f.get("/api/hello?name=Bob%20B").await;
    assert_eq!(r.json()["greeting"], "hello, Bob B");
    let r = f
        .request(
            "POST",
            "/api/hello",
            &[("content-type", "application/json")],
            br#"{"name":"Cy"}"#,
        )
        .await;
    assert_eq!(r.json()["greeting"], "hello, Cy");

    let r = f.get("/api/respond/text").await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"plain text".as_slice())
    );
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = f.get("/api/respond/bytes").await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, [0u8, 159, 146, 150].as_slice())
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let r = f.get("/api/respond/json?status=201&header=yes").await;
    assert_eq!((r.status, r.json()), (201, serde_json::json!([1, "two"])));
    assert_eq!(r.header("x-hello"), Some("yes"));
    let r = f.get("/api/respond/none").await;
    assert_eq!(
        (r.status, r.body.len(), r.header("content-type")),
        (204, 0, None)
    );
    let r = f.get("/api/respond/none?status=202").await;
    assert_eq!(r.status, 202);
    // HEAD is served by the GET route: same status and headers, no body.
    let r = f.request("HEAD", "/api/hello/Ada", &[], b"").await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("25"));

    // Counter keeps state across HTTP calls.
    f.request("POST", "/api/counter", &[], b"").await;
    let r = f.request("POST", "/api/counter", &[], b"").await;
    assert_eq!(r.json()["count"], 2);

    // The same over the Unix socket.
    let stream = tokio::net::UnixStream::connect(f.socket(".http.sock"))
        .await
        .unwrap();
    let r = exchange(stream, "GET", "/api/hello/Unix", &[], b"").await;
    assert_eq!(r.json()["greeting"], "hello, Unix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    let f = Fixture::start().await;
    let r = f.get("/nope").await;
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            serde_json::json!({"error": "no route for GET /nope", "plugin": null})
        )
    );
    let r = f.request("DELETE", "/api/hello", &[], b"").await;
    assert_eq!(
        r.status, 404,
        "a known path with another method is not routed"
    );
    let r = f.get("/_dynplug/nope").await;
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            serde_json::json!({"error": "no route for GET /_dynplug/nope", "plugin": null})
        ),
        "the management API answers its own unknown paths the same way"
    );

    let r = f.get("/api/respond/weird").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["plugin"], "hello");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("no response kind weird"),
        "{:?}",
        r.json()
    );

    let r = f.get("/api/panic").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["plugin"], "panicking");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("panicked: panicking plugin: deliberate panic"),
        "{:?}",
        r.json()
    );
    let ok = f.get("/api/ok").await;
    assert_eq!(
        (ok.status, ok.json()),
        (200, serde_json::json!({"ok": true})),
        "the panicking plugin still serves, and what it set is the reply"
    );

    let started = Instant::now();
    let r = f.get("/api/slow").await;
    assert_eq!(r.status, 504, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["plugin"], "slow");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the route's 300 ms timeout applied"
    );

    // Unavailable is 503 with Retry-After (the mapping is shared by every route).
    use axum::response::IntoResponse;
    let response = dynplug::Error::Unavailable {
        plugin: "p".into(),
        reason: "draining".into(),
    }
    .into_response();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_lists_reloads_unloads_and_streams_events() {
    let f = Fixture::start().await;
    let r = f.get("/_dynplug/health").await;
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["loaded"], 4);
    let r = f.get("/_dynplug/plugins").await;
    let plugins = r.json();
    let hello = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hello")
        .unwrap();
    assert_eq!(hello["state"], "loaded");
    assert_eq!(hello["isolation"], "pooled");
    assert_eq!(hello["routes"].as_array().unwrap().len(), 4);
    assert_eq!(
        f.get("/_dynplug/plugins/counter").await.json()["version"],
        "1.0.0"
    );
    assert_eq!(f.get("/_dynplug/plugins/nope").await.status, 404);
    assert!(
        String::from_utf8_lossy(&f.get("/_dynplug/").await.body).contains("<title>dynplug</title>")
    );

    // Follow the event stream while the plugin is unloaded and reloaded.
    let mut sse = tokio::net::TcpStream::connect(f.http).await.unwrap();
    sse.write_all(b"GET /_dynplug/events HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut sse = BufReader::new(sse);
    let mut line = String::new();
    sse.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");

    let r = f
        .request("DELETE", "/_dynplug/plugins/counter", &[], b"")
        .await;
    assert_eq!(
        r.json(),
        serde_json::json!({"plugin": "counter", "state": "unloaded"})
    );
    let r = f
        .request("DELETE", "/_dynplug/plugins/counter", &[], b"")
        .await;
    assert_eq!(
        r.status, 409,
        "unloading what is not loaded is a conflict, not a 503"
    );
    eventually("counter route gone", || async {
        f.request("POST", "/api/counter", &[], b"").await.status == 404
    })
    .await;
    assert_eq!(
        f.get("/_dynplug/plugins/counter").await.json()["state"],
        "unloaded"
    );

    let r = f
        .request("POST", "/_dynplug/plugins/counter/reload", &[], b"")
        .await;
    assert_eq!(
        r.json(),
        serde_json::json!({"plugin": "counter", "version": "1.0.0", "state": "loaded"})
    );
    eventually("counter route back", || async {
        f.request("POST", "/api/counter", &[], b"").await.status == 200
    })
    .await;
    assert_eq!(
        f.request("POST", "/_dynplug/plugins/nope/reload", &[], b"")
            .await
            .status,
        404
    );

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains(r#"data: {"event":"loaded""#))
    {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), sse.read_line(&mut line))
            .await
            .expect("an event")
            .unwrap();
        seen.push(line);
    }
    let text = seen.concat();
    assert!(text.contains("event: unloaded"), "{text}");
    assert!(
        text.contains(r#"data: {"event":"loaded","plugin":"counter","version":"1.0.0"}"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_errors_and_latency() {
    let f = Fixture::start().await;
    for _ in 0..3 {
        f.get("/api/hello/x").await;
    }
    f.get("/api/panic").await;
    let r = f.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(r.body).unwrap();
    for expected in [
        r#"dynplug_calls_total{plugin="hello"} 3"#,
        r#"dynplug_errors_total{plugin="panicking"} 1"#,
        r#"dynplug_panics_total{plugin="panicking"} 1"#,
        r#"dynplug_in_flight{plugin="hello"} 0"#,
        r#"dynplug_plugin_info{plugin="hello",version="1.0.0",mode="local_so",isolation="pooled",state="loaded"} 1"#,
        r#"dynplug_upgrades_total{plugin="hello"} 0"#,
        r#"dynplug_leaked_copies{plugin="hello"} 0"#,
        r#"dynplug_request_duration_seconds_count{plugin="hello",facade="http"} 3"#,
        r#"dynplug_request_duration_seconds_bucket{plugin="hello",facade="http",le="+Inf"} 3"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let mut f = Fixture::start().await;
    let addr = f.http;
    let running = f.dir.path().join(".running");
    let path = format!("/api/slow?max_ms=250&started_file={}", running.display());
    let in_flight = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        exchange(stream, "GET", &path, &[], b"").await
    });
    eventually("the slow request runs in the plugin", || {
        let running = running.clone();
        async move { running.exists() }
    })
    .await;
    let started = Instant::now();
    f.running.take().unwrap().shutdown().await;
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status, 200,
        "the in-flight request completed: {reply:?}"
    );
    assert!(
        reply.json()["iterations"].as_i64().unwrap() > 0,
        "{reply:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "shutdown waited for it"
    );
    assert!(
        f.manager
            .list()
            .iter()
            .all(|p| p.state == dynplug::PluginState::Unloaded),
        "plugins drained and unloaded"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_facade_mounts_in_a_hosts_own_axum_app() {
    let dir = tempfile::tempdir().unwrap();
    support::install(dir.path(), "hello");
    let manager = dynplug::PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    // No endpoints of its own: the host serves HTTP.
    let running = dynplug::serve::Server::new(manager.clone())
        .start()
        .await
        .unwrap();
    assert!(running.http_endpoints().is_empty());
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "the host's page" }))
        .nest_service("/plugins", running.http_service())
        .nest_service("/public", running.http_service().without_management())
        .fallback_service(running.http_service());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let get = |path: &'static str| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        exchange(stream, "GET", path, &[], b"").await
    };

    assert_eq!(get("/").await.body, b"the host's page");
    for path in ["/api/hello/Ada", "/plugins/api/hello/Ada"] {
        let r = get(path).await;
        assert_eq!(
            (r.status, r.json()["greeting"].clone()),
            (200, "hello, Ada".into()),
            "{path}"
        );
    }
    let r = get("/plugins/_dynplug/plugins").await;
    assert_eq!(r.json()[0]["name"], "hello");
    // The page works under a prefix: relative URLs, and a relative redirect to it.
    let page = String::from_utf8(get("/plugins/_dynplug/").await.body).unwrap();
    assert!(page.contains("api('plugins')") && page.contains("EventSource('events')"));
    assert!(!page.contains("'/_dynplug"), "no absolute URL");
    let r = get("/plugins/_dynplug").await;
    assert_eq!((r.status, r.header("location")), (308, Some("_dynplug/")));
    // Without management: plugin routes only.
    assert_eq!(get("/public/api/hello/Ada").await.status, 200);
    for path in ["/public/_dynplug/plugins", "/public/metrics"] {
        let r = get(path).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(r.json()["error"].as_str().unwrap().starts_with("no route"));
    }
    assert!(
        String::from_utf8_lossy(&get("/metrics").await.body)
            .contains("dynplug_calls_total{plugin=\"hello\"} 3")
    );

    // The mounted service follows the plugin out and back in.
    manager.unload("hello").unwrap();
    eventually("the route is unmounted", || async {
        get("/api/hello/Ada").await.status == 404
    })
    .await;
    manager.load_plugin("hello").unwrap();
    eventually("the route is back", || async {
        get("/api/hello/Ada").await.status == 200
    })
    .await;

    // After shutdown, the mounted service refuses rather than serving from
    // unloaded plugins or reloading them.
    running.shutdown().await;
    let r = get("/api/hello/Ada").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (503, "the dynplug server has shut down".into())
    );
    assert_eq!(get("/_dynplug/health").await.status, 503);
    assert_eq!(get("/").await.body, b"the host's page");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_token_guards_data_and_actions() {
    let dir = tempfile::tempdir().unwrap();
    support::install(dir.path(), "hello");
    let manager = dynplug::PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    let running = dynplug::serve::Server::new(manager.clone())
        .http("127.0.0.1:0".parse().unwrap())
        .management_token("s3cret token")
        .start()
        .await
        .unwrap();
    let dynplug::serve::Endpoint::Tcp(addr) = running.http_endpoints()[0].clone() else {
        unreachable!()
    };
    let request = |method: &'static str, path: &'static str, headers: &'static [(&str, &str)]| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        exchange(stream, method, path, headers, b"").await
    };

    let r = request("GET", "/_dynplug/plugins", &[]).await;
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer realm=\"dynplug\""))
    );
    assert!(r.json()["error"].as_str().unwrap().contains("Bearer"));
    for (what, headers) in [
        ("a wrong token", &[("authorization", "Bearer s3cret")][..]),
        (
            "a wrong scheme",
            &[("authorization", "Basic s3cret token")][..],
        ),
        ("a wrong cookie", &[("cookie", "dynplug_token=nope")][..]),
    ] {
        let r = request("GET", "/_dynplug/plugins", headers).await;
        assert_eq!(r.status, 401, "{what}");
    }
    let r = request("DELETE", "/_dynplug/plugins/hello", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(request("GET", "/_dynplug/events", &[]).await.status, 401);
    assert!(manager.info("hello").unwrap().state == dynplug::PluginState::Loaded);

    let bearer = &[("authorization", "Bearer s3cret token")][..];
    let r = request("GET", "/_dynplug/plugins", bearer).await;
    assert_eq!(
        (r.status, r.json()[0]["name"].clone()),
        (200, "hello".into())
    );
    let lower_case = &[("authorization", "bearer s3cret token")][..];
    assert_eq!(
        request("GET", "/_dynplug/plugins", lower_case).await.status,
        200
    );
    // The web page's way: a percent-encoded cookie among others, after a stale one.
    let cookie = &[(
        "cookie",
        "dynplug_token=old; theme=dark; dynplug_token=s3cret%20token",
    )][..];
    assert_eq!(
        request("GET", "/_dynplug/plugins/hello", cookie)
            .await
            .status,
        200
    );

    // Open: the page (it asks for the token), health, metrics, plugin routes.
    for path in [
        "/_dynplug/",
        "/_dynplug/health",
        "/metrics",
        "/api/hello/Ada",
    ] {
        assert_eq!(request("GET", path, &[]).await.status, 200, "{path}");
    }
    running.shutdown().await;
}

/// Under the default isolation (`auto`), a plugin that blocks never stalls
/// the other requests, though quick calls run in place on the runtime's
/// two workers: at most one worker is in plugin code at a time (the others'
/// calls go to the plugin's own workers), and a label seen slow runs on the
/// plugin's workers from then on, where its deadline returns the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_plugin_does_not_stall_other_requests() {
    let f = Fixture::start().await;
    let hold = f.dir.path().join(".hold");
    std::fs::write(&hold, b"").unwrap();
    let marker = |i: usize| f.dir.path().join(format!(".blocked-{i}"));
    // More blocked calls than the runtime has workers.
    let blocked: Vec<_> = (0..4)
        .map(|i| {
            let addr = f.http;
            let path = format!(
                "/api/slow?max_ms=60000&hold_file={}&started_file={}",
                hold.display(),
                marker(i).display()
            );
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                exchange(stream, "GET", &path, &[], b"").await
            })
        })
        .collect();
    eventually("a blocked call runs in the plugin", || {
        let started = (0..4).any(|i| marker(i).exists());
        async move { started }
    })
    .await;
    // Every other request is served while the plugin blocks.
    for i in 0..10 {
        let r = f.get(&format!("/api/hello/n{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = f.request("POST", "/api/counter", &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    // One call runs in place, on one of the two workers; the other three
    // went to the plugin's workers, where the route's 300 ms timeout
    // answers them (the plugin ignores it). The one in place cannot be
    // abandoned: it holds until released.
    eventually("the calls on the plugin's workers time out", || {
        let finished = blocked.iter().filter(|b| b.is_finished()).count();
        async move { finished >= 3 }
    })
    .await;
    assert_eq!(blocked.iter().filter(|b| b.is_finished()).count(), 3);
    std::fs::remove_file(&hold).unwrap();
    let mut statuses = Vec::new();
    for b in blocked {
        statuses.push(b.await.unwrap().status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 504, 504, 504]);
    // The label was seen slow: it now runs on the plugin's workers, where
    // the deadline returns the caller on time although the plugin blocks.
    std::fs::write(&hold, b"").unwrap();
    let started = Instant::now();
    let r = f
        .get(&format!(
            "/api/slow?max_ms=60000&hold_file={}",
            hold.display()
        ))
        .await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    std::fs::remove_file(&hold).unwrap();
}

/// A route is served as soon as the call that loaded its plugin returns:
/// the table the server follows events with may lag (a busy machine), and a
/// miss in a table older than the manager's state looks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_is_served_once_its_load_returns() {
    let f = Fixture::start().await;
    for round in 0..20 {
        f.manager.unload("counter").unwrap();
        eventually("counter's route gone", || async {
            f.request("POST", "/api/counter", &[], b"").await.status == 404
        })
        .await;
        let manager = f.manager.clone();
        tokio::task::spawn_blocking(move || manager.load_plugin("counter"))
            .await
            .unwrap()
            .unwrap();
        let r = f.request("POST", "/api/counter", &[], b"").await;
        assert_eq!(
            r.status,
            200,
            "round {round}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}
