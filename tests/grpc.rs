//! The gRPC façade end to end: `dynplug.v1.Plugins` and the goplugin service,
//! over TCP and Unix sockets, with tonic clients.

mod support;

use std::time::Duration;

use dynplug::Value;
use dynplug::serve::proto::goplugin::plugin_client::PluginClient;
use dynplug::serve::proto::v1::plugins_client::PluginsClient;
use dynplug::serve::proto::v1::{self, value::Kind};
use support::server::{Fixture, eventually, grpc_over_unix, string};

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
        assert_eq!(
            reply.values.len(),
            1,
            "only what the plugin set comes back: {:?}",
            reply.values
        );

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
    assert_eq!(values, serde_json::json!({"greeting": "hello, Go"}));

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
