//! The plugin registry: plugins that register themselves (the `connection`
//! sample), dialled back, served, probed, unregistered when they die,
//! registered again; refusals with their reasons; capability fan-outs.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dynplug::serve::proto::registry::{PluginInfo, plugin_registry_client::PluginRegistryClient};
use dynplug::serve::{Endpoint, Registry, Running, Server};
use dynplug::{Context, Error, Event, PluginManager, PluginState, Value};
use support::http::exchange;
use support::server::grpc_over_unix;
use support::{ChildGuard, PATIENCE, wait_for_event};

struct Host {
    _plugins: tempfile::TempDir,
    run: tempfile::TempDir,
    manager: PluginManager,
    running: Option<Running>,
    http: std::net::SocketAddr,
}

impl Host {
    async fn start(configure: impl FnOnce(Registry) -> Registry) -> Host {
        let plugins = tempfile::tempdir().unwrap();
        let run = support::private_tempdir();
        let manager = PluginManager::new(plugins.path()).unwrap();
        let registry = configure(
            // Quick probes, but a plugin is dropped only after a second
            // without an answer: a loaded machine can stall a probe for
            // more than 150 ms, and a dropped plugin fails the next call.
            Registry::new(run.path().join("registry.sock")).probe(Duration::from_millis(50), 20),
        );
        let running = Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .registry(registry)
            .start()
            .await
            .unwrap();
        let Endpoint::Tcp(http) = running.http_endpoints()[0] else {
            unreachable!()
        };
        Host {
            _plugins: plugins,
            run,
            manager,
            running: Some(running),
            http,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.run.path().join(name)
    }

    fn registry(&self) -> PathBuf {
        self.path("registry.sock")
    }

    /// Runs the sample: `name` on `<run>/<name>.sock` with `extra` flags.
    fn plugin(&self, name: &str, extra: &[&str]) -> Plugin {
        self.plugin_at(name, &self.path(&format!("{name}.sock")), extra)
    }

    fn plugin_at(&self, name: &str, socket: &Path, extra: &[&str]) -> Plugin {
        let mut child = ChildGuard(
            Command::new(support::built().join("connection"))
                .arg("--registry")
                .arg(self.registry())
                .arg("--socket")
                .arg(socket)
                .args(["--name", name])
                .args(extra)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Plugin {
            line: line.trim().to_owned(),
            _child: child,
        }
    }

    async fn client(&self) -> PluginRegistryClient<tonic::transport::Channel> {
        PluginRegistryClient::new(grpc_over_unix(&self.registry()).await)
    }

    async fn http(&self, method: &str, path: &str, body: &str) -> support::http::Reply {
        let stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        exchange(stream, method, path, &[], body.as_bytes()).await
    }

    async fn metric(&self, line: &str) -> bool {
        let metrics = self.http("GET", "/metrics", "").await;
        String::from_utf8_lossy(&metrics.body)
            .lines()
            .any(|l| l == line)
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// A running sample and the first line it printed: `registered NAME` or
/// `refused: CODE: message`.
struct Plugin {
    line: String,
    _child: ChildGuard,
}

impl Plugin {
    fn registered(&self) -> bool {
        self.line.starts_with("registered ")
    }

    fn pid(&self) -> u32 {
        self._child.0.id()
    }
}

fn events_of(manager: &PluginManager) -> dynplug::Events {
    manager.subscribe()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_registers_serves_dies_is_unregistered_and_registers_again() {
    let host = Host::start(|r| r).await;
    let mut events = events_of(&host.manager);
    let a = host.plugin("a", &[]);
    assert!(a.registered(), "{}", a.line);
    let info = host.manager.info("a").unwrap();
    assert_eq!(info.state, PluginState::Loaded);
    assert_eq!(info.capabilities, ["CONNECTION"]);
    let socket = info.socket.unwrap();
    assert!(socket.found_by.starts_with("registry "), "{socket:?}");
    assert_eq!(socket.protocol, "grpc");
    assert!(socket.connected);

    // Served: the executor, the default HTTP route.
    let (_, executor) = host.manager.get_plugin("a").unwrap();
    let mut ctx = Context::new("UpdateConnection")
        .with("connection", Value::from(serde_json::json!({"id": "c1"})));
    executor.execute_async(&mut ctx).await.unwrap();
    assert_eq!(
        ctx.get("connection"),
        Some(&Value::from(serde_json::json!({"id": "c1", "path": ["a"]})))
    );
    let reply = host
        .http("POST", "/plugins/a/ValidateConnection", "{}")
        .await;
    assert_eq!(reply.json(), serde_json::json!({"status": "success"}));
    assert!(host.metric("dynplug_registry_plugins 1").await);
    assert!(host.metric("dynplug_registry_registrations_total 1").await);
    // The same registration again: accepted, nothing reloaded.
    let same = PluginInfo {
        name: "a".into(),
        endpoint: format!("unix:{}", host.path("a.sock").display()),
        capabilities: vec![0],
    };
    host.client().await.register(same).await.unwrap();
    assert_eq!(host.manager.info("a").unwrap().upgrades, 0);

    // Killed: unregistered after the missed probes, then unloaded.
    let pid = a.pid();
    drop(a);
    let gone = wait_for_event(
        &mut events,
        "a unregistered",
        |e| matches!(e, Event::Unregistered { plugin, .. } if plugin == "a"),
    );
    let Event::Unregistered {
        reason, endpoint, ..
    } = gone
    else {
        unreachable!()
    };
    assert!(reason.starts_with("missed its probes"), "{reason}");
    assert!(endpoint.ends_with("a.sock"), "{endpoint}");
    wait_for_event(
        &mut events,
        "a unloaded",
        |e| matches!(e, Event::Unloaded { plugin, .. } if plugin == "a"),
    );
    assert_eq!(host.manager.info("a").unwrap().state, PluginState::Unloaded);
    match executor.execute_async(&mut Context::new("Name")).await {
        Err(Error::Unavailable { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(host.metric("dynplug_registry_plugins 0").await);
    assert!(
        host.metric(r#"dynplug_registry_unregistered_total{reason="probes"} 1"#)
            .await
    );

    // Back: it registers again, and the executor held before serves.
    let a = host.plugin("a", &[]);
    assert!(a.registered(), "{}", a.line);
    let mut ctx = Context::new("Name");
    executor.execute_async(&mut ctx).await.unwrap();
    assert_eq!(ctx.get_i64("pid"), Some(i64::from(a.pid())));
    assert_ne!(a.pid(), pid);

    // Unregister: explicit, once.
    let mut client = host.client().await;
    let endpoint = host.path("a.sock").display().to_string();
    let asked = PluginInfo {
        name: "a".into(),
        endpoint,
        capabilities: Vec::new(),
    };
    client.unregister(asked.clone()).await.unwrap();
    let gone = wait_for_event(
        &mut events,
        "a unregistered on request",
        |e| matches!(e, Event::Unregistered { plugin, reason, .. } if plugin == "a" && reason.contains("Unregister")),
    );
    assert!(matches!(gone, Event::Unregistered { .. }));
    let status = client.unregister(asked).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    drop(a);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations_say_why_and_the_others_keep_serving() {
    let host = Host::start(|r| r).await;
    let a = host.plugin("a", &[]);
    assert!(a.registered(), "{}", a.line);
    let refused = |plugin: &Plugin, code: &str, why: &str| {
        assert!(
            plugin.line.starts_with(&format!("refused: {code}: ")) && plugin.line.contains(why),
            "expected {code} with `{why}`, got `{}`",
            plugin.line
        );
    };

    // Empty fields.
    refused(&host.plugin("", &[]), "InvalidArgument", "name is empty");
    refused(
        &host.plugin("e1", &["--endpoint", ""]),
        "InvalidArgument",
        "endpoint is empty",
    );
    refused(
        &host.plugin("e2", &["--capability", "none"]),
        "InvalidArgument",
        "capabilities are empty",
    );
    // Endpoints: never another service's socket, never outside the
    // allowed directory, never TCP, never through a link.
    refused(
        &host.plugin("docker", &["--endpoint", "/var/run/docker.sock"]),
        "PermissionDenied",
        "outside the allowed directories",
    );
    let elsewhere = support::private_tempdir();
    let outside = elsewhere.path().join("x.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&outside).unwrap();
    refused(
        &host.plugin("out", &["--endpoint", outside.to_str().unwrap()]),
        "PermissionDenied",
        "outside the allowed directories",
    );
    let link = host.path("to-outside.sock");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    refused(
        &host.plugin("link", &["--endpoint", link.to_str().unwrap()]),
        "PermissionDenied",
        "not a Unix socket (links are not followed)",
    );
    refused(
        &host.plugin("tcp", &["--endpoint", "tcp://127.0.0.1:1"]),
        "PermissionDenied",
        "TCP is not accepted",
    );
    // Dialled back: nothing answers there.
    let mute = host.path("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&mute).unwrap());
    refused(
        &host.plugin("mute", &["--endpoint", mute.to_str().unwrap()]),
        "FailedPrecondition",
        "did not answer Ping",
    );
    // The name, with another endpoint that answers.
    refused(
        &host.plugin_at("a", &host.path("a2.sock"), &[]),
        "AlreadyExists",
        "registered with endpoint",
    );
    // A caller of another user (root can make one: see the sample's
    // `become_uid`; the kernel reports that user on the registry socket).
    if rustix::process::geteuid().is_root() {
        let nobody = host.plugin("nobody", &["--as-uid", "65534"]);
        if nobody.line.starts_with("cannot become uid") {
            eprintln!("another user not tested here: {}", nobody.line);
        } else {
            refused(&nobody, "PermissionDenied", "a caller of uid 65534 (pid ");
        }
    }
    // Each refusal left `a` serving, and nothing else registered.
    let mut ctx = Context::new("Name");
    support::call(&host.manager, "a", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("name"), Some("a"));
    let names: Vec<String> = host.manager.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["a"]);
    assert!(
        host.metric(r#"dynplug_registry_refused_total{reason="invalid"} 3"#)
            .await
    );
    assert!(
        host.metric(r#"dynplug_registry_refused_total{reason="endpoint"} 4"#)
            .await
    );
    assert!(
        host.metric(r#"dynplug_registry_refused_total{reason="unreachable"} 1"#)
            .await
    );
    drop(a);
    host.stop().await;

    // Another user: the allowed list excludes ours (tests run as one user).
    let us = rustix::process::geteuid().as_raw();
    let strict = Host::start(|r| r.allowed_uids([us.wrapping_add(4242)])).await;
    let p = strict.plugin("p", &[]);
    refused(
        &p,
        "PermissionDenied",
        &format!("a caller of uid {us} (pid "),
    );
    assert!(p.line.contains("may not register"), "{}", p.line);
    assert!(strict.manager.list().is_empty());
    strict.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_outs_go_in_name_order_with_a_deadline_each_and_stop_early() {
    let host = Host::start(|r| r).await;
    // Started out of order: the fan-out order is by name.
    let c = host.plugin("c", &[]);
    let a = host.plugin("a", &[]);
    let b = host.plugin("b", &[]);
    let other = host.plugin("other", &["--capability", "EXEC"]);
    for p in [&a, &b, &c, &other] {
        assert!(p.registered(), "{}", p.line);
    }
    let manager = &host.manager;
    assert_eq!(manager.with_capability("CONNECTION"), ["a", "b", "c"]);
    assert_eq!(manager.with_capability("EXEC"), ["other"]);

    let per_plugin = Duration::from_secs(5);
    let connection = || {
        Context::new("UpdateConnection")
            .with("connection", Value::from(serde_json::json!({"id": "c1"})))
    };
    let mut ctx = connection();
    let chained = manager.chain("CONNECTION", &mut ctx, per_plugin).await;
    assert!(chained.succeeded(), "{chained:?}");
    assert_eq!(chained.called(), ["a", "b", "c"]);
    assert_eq!(
        ctx.get("connection"),
        Some(&Value::from(
            serde_json::json!({"id": "c1", "path": ["a", "b", "c"]})
        )),
        "each output fed the next"
    );
    let validated = manager
        .validate(
            "CONNECTION",
            &Context::new("ValidateConnection"),
            per_plugin,
        )
        .await;
    assert!(validated.succeeded(), "{validated:?}");
    assert_eq!(validated.called(), ["a", "b", "c"]);

    // `bb` errs and finds connections invalid: both stop there.
    let bb = host.plugin("bb", &["--fail", "--invalid"]);
    assert!(bb.registered(), "{}", bb.line);
    let mut ctx = connection();
    let chained = manager.chain("CONNECTION", &mut ctx, per_plugin).await;
    assert_eq!(chained.called(), ["a", "b", "bb"]);
    assert_eq!(chained.skipped, ["c"]);
    let (at, error) = chained.stopped_by().unwrap();
    assert_eq!(at, "bb");
    assert!(
        error.to_string().contains("bb refuses the connection"),
        "{error}"
    );
    assert_eq!(
        ctx.get("connection"),
        Some(&Value::from(
            serde_json::json!({"id": "c1", "path": ["a", "b"]})
        )),
        "the last successful output"
    );
    let validated = manager
        .validate(
            "CONNECTION",
            &Context::new("ValidateConnection"),
            per_plugin,
        )
        .await;
    assert_eq!(validated.called(), ["a", "b", "bb"]);
    assert_eq!(validated.skipped, ["c"]);
    match validated.stopped_by() {
        Some(("bb", Error::Plugin { message, .. })) => {
            assert_eq!(message, "bb finds the connection invalid")
        }
        other => panic!("{other:?}"),
    }
    let calls_of_c = manager.info("c").unwrap().calls.calls;

    // A slow `bb`: its deadline stops the chain, in about that time.
    let mut client = host.client().await;
    client
        .unregister(PluginInfo {
            name: "bb".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(bb);
    let slow = host.plugin_at("bb", &host.path("bb-slow.sock"), &["--sleep-ms", "10000"]);
    assert!(slow.registered(), "{}", slow.line);
    let started = Instant::now();
    let mut ctx = connection();
    let chained = manager
        .chain("CONNECTION", &mut ctx, Duration::from_millis(200))
        .await;
    let took = started.elapsed();
    assert_eq!(chained.called(), ["a", "b", "bb"]);
    assert!(
        matches!(
            chained.stopped_by(),
            Some(("bb", Error::DeadlineExceeded { .. }))
        ),
        "{chained:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        manager.info("c").unwrap().calls.calls,
        calls_of_c,
        "never called after the stop"
    );
    assert!(PATIENCE > took);
    for p in [a, b, c, other, slow] {
        drop(p);
    }
    host.stop().await;
}

/// A plugin without goplugin's Ping is probed with the standard gRPC health
/// service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_answers_the_probe_when_ping_is_missing() {
    use dynplug::serve::proto::health::{
        HealthCheckRequest, HealthCheckResponse,
        health_check_response::ServingStatus,
        health_server::{Health, HealthServer},
    };
    struct Serving;
    #[tonic::async_trait]
    impl Health for Serving {
        async fn check(
            &self,
            _: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            Ok(tonic::Response::new(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            }))
        }
    }
    let host = Host::start(|r| r).await;
    let socket = host.path("health.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(Serving))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let mut client = host.client().await;
    client
        .register(PluginInfo {
            name: "healthy".into(),
            endpoint: socket.display().to_string(),
            capabilities: vec![1],
        })
        .await
        .unwrap();
    let info = host.manager.info("healthy").unwrap();
    assert_eq!(info.state, PluginState::Loaded);
    assert_eq!(info.capabilities, ["EXEC"]);
    assert!(info.socket.unwrap().connected);
    server.abort();
    host.stop().await;
}
