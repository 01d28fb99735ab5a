//! Socket plugins: servers dynplug did not start, found in a sockets
//! directory (JSON-RPC 2.0 and Docker style, Python fixtures) or named by
//! a manifest, called through the executor, HTTP (TCP and Unix) and gRPC;
//! they vanish, come back, stop answering and misbehave.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dynplug::serve::proto::v1;
use dynplug::serve::{Endpoint, Running, Server};
use dynplug::{Context, Error, Event, PluginManager, PluginState, Value};
use support::http::{Reply, exchange};
use support::server::{eventually, string};
use support::{ChildGuard, PATIENCE};

/// The Python standard-library socket plugin.
fn fixture() -> PathBuf {
    support::root().join("tests/fixtures/socket_plugin.py")
}

/// Starts the fixture with `args`; killed when the guard drops.
fn python(args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new("python3")
            .arg(fixture())
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs the socket fixture"),
    )
}

/// Waits until the plugin's listing row satisfies `check`.
async fn until(manager: &PluginManager, what: &str, check: impl Fn(&dynplug::PluginInfo) -> bool) {
    eventually(what, || {
        let ok = manager.info_of(what).is_some_and(|i| check(&i));
        async move { ok }
    })
    .await;
}

trait InfoOf {
    /// The row of the plugin `what` names (its first word).
    fn info_of(&self, what: &str) -> Option<dynplug::PluginInfo>;
}

impl InfoOf for PluginManager {
    fn info_of(&self, what: &str) -> Option<dynplug::PluginInfo> {
        self.info(what.split_whitespace().next().unwrap_or(what))
    }
}

fn serving(info: &dynplug::PluginInfo) -> bool {
    info.state == PluginState::Loaded && info.socket.as_ref().is_some_and(|s| s.connected)
}

struct Host {
    _plugins: tempfile::TempDir,
    run: tempfile::TempDir,
    sockets: PathBuf,
    manager: PluginManager,
    running: Option<Running>,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
}

impl Host {
    async fn start() -> Host {
        let plugins = tempfile::tempdir().unwrap();
        let run = support::private_tempdir();
        let sockets = run.path().join("sockets");
        let manager = PluginManager::new(plugins.path()).unwrap();
        let running = Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .http_unix(run.path().join("http.sock"))
            .grpc("127.0.0.1:0".parse().unwrap())
            .sockets(&sockets)
            .timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap();
        let tcp = |endpoints: &[Endpoint]| match endpoints[0] {
            Endpoint::Tcp(addr) => addr,
            _ => unreachable!("TCP first"),
        };
        Host {
            http: tcp(running.http_endpoints()),
            grpc: tcp(running.grpc_endpoints()),
            _plugins: plugins,
            sockets,
            manager,
            running: Some(running),
            run,
        }
    }

    fn socket(&self, name: &str) -> String {
        self.sockets.join(name).display().to_string()
    }

    async fn post(&self, path: &str, body: &str) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let headers = [("content-type", "application/json")];
        exchange(stream, "POST", path, &headers, body.as_bytes()).await
    }

    async fn post_unix(&self, path: &str, body: &str) -> Reply {
        let stream = tokio::net::UnixStream::connect(self.run.path().join("http.sock"))
            .await
            .unwrap();
        let headers = [("content-type", "application/json")];
        exchange(stream, "POST", path, &headers, body.as_bytes()).await
    }

    async fn grpc(&self) -> v1::plugins_client::PluginsClient<tonic::transport::Channel> {
        v1::plugins_client::PluginsClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn found_plugins_are_called_over_http_and_grpc_vanish_and_come_back() {
    let host = Host::start().await;
    let mut group = python(&["--style", "jsonrpc", "--socket", &host.socket("group")]);
    let _volumes = python(&["--style", "docker", "--socket", &host.socket("volumes")]);
    let listen = host.sockets.join("web.listen").display().to_string();
    let _web = python(&[
        "--style",
        "jsonrpc",
        "--interface",
        "Web",
        "--listen-file",
        &listen,
    ]);
    for name in ["group", "volumes", "web"] {
        until(&host.manager, &format!("{name} serving"), serving).await;
    }

    // What their handshakes said, shown and filterable.
    let socket = |name: &str| host.manager.info(name).unwrap().socket.unwrap();
    assert_eq!(socket("group").protocol, "jsonrpc");
    assert_eq!(socket("group").interfaces, ["Group/0.1.0"]);
    assert_eq!(socket("volumes").protocol, "docker");
    assert_eq!(socket("volumes").interfaces, ["VolumeDriver"]);
    assert!(
        socket("web").address.starts_with("127.0.0.1:"),
        "{:?}",
        socket("web")
    );
    assert!(socket("group").found_by.starts_with("sockets directory "));
    let listed = host.post("/_dynplug/plugins?interface=Group", "").await;
    assert_eq!(listed.status, 405, "the management API lists with GET");
    let stream = tokio::net::TcpStream::connect(host.http).await.unwrap();
    let listed = exchange(stream, "GET", "/_dynplug/plugins?interface=Group", &[], b"").await;
    let stream = tokio::net::TcpStream::connect(host.http).await.unwrap();
    let reloaded = exchange(stream, "POST", "/_dynplug/plugins/volumes/reload", &[], b"").await;
    assert_eq!(
        reloaded.status,
        200,
        "a found plugin reloads: {:?}",
        reloaded.json()
    );
    let names: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["group"]);

    // HTTP, TCP and Unix: the default route; body = params, reply = result.
    for reply in [
        host.post("/plugins/group/Group.InspectGroups", r#"{"x": 1}"#)
            .await,
        host.post_unix("/plugins/group/Group.InspectGroups", r#"{"x": 1}"#)
            .await,
    ] {
        assert_eq!(
            reply.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(
            reply.json(),
            serde_json::json!({"Groups": null, "Params": {"x": 1}})
        );
    }
    let reply = host.post("/plugins/group/List", "").await;
    assert_eq!(
        reply.json(),
        serde_json::json!(["a", "b"]),
        "a result that is not an object"
    );
    let reply = host.post("/plugins/web/Plugin.Implements", "").await;
    assert_eq!(reply.json()["Interfaces"][0]["Name"], "Web");
    // JSON-RPC errors keep their code and data.
    let reply = host.post("/plugins/group/Group.DescribeGroup", "{}").await;
    assert_eq!(reply.status, 500);
    let error = reply.json();
    assert_eq!(error["code"], -32000);
    assert_eq!(error["data"], serde_json::json!({"field": "ID"}));
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("Group ID must not be blank"),
        "{error}"
    );
    let reply = host.post("/plugins/group/Group.Nope", "{}").await;
    assert_eq!(reply.status, 404, "-32601 is HTTP 404");
    let reply = host.post("/plugins/group/Echo", "[1]").await;
    assert_eq!(reply.status, 400, "params are an object");
    // Parsed JSON is many times its size: over 1 MiB is refused unread.
    let big = format!(r#"{{"a": [{}0]}}"#, "0,".repeat(600_000));
    let reply = host.post("/plugins/group/Echo", &big).await;
    assert_eq!(reply.status, 413, "{:?}", reply.json());
    // Docker style: `{"Err": ...}` is the plugin's error.
    let reply = host
        .post("/plugins/volumes/VolumeDriver.Create", r#"{"Name":"v1"}"#)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), serde_json::json!({}));
    let reply = host
        .post("/plugins/volumes/VolumeDriver.Get", r#"{"Name":"v1"}"#)
        .await;
    assert_eq!(reply.json()["Volume"]["Mountpoint"], "/mnt/v1");
    let reply = host
        .post("/plugins/volumes/VolumeDriver.Get", r#"{"Name":"v9"}"#)
        .await;
    assert_eq!(reply.status, 500);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .ends_with("no such volume")
    );

    // gRPC: listed with their interfaces; label = method, values = params,
    // the values set back.
    let mut grpc = host.grpc().await;
    let listed = grpc.list(v1::ListRequest {}).await.unwrap().into_inner();
    let row = listed.plugins.iter().find(|p| p.name == "group").unwrap();
    assert_eq!(row.interfaces, ["Group/0.1.0"]);
    assert_eq!(row.mode, "socket");
    let reply = grpc
        .exec(v1::ExecRequest {
            plugin: "group".into(),
            label: "Echo".into(),
            values: [("a".to_owned(), string("b"))].into(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.values["a"], string("b"));
    let status = grpc
        .exec(v1::ExecRequest {
            plugin: "volumes".into(),
            label: "VolumeDriver.Get".into(),
            values: [("Name".to_owned(), string("v9"))].into(),
            timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("no such volume"), "{status:?}");

    // The executor: a JSON-RPC error is `Error::Plugin` with code and data.
    let (_, executor) = host.manager.get_plugin("group").unwrap();
    let mut ctx = Context::new("Group.DescribeGroup");
    match executor.execute_async(&mut ctx).await {
        Err(Error::Plugin {
            code: Some(-32000),
            data: Some(data),
            message,
            ..
        }) => {
            assert_eq!(message, "Group ID must not be blank");
            assert_eq!(data, Value::from(serde_json::json!({"field": "ID"})));
        }
        other => panic!("{other:?}"),
    }
    let mut ctx = Context::new("Group.DescribeGroup").with("ID", "g1");
    executor.execute(&mut ctx).unwrap();
    assert_eq!(ctx.get_i64("Instances"), Some(3));

    // Vanish: the socket goes; the plugin is unloaded, its route with it.
    let mut events = host.manager.subscribe();
    drop(group);
    std::fs::remove_file(host.sockets.join("group")).unwrap();
    let ended = support::wait_for_event(
        &mut events,
        "group unloaded",
        |e| matches!(e, Event::Unloaded { plugin, .. } if plugin == "group"),
    );
    assert!(matches!(ended, Event::Unloaded { .. }));
    eventually("the route is gone", || async {
        host.post("/plugins/group/List", "").await.status == 404
    })
    .await;
    assert_eq!(
        host.post("/plugins/volumes/Echo", r#"{"k":1}"#)
            .await
            .json(),
        serde_json::json!({"k": 1}),
        "the others serve"
    );
    // Come back: a new server on the same path is found again.
    group = python(&["--style", "jsonrpc", "--socket", &host.socket("group")]);
    until(&host.manager, "group serving again", serving).await;
    eventually("the route is back", || async {
        host.post("/plugins/group/List", "").await.status == 200
    })
    .await;
    drop(group);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_with_nothing_listening_is_reported_and_retried() {
    let host = Host::start().await;
    let mut events = host.manager.subscribe();
    let _group = python(&["--style", "jsonrpc", "--socket", &host.socket("group")]);
    // A socket file whose server is gone: bound, then closed.
    drop(std::os::unix::net::UnixListener::bind(host.sockets.join("mute")).unwrap());
    let reported = support::wait_for_event(
        &mut events,
        "mute reported",
        |e| matches!(e, Event::Unreachable { plugin, .. } if plugin == "mute"),
    );
    match reported {
        Event::Unreachable { reason, .. } => {
            assert!(reason.contains("Connection refused"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    until(&host.manager, "mute unreachable", |i| {
        i.state == PluginState::Unreachable
    })
    .await;
    // Its route follows the lifecycle events, as every route does.
    eventually("mute's route", || async {
        host.post("/plugins/mute/Echo", "{}").await.status != 404
    })
    .await;
    let reply = host.post("/plugins/mute/Echo", "{}").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("1"));
    let message = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(message.contains("unreachable: cannot connect"), "{message}");
    let mut grpc = host.grpc().await;
    let status = grpc
        .exec(v1::ExecRequest {
            plugin: "mute".into(),
            label: "Echo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    until(&host.manager, "group serving", serving).await;
    assert_eq!(
        host.post("/plugins/group/List", "").await.status,
        200,
        "the others serve"
    );
    // Retried: once something listens there, it is back in service.
    let _mute = python(&["--style", "docker", "--socket", &host.socket("mute")]);
    until(&host.manager, "mute serving", serving).await;
    let socket = host.manager.info("mute").unwrap().socket.unwrap();
    assert_eq!(socket.protocol, "docker", "identified when it answered");
    let reply = host.post("/plugins/mute/Echo", r#"{"k":"v"}"#).await;
    assert_eq!(reply.json(), serde_json::json!({"k": "v"}));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_late_replies_are_clear_errors() {
    let host = Host::start().await;
    let _group = python(&["--style", "jsonrpc", "--socket", &host.socket("group")]);
    let _other = python(&["--style", "jsonrpc", "--socket", &host.socket("other")]);
    for name in ["group", "other"] {
        until(&host.manager, &format!("{name} serving"), serving).await;
    }
    let (_, group) = host.manager.get_plugin("group").unwrap();
    match group.execute_async(&mut Context::new("Garbage")).await {
        Err(Error::BadReply { message, .. }) => {
            assert!(message.contains("not a JSON-RPC 2.0 response"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    match group.execute_async(&mut Context::new("Huge")).await {
        Err(Error::BadReply { message, .. }) => {
            assert!(message.contains("over the limit"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let reply = host.post("/plugins/group/Garbage", "").await;
    assert_eq!(reply.status, 502);
    // Past the deadline: the wait ends at it, and the plugin still serves.
    let started = Instant::now();
    let mut ctx = Context::new("Sleep")
        .with("ms", 10000)
        .with_timeout(Duration::from_millis(200));
    match group.execute_async(&mut ctx).await {
        Err(Error::DeadlineExceeded { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut ctx = Context::new("Sleep")
        .with("ms", 10000)
        .with_timeout(Duration::from_millis(200));
    match group.execute(&mut ctx) {
        Err(Error::DeadlineExceeded { .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut ctx = Context::new("Echo").with("n", 1);
    group.execute_async(&mut ctx).await.unwrap();
    assert_eq!(ctx.get_i64("n"), Some(1));
    assert_eq!(
        host.post("/plugins/other/List", "").await.status,
        200,
        "the others serve"
    );
    assert_eq!(
        host.manager.info("group").unwrap().state,
        PluginState::Loaded
    );
    host.stop().await;
}

/// A manifest naming a socket: manifest routes, health checks, 503 while
/// it is down, back when it answers, its handshake checked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_socket_plugins_go_unavailable_and_come_back() {
    let plugins = tempfile::tempdir().unwrap();
    let run = support::private_tempdir();
    let sock = run.path().join("group.sock");
    let dir = plugins.path().join("groups");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.json"),
        format!(
            r#"{{"name": "groups", "version": "1.0.0",
                "source": {{"mode": "socket", "path": "{}", "protocol": "jsonrpc",
                            "health_interval_ms": 50, "health_timeout_ms": 500, "health_misses": 2,
                            "reconnect_backoff_ms": 20, "reconnect_backoff_max_ms": 200}},
                "http_services": {{"routes": [{{"route": "/api/groups/:ID", "method": "GET", "label": "Group.DescribeGroup"}}]}}}}"#,
            sock.display()
        ),
    )
    .unwrap();
    let sock = sock.display().to_string();
    let mut server = python(&["--style", "jsonrpc", "--socket", &sock]);
    let manager = PluginManager::new(plugins.path()).unwrap();
    eventually("the server listens", || {
        let up = std::os::unix::net::UnixStream::connect(&sock).is_ok();
        async move { up }
    })
    .await;
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let running = Server::new(manager.clone())
        .http("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let Endpoint::Tcp(http) = running.http_endpoints()[0] else {
        unreachable!()
    };
    let get = |path: &'static str| async move {
        let stream = tokio::net::TcpStream::connect(http).await.unwrap();
        exchange(stream, "GET", path, &[], b"").await
    };
    // Path parameters arrive under `params`, as for every plugin: the
    // fixture answers DescribeGroup with an error without a top-level ID.
    let reply = get("/api/groups/g1").await;
    assert_eq!(
        reply.status,
        500,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["code"], -32000);
    assert_eq!(
        manager.info("groups").unwrap().socket.unwrap().interfaces,
        ["Group/0.1.0"]
    );

    let mut events = manager.subscribe();
    drop(server);
    support::wait_for_event(
        &mut events,
        "groups unreachable",
        |e| matches!(e, Event::Unreachable { plugin, .. } if plugin == "groups"),
    );
    assert_eq!(
        manager.info("groups").unwrap().state,
        PluginState::Unreachable
    );
    let reply = get("/api/groups/g1").await;
    assert_eq!(reply.status, 503, "routes stay, answering 503");
    // Back, now implementing something else: checked again.
    server = python(&[
        "--style",
        "jsonrpc",
        "--interface",
        "Flavor",
        "--socket",
        &sock,
    ]);
    let back = support::wait_for_event(
        &mut events,
        "groups reachable",
        |e| matches!(e, Event::Reachable { plugin, .. } if plugin == "groups"),
    );
    match back {
        Event::Reachable {
            interfaces,
            protocol,
            ..
        } => {
            assert_eq!(interfaces, ["Flavor/0.1.0"]);
            assert_eq!(protocol, "jsonrpc");
        }
        other => panic!("{other:?}"),
    }
    until(&manager, "groups serving", serving).await;
    assert_eq!(get("/api/groups/g1").await.status, 500, "served again");
    let socket = manager.info("groups").unwrap().socket.unwrap();
    assert_eq!(socket.reconnects, 1);
    drop(server);
    running.shutdown().await;
}

/// The goplugin wires over a socket: the gRPC and REST exec samples,
/// started by the test, not by dynplug.
#[test]
fn goplugin_servers_are_socket_plugins_too() {
    let plugins = tempfile::tempdir().unwrap();
    let run = support::private_tempdir();
    let mut servers = Vec::new();
    for (sample, protocol) in [("exec-grpc", "grpc"), ("exec-rest", "rest")] {
        let sock = run.path().join(format!("{sample}.sock"));
        servers.push(ChildGuard(
            Command::new(support::built().join(sample))
                .arg("--socket")
                .arg(&sock)
                .spawn()
                .unwrap(),
        ));
        let dir = plugins.path().join(sample);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("plugin.json"),
            format!(
                r#"{{"name": "{sample}", "version": "1.0.0", "source": {{"mode": "socket", "path": "{}", "protocol": "{protocol}"}}}}"#,
                sock.display()
            ),
        )
        .unwrap();
        support::eventually(&format!("{sample} to listen"), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }
    let manager = PluginManager::new(plugins.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for sample in ["exec-grpc", "exec-rest"] {
        let (_, executor) = manager.get_plugin(sample).unwrap();
        let mut ctx = Context::new("greet").with("name", "Ada");
        executor.execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"), "{sample}");
        let info = manager.info(sample).unwrap();
        assert_eq!(info.mode.as_deref(), Some("socket"));
        assert!(info.socket.unwrap().connected);
    }
    manager.unload_all();
    drop(servers);
}

/// `peer_uid`: a server that runs as the user named is spoken to; one that
/// does not (a path swapped for another service's socket, say) is refused
/// on connection, with both users named.
#[test]
fn a_socket_whose_server_runs_as_another_user_is_refused() {
    let plugins = tempfile::tempdir().unwrap();
    let run = support::private_tempdir();
    let sock = run.path().join("exec-grpc.sock");
    let _server = ChildGuard(
        Command::new(support::built().join("exec-grpc"))
            .arg("--socket")
            .arg(&sock)
            .spawn()
            .unwrap(),
    );
    let us = rustix::process::geteuid().as_raw();
    let other = us.wrapping_add(4242);
    for (name, uid) in [("mine", us), ("theirs", other)] {
        let dir = plugins.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("plugin.json"),
            format!(
                r#"{{"name": "{name}", "version": "1.0.0", "source": {{"mode": "socket", "path": "{}", "protocol": "grpc", "peer_uid": {uid}}}}}"#,
                sock.display()
            ),
        )
        .unwrap();
    }
    support::eventually("exec-grpc to listen", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let manager = PluginManager::new(plugins.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    let mut ctx = Context::new("greet").with("name", "Ada");
    support::call(&manager, "mine", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
    let refused = match report.failed.iter().find(|(name, _)| name == "theirs") {
        Some((_, error)) => error.to_string(),
        None => {
            let mut ctx = Context::new("greet").with("name", "Ada");
            support::call(&manager, "theirs", &mut ctx)
                .unwrap_err()
                .to_string()
        }
    };
    assert!(
        refused.contains(&format!("runs as uid {us}, not uid {other}")),
        "{refused}"
    );
    manager.unload_all();
}

/// A found socket never takes a name the plugins directory has.
#[test]
fn found_sockets_never_take_a_directory_plugins_name() {
    let (plugins, manager) = support::manager_with(&["hello"]);
    manager.load_plugins().unwrap();
    let run = support::private_tempdir();
    let sockets = run.path();
    let _hello = std::os::unix::net::UnixListener::bind(sockets.join("hello")).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(sockets.join("other")).unwrap();
    let discovery = manager.discover_sockets(sockets).unwrap();
    let hello = manager.info("hello").unwrap();
    assert_eq!(hello.mode.as_deref(), Some("local_so"));
    assert_eq!(hello.state, PluginState::Loaded);
    assert_eq!(
        manager.info("other").unwrap().mode.as_deref(),
        Some("socket")
    );
    let mut ctx = Context::new("hello.get").with("name", "Ada");
    support::call(&manager, "hello", &mut ctx).unwrap();
    // The directory's watcher leaves found plugins alone.
    let watcher = manager.watch().unwrap();
    std::fs::create_dir(plugins.path().join("other")).unwrap();
    std::fs::remove_dir(plugins.path().join("other")).unwrap();
    assert!(watcher.wait_settled(PATIENCE));
    assert!(manager.info("other").unwrap().state.in_service());
    drop(discovery);
    manager.unload_all();
}

/// The curl lines of `docs/socket-plugins.md` for a found plugin, run as
/// printed from a scratch directory (the test picks free ports: 8080 in
/// the text becomes the one it got, and gRPC listens on a free port).
#[test]
fn docs_curl_lines_work_as_printed() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let doc = std::fs::read_to_string(support::root().join("docs/socket-plugins.md")).unwrap();
    let block = doc
        .split("<!-- tested:")
        .nth(1)
        .and_then(|rest| rest.split("<!-- end tested -->").next())
        .expect("a tested block");
    let lines: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("```") && !l.starts_with("-->"))
        .skip(1)
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let fixtures = scratch.path().join("tests/fixtures");
    std::fs::create_dir_all(&fixtures).unwrap();
    std::fs::copy(fixture(), fixtures.join("socket_plugin.py")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let sh = |line: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(line.replace("127.0.0.1:8080", &address))
            .current_dir(scratch.path())
            .output()
            .unwrap()
    };
    let mut children = Vec::new();
    let mut expect: Option<(String, String)> = None;
    let mut checked = 0;
    for line in lines {
        if let Some(expected) = line.strip_prefix("# → ") {
            let (curl, output) = expect
                .take()
                .expect("an expected output follows a curl line");
            if expected.contains('…') {
                assert!(output.contains(r#""name":"group""#), "{curl}: {output}");
            } else {
                let got: serde_json::Value = serde_json::from_str(&output)
                    .unwrap_or_else(|e| panic!("{curl}: {e}: {output}"));
                let want: serde_json::Value = serde_json::from_str(expected).unwrap();
                assert_eq!(got, want, "{curl}");
            }
            checked += 1;
        } else if line.starts_with("curl ") {
            let out = sh(line);
            assert!(out.status.success(), "{line}: {out:?}");
            expect = Some((
                line.to_owned(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        } else if let Some(background) = line.strip_suffix('&') {
            let mut words: Vec<String> = background
                .replace("127.0.0.1:8080", &address)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if words[0] == "dynplug" {
                words[0] = env!("CARGO_BIN_EXE_dynplug").to_owned();
                words.extend(["--grpc".to_owned(), "127.0.0.1:0".to_owned()]);
            }
            let mut child = ChildGuard(
                Command::new(&words[0])
                    .args(&words[1..])
                    .current_dir(scratch.path())
                    .stdout(Stdio::piped())
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            if words[1] == "serve" {
                // Its first line says it listens.
                let lines = support::lines_of(child.0.stdout.take().unwrap());
                support::wait_for_line(&lines, |l| l.starts_with("HTTP"));
            }
            children.push(child);
        } else {
            let out = sh(line);
            assert!(out.status.success(), "{line}: {out:?}");
        }
        if line.starts_with("python3") {
            // Found and answering before the first curl.
            let deadline = Instant::now() + PATIENCE;
            loop {
                let out = sh(&format!("curl -sf http://{address}/_dynplug/plugins/group"));
                let state = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
                if state.is_some_and(|s| s["state"] == "loaded" && s["socket"]["connected"] == true)
                {
                    break;
                }
                assert!(Instant::now() < deadline, "group never served: {out:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(checked, 5, "every curl line of the block was checked");
    drop(children);
}
