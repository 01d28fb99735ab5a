//! The façades end to end: the real server on an ephemeral port and
//! temporary Unix sockets, real plugins, raw HTTP and a tonic client.

mod support;

use support::http::{Reply, exchange};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynplug::serve::proto::goplugin::plugin_client::PluginClient;
use dynplug::serve::proto::v1::plugins_client::PluginsClient;
use dynplug::serve::proto::v1::{self, value::Kind};
use dynplug::serve::{Endpoint, Running, Server};
use dynplug::{PluginManager, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;

struct Fixture {
    dir: tempfile::TempDir,
    manager: PluginManager,
    running: Option<Running>,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for sample in ["hello", "counter", "panicking", "slow"] {
            support::install(dir.path(), sample);
        }
        let manager = PluginManager::new(dir.path()).unwrap();
        let report = manager.load_plugins().unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let running = Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .http_unix(dir.path().join(".http.sock"))
            .grpc("127.0.0.1:0".parse().unwrap())
            .grpc_unix(dir.path().join(".grpc.sock"))
            .goplugin_sockets(dir.path().join(".goplugin"))
            .timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap();
        let tcp = |endpoints: &[Endpoint]| match endpoints[0] {
            Endpoint::Tcp(addr) => addr,
            _ => unreachable!("TCP first"),
        };
        Fixture {
            http: tcp(running.http_endpoints()),
            grpc: tcp(running.grpc_endpoints()),
            dir,
            manager,
            running: Some(running),
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], b"").await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        exchange(stream, method, path, headers, body).await
    }

    async fn grpc(&self) -> PluginsClient<Channel> {
        PluginsClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}

/// Polls until `check` passes (routes follow events asynchronously).
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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
    assert_eq!(
        f.get("/api/ok").await.status,
        204,
        "the panicking plugin still serves"
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
    sse.write_all(b"GET /_dynplug/events HTTP/1.1\r\nhost: test\r\n\r\n")
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

fn string(s: &str) -> v1::Value {
    v1::Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

async fn grpc_over_unix(path: &Path) -> Channel {
    let path = path.to_owned();
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_plugins_service_over_tcp_and_unix() {
    let f = Fixture::start().await;
    let unix = PluginsClient::new(grpc_over_unix(&f.socket(".grpc.sock")).await);
    for mut client in [f.grpc().await, unix] {
        let ping = client
            .ping(v1::PingRequest {
                plugin: "hello".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (ping.version.as_str(), ping.state.as_str()),
            ("1.0.0", "loaded")
        );

        let values = [("name".to_owned(), string("gRPC"))].into();
        let request = v1::ExecRequest {
            plugin: "hello".into(),
            label: "hello.get".into(),
            values,
            timeout_ms: 0,
        };
        let reply = client.exec(request).await.unwrap().into_inner();
        assert_eq!(reply.values["greeting"], string("hello, gRPC"));

        let numbers = v1::ValueList {
            items: (1..=4)
                .map(|i| v1::Value {
                    kind: Some(Kind::IntValue(i)),
                })
                .collect(),
        };
        let values = [(
            "numbers".to_owned(),
            v1::Value {
                kind: Some(Kind::ListValue(numbers)),
            },
        )]
        .into();
        let request = v1::ExecRequest {
            plugin: "hello".into(),
            label: "hello.sum".into(),
            values,
            timeout_ms: 0,
        };
        let reply = client.exec(request).await.unwrap().into_inner();
        assert_eq!(
            dynplug::serve::from_proto(reply.values["sum"].clone()),
            Value::Int(10)
        );

        let list = client.list(v1::ListRequest {}).await.unwrap().into_inner();
        assert_eq!(
            list.plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["counter", "hello", "panicking", "slow"]
        );

        let exec = |plugin: &str, label: &str, timeout_ms| v1::ExecRequest {
            plugin: plugin.into(),
            label: label.into(),
            values: Default::default(),
            timeout_ms,
        };
        let status = client.exec(exec("nope", "x", 0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        let status = client.exec(exec("panicking", "boom", 0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().contains("deliberate panic"),
            "{}",
            status.message()
        );
        let status = client.exec(exec("hello", "nope", 0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        let status = client.exec(exec("slow", "spin", 100)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let status = client
            .ping(v1::PingRequest {
                plugin: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    // Client-chosen keys are bounded.
    let mut client = f.grpc().await;
    let values = (0..1025).map(|i| (format!("k{i}"), string("v"))).collect();
    let request = v1::ExecRequest {
        plugin: "hello".into(),
        label: "hello.get".into(),
        values,
        timeout_ms: 0,
    };
    let status = client.exec(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Unloaded plugins are UNAVAILABLE.
    f.manager.unload("counter").unwrap();
    let mut client = f.grpc().await;
    let status = client
        .ping(v1::PingRequest {
            plugin: "counter".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let request = v1::ExecRequest {
        plugin: "counter".into(),
        label: "counter.get".into(),
        values: Default::default(),
        timeout_ms: 0,
    };
    assert_eq!(
        client.exec(request).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watch_streams_lifecycle_events() {
    let f = Fixture::start().await;
    let mut client = f.grpc().await;
    let mut stream = client
        .watch(v1::WatchRequest {})
        .await
        .unwrap()
        .into_inner();
    let manager = f.manager.clone();
    tokio::task::spawn_blocking(move || manager.load_plugin("counter").unwrap())
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.event.as_str(), event.plugin.as_str()),
        ("upgraded", "counter")
    );
    assert!(event.json.contains(r#""from":"1.0.0""#), "{}", event.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goplugin_clients_reach_any_plugin() {
    let f = Fixture::start().await;
    let mut client = PluginClient::connect(format!("http://{}", f.grpc))
        .await
        .unwrap();
    fn with_plugin<T>(plugin: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("x-dynplug-plugin", plugin.parse().unwrap());
        request
    }
    let ping = client
        .ping(with_plugin("hello", ()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ping.status.as_str(), ping.data.unwrap().response.as_str()),
        ("success", "pong")
    );

    let exec = dynplug::serve::proto::goplugin::ExecRequest {
        command: "hello.get".into(),
        payload: br#"{"name":"Go"}"#.to_vec(),
    };
    let reply = client
        .exec(with_plugin("hello", exec))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, "success");
    let values: serde_json::Value = serde_json::from_slice(&reply.data.unwrap().response).unwrap();
    assert_eq!(values["greeting"], "hello, Go");

    let status = client.ping(tonic::Request::new(())).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "the plugin must be named"
    );
    let status = client.ping(with_plugin("nope", ())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// An unmodified goplugin client (no metadata) reaches a plugin through its
/// own socket; sockets follow plugins as they unload and load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goplugin_sockets_serve_each_plugin_and_follow_it() {
    let f = Fixture::start().await;
    let dir = f.socket(".goplugin");
    let socket = dir.join("hello.sock");
    eventually("hello.sock", || {
        let socket = socket.clone();
        async move { socket.exists() }
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let mut client = PluginClient::new(grpc_over_unix(&socket).await);
    let exec = dynplug::serve::proto::goplugin::ExecRequest {
        command: "hello.get".into(),
        payload: br#"{"name":"socket"}"#.to_vec(),
    };
    let reply = client.exec(exec).await.unwrap().into_inner();
    let values: serde_json::Value = serde_json::from_slice(&reply.data.unwrap().response).unwrap();
    assert_eq!(values["greeting"], "hello, socket");
    let ping = client.ping(()).await.unwrap().into_inner();
    assert_eq!(ping.status, "success");

    let manager = f.manager.clone();
    tokio::task::spawn_blocking(move || manager.unload("hello").unwrap())
        .await
        .unwrap();
    eventually("hello.sock removed", || {
        let socket = socket.clone();
        async move { !socket.exists() }
    })
    .await;
    assert!(
        dir.join("counter.sock").exists(),
        "other plugins keep their sockets"
    );
    let manager = f.manager.clone();
    tokio::task::spawn_blocking(move || manager.load_plugin("hello").unwrap())
        .await
        .unwrap();
    eventually("hello.sock back", || {
        let socket = socket.clone();
        async move { socket.exists() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let mut f = Fixture::start().await;
    let addr = f.http;
    let in_flight = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        exchange(stream, "GET", "/api/slow?max_ms=250", &[], b"").await
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let started = Instant::now();
    f.running.take().unwrap().shutdown().await;
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status, 204,
        "the in-flight request completed: {reply:?}"
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
