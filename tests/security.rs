//! The façades' defences, each against what an adversarial probe did
//! (issue 8, findings 6, 7 and 8, and access control for callers): bounded
//! connections, private sockets, a management API that refuses foreign hosts
//! and cross-site requests, named clients, TLS and client certificates.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynplug::serve::proto::goplugin::plugin_client::PluginClient;
use dynplug::serve::proto::v1::{self, plugins_client::PluginsClient};
use dynplug::serve::{Client, Endpoint, Running, Server};
use dynplug::{Error, PluginManager};
use support::http::{Reply, exchange};
use support::server::{grpc_over_unix, string};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// hello and counter, loaded, in a private directory.
fn plugins() -> (tempfile::TempDir, PluginManager) {
    let dir = support::private_tempdir();
    for sample in ["hello", "counter"] {
        support::install(dir.path(), sample);
    }
    let manager = PluginManager::new(dir.path()).unwrap();
    manager.load_plugins().unwrap();
    (dir, manager)
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tcp(endpoints: &[Endpoint]) -> SocketAddr {
    match endpoints[0] {
        Endpoint::Tcp(addr) => addr,
        _ => unreachable!("TCP first"),
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    exchange(
        TcpStream::connect(addr).await.unwrap(),
        method,
        path,
        headers,
        b"",
    )
    .await
}

/// Reads until the server closes the connection; panics after 10 s.
async fn closed_by_server(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept the connection open for 10 s"),
        }
    }
}

// ---- Finding 6: connections are bounded ----

/// At the cap the server stops accepting; the waiting client is served as
/// soon as a connection closes. (Before: no cap, and 1,100 idle sockets made
/// accept fail with EMFILE for everyone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_clients_wait_for_a_free_slot() {
    let (_dir, manager) = plugins();
    let running = Server::new(manager)
        .http(loopback())
        .max_connections(2)
        .start()
        .await
        .unwrap();
    let addr = tcp(running.http_endpoints());
    let idle = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    let mut third = tokio::spawn(request(addr, "GET", "/api/hello/third", &[]));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "served beyond the cap"
    );
    let [first, _second] = idle;
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(reply.json()["greeting"], "hello, third");
    running.shutdown().await;
}

/// A connection that sends nothing, or trickles its headers, is closed by
/// the header-read timeout, which frees its slot. (Before: kept forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slowloris_connections_are_closed() {
    let (_dir, manager) = plugins();
    let running = Server::new(manager)
        .http(loopback())
        .max_connections(2)
        .header_read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let addr = tcp(running.http_endpoints());

    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/hello/slow HTTP/1.1\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        // One header line every 50 ms: bytes keep coming, the head never ends.
        while slow.write_all(b"x-slow: 1\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "slowloris kept open"
            );
        }
        started.elapsed()
    });
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent
        .write_all(b"GET /api/hello/x HTTP/1.1\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut silent).await < Duration::from_secs(5));
    assert!(trickle.await.unwrap() < Duration::from_secs(5));
    // Both slots are free again.
    let reply = request(addr, "GET", "/api/hello/after", &[]).await;
    assert_eq!(reply.status, 200);
    running.shutdown().await;
}

/// An HTTP/2 client connection: the handle that keeps it open, and the
/// connection to drive.
type H2 = (
    h2::client::SendRequest<axum::body::Bytes>,
    h2::client::Connection<TcpStream>,
);

/// The head of a gRPC call to `path`, for a raw HTTP/2 client.
fn grpc_post(path: &str) -> axum::http::Request<()> {
    axum::http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Drives an HTTP/2 connection until its first response, then returns the
/// stream cap the server announced, and the connection.
async fn h2_settings(addr: SocketAddr, path: &str) -> (usize, H2) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut client, mut connection) = h2::client::handshake(stream).await.unwrap();
    let (response, _) = client.send_request(grpc_post(path), true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        _ = &mut connection => panic!("connection ended before the response"),
    };
    drop(response);
    (
        connection.max_concurrent_send_streams(),
        (client, connection),
    )
}

/// Both façades announce the HTTP/2 stream cap (before: none on gRPC, each
/// stalled stream reserving its message's length; HTTP spoke no HTTP/2),
/// and an HTTP/2 connection with nothing in flight is closed by the idle
/// timeout (HTTP/2 has no header timer between requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_capped_and_idle_connections_closed() {
    let (_dir, manager) = plugins();
    let running = Server::new(manager)
        .http(loopback())
        .grpc(loopback())
        .max_concurrent_streams(8)
        .idle_timeout(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let http = tcp(running.http_endpoints());
    let grpc = tcp(running.grpc_endpoints());
    let (streams, _) = h2_settings(http, "/_dynplug/health").await;
    assert_eq!(streams, 8, "HTTP/2 on the HTTP listener");
    let (streams, (_client, connection)) = h2_settings(grpc, "/dynplug.v1.Plugins/List").await;
    assert_eq!(streams, 8, "gRPC");
    // The client keeps it open (its handle lives): only the server closes it.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "closed early"
    );
    running.shutdown().await;
}

/// Out of file descriptors (EMFILE), the server backs off and keeps going:
/// once its timeouts close the idle connections, a new client is served.
/// (Before: idle sockets were never closed, and EMFILE lasted for good.)
#[test]
fn out_of_file_descriptors_the_server_recovers() {
    use std::io::{BufRead, Read, Write};
    let dir = support::private_tempdir();
    support::install(dir.path(), "hello");
    // Soft and hard limit 64, so `serve` cannot raise it; a cap above it
    // lets accept hit EMFILE.
    let command = format!(
        "ulimit -n 64; exec '{}' serve --plugins '{}' --http 127.0.0.1:0 --grpc 127.0.0.1:0 --max-connections 1000 --header-read-timeout 1s --idle-timeout 1s",
        env!("CARGO_BIN_EXE_dynplug"),
        dir.path().display(),
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &command])
        .env_remove("DYNPLUG_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap();
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(
                b"GET /api/hello/back HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        if response.starts_with("HTTP/1.1 200") {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {response:?}"
        );
        assert!(child.try_wait().unwrap().is_none(), "dynplug serve died");
    };
    assert!(served.contains("hello, back"), "{served}");
    drop(idle);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

// ---- Finding 8: Unix sockets and their directories are private ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_directories_of_others_or_open_to_others_are_refused() {
    let (dir, manager) = plugins();
    let foreign = dir.path().join(".foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Tests run as root here; as another user this needs CAP_CHOWN.
    if std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).is_err() {
        eprintln!("skipped the foreign owner case: cannot chown");
    } else {
        let err = Server::new(manager.clone())
            .goplugin_sockets(&foreign)
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err:?}");
        assert!(
            err.to_string().contains("owned by uid 65534, not by us"),
            "{err}"
        );
        assert!(
            std::fs::read_dir(&foreign).unwrap().next().is_none(),
            "nothing created in it"
        );
    }

    let open = dir.path().join(".open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    for server in [
        Server::new(manager.clone()).goplugin_sockets(&open),
        Server::new(manager.clone()).http_unix(open.join("http.sock")),
        Server::new(manager.clone()).grpc_unix(open.join("grpc.sock")),
    ] {
        let err = server.start().await.unwrap_err().to_string();
        assert!(
            err.contains("mode 0755: group and others can enter it"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::metadata(&open).unwrap().permissions().mode() & 0o777,
        0o755,
        "refused, not chmod-ed"
    );

    // A missing directory is created 0700, and its sockets are ours.
    let fresh = dir.path().join(".fresh/goplugin");
    let running = Server::new(manager)
        .goplugin_sockets(&fresh)
        .start()
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o700
    );
    running.shutdown().await;
}

/// `dynplug serve` under `umask 000` creates every socket 0600 and its
/// goplugin directory 0700 (before: 0777 sockets), and runs with its soft
/// open-files limit raised to the hard one.
#[test]
fn sockets_are_private_whatever_the_umask() {
    let dir = support::private_tempdir();
    for sample in ["hello", "counter"] {
        support::install(dir.path(), sample);
    }
    let sockets = dir.path().join(".run");
    std::fs::create_dir(&sockets).unwrap();
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700)).unwrap();
    let command = format!(
        "umask 000; ulimit -S -n 512; exec '{}' serve --plugins '{}' --http-unix '{}' --grpc-unix '{}' --goplugin-dir '{}'",
        env!("CARGO_BIN_EXE_dynplug"),
        dir.path().display(),
        sockets.join("http.sock").display(),
        sockets.join("grpc.sock").display(),
        sockets.join("goplugin").display(),
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &command])
        .env_remove("DYNPLUG_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let expected = [
        sockets.join("http.sock"),
        sockets.join("grpc.sock"),
        sockets.join("goplugin/hello.sock"),
        sockets.join("goplugin/counter.sock"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !expected.iter().all(|p| p.exists()) {
        assert!(Instant::now() < deadline, "sockets never appeared");
        assert!(child.try_wait().unwrap().is_none(), "dynplug serve exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for socket in &expected {
        assert_eq!(mode(socket), 0o600, "{}", socket.display());
    }
    assert_eq!(mode(&sockets.join("goplugin")), 0o700);
    // It also raised its soft open-files limit to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(files[0], files[1], "soft = hard: {limits}");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

// ---- Finding 7: the management API refuses foreign hosts and other sites ----

async fn open_server(
    configure: impl FnOnce(Server) -> Server,
) -> (tempfile::TempDir, Running, SocketAddr) {
    let (dir, manager) = plugins();
    let running = configure(Server::new(manager).http(loopback()))
        .start()
        .await
        .unwrap();
    let addr = tcp(running.http_endpoints());
    (dir, running, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_state_changes_are_refused() {
    let (_dir, running, addr) = open_server(|s| s).await;
    let reload = "/_dynplug/plugins/hello/reload";
    let host = addr.to_string();
    let origin = format!("http://{addr}");
    for headers in [
        vec![("host", host.as_str()), ("origin", "http://evil.example")],
        vec![("host", host.as_str()), ("sec-fetch-site", "cross-site")],
        vec![("host", host.as_str()), ("origin", "null")],
    ] {
        let r = request(addr, "POST", reload, &headers).await;
        assert_eq!(r.status, 403, "{headers:?}");
        assert!(
            r.json()["error"].as_str().unwrap().contains("refused"),
            "{:?}",
            r.json()
        );
        let r = request(addr, "DELETE", "/_dynplug/plugins/hello", &headers).await;
        assert_eq!(r.status, 403, "{headers:?}");
    }
    // The page's own requests: same origin.
    for headers in [
        vec![
            ("host", host.as_str()),
            ("origin", origin.as_str()),
            ("sec-fetch-site", "same-origin"),
        ],
        vec![("host", host.as_str()), ("origin", origin.as_str())],
        vec![("host", host.as_str())],
    ] {
        let r = request(addr, "POST", reload, &headers).await;
        assert_eq!(r.status, 200, "{headers:?}: {:?}", r.json());
    }
    running.shutdown().await;

    // With a token, the cookie is no longer enough from another site.
    let (_dir, running, addr) = open_server(|s| s.management_token("t0ken")).await;
    let host = addr.to_string();
    let cookie = [
        ("host", host.as_str()),
        ("cookie", "dynplug_token=t0ken"),
        ("origin", "http://evil.example"),
    ];
    assert_eq!(
        request(addr, "DELETE", "/_dynplug/plugins/hello", &cookie)
            .await
            .status,
        403
    );
    let same = [
        ("host", host.as_str()),
        ("cookie", "dynplug_token=t0ken"),
        ("sec-fetch-site", "same-origin"),
    ];
    assert_eq!(
        request(addr, "GET", "/_dynplug/plugins", &same)
            .await
            .status,
        200
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_are_refused() {
    let (_dir, running, addr) = open_server(|s| s.allowed_hosts(["dynplug.test"])).await;
    let host = addr.to_string();
    for path in [
        "/_dynplug/plugins",
        "/_dynplug/",
        "/_dynplug/health",
        "/metrics",
    ] {
        let r = request(addr, "GET", path, &[("host", "evil.example")]).await;
        assert_eq!(r.status, 403, "{path}");
        let error = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains("Host `evil.example` is not allowed; add it with --allowed-host"),
            "{error}"
        );
    }
    for name in [
        host.as_str(),
        "localhost",
        "localhost:1234",
        "[::1]:80",
        "dynplug.test:8080",
    ] {
        let r = request(addr, "GET", "/_dynplug/plugins", &[("host", name)]).await;
        assert_eq!(r.status, 200, "{name}");
    }
    // Plugin routes are the plugins' business.
    let r = request(addr, "GET", "/api/hello/x", &[("host", "evil.example")]).await;
    assert_eq!(r.status, 200);
    running.shutdown().await;

    let (_dir, running, addr) = open_server(|s| s.allowed_hosts(["*"])).await;
    let r = request(
        addr,
        "GET",
        "/_dynplug/plugins",
        &[("host", "evil.example")],
    )
    .await;
    assert_eq!(r.status, 200, "* turns the check off");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_is_not_opened_to_the_network_by_default() {
    let (_dir, manager) = plugins();
    let everywhere: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let err = Server::new(manager.clone())
        .http(everywhere)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("HTTP endpoint 0.0.0.0:0"), "{message}");
    assert!(message.contains("--allow-open-management"), "{message}");
    for server in [
        Server::new(manager.clone()).management_token("t"),
        Server::new(manager.clone()).allow_open_management(true),
        Server::new(manager.clone()).client(Client::new("c").token("x").plugins(["*"])),
    ] {
        let running = server.http(everywhere).start().await.unwrap();
        running.shutdown().await;
    }
}

// ---- Access control for callers ----

const BILLING: &str = "billing-token";
const OPS: &str = "ops-token";

fn with_clients(server: Server) -> Server {
    server
        .client(Client::new("billing").token(BILLING).plugins(["hello"]))
        .client(
            Client::new("ops")
                .token_sha256(sha256_hex(OPS))
                .plugins(["*"])
                .management(true),
        )
}

fn sha256_hex(token: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("printf %s '{token}' | sha256sum")])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_need_a_known_token_and_call_only_their_plugins_over_http() {
    let (_dir, running, addr) = open_server(with_clients).await;
    let bearer = |token: &str| format!("Bearer {token}");
    let (billing, ops) = (bearer(BILLING), bearer(OPS));

    let r = request(addr, "GET", "/api/hello/x", &[]).await;
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer realm=\"dynplug\""))
    );
    let r = request(
        addr,
        "GET",
        "/api/hello/x",
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = request(addr, "GET", "/api/hello/x", &[("authorization", &billing)]).await;
    assert_eq!(
        (r.status, r.json()["greeting"].clone()),
        (200, "hello, x".into())
    );
    let r = request(addr, "POST", "/api/counter", &[("authorization", &billing)]).await;
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("client `billing` may not call")
    );
    let r = request(addr, "POST", "/api/counter", &[("authorization", &ops)]).await;
    assert_eq!(r.status, 200);

    // The management API: the clients allowed it, no one else.
    let r = request(addr, "GET", "/_dynplug/plugins", &[]).await;
    assert_eq!(r.status, 401);
    let r = request(
        addr,
        "GET",
        "/_dynplug/plugins",
        &[("authorization", &billing)],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = request(addr, "GET", "/_dynplug/plugins", &[("authorization", &ops)]).await;
    assert_eq!(r.status, 200);
    running.shutdown().await;
}

fn authorized<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Ok, or the status code.
fn code<T>(result: Result<T, tonic::Status>) -> Result<(), tonic::Code> {
    result.map(|_| ()).map_err(|s| s.code())
}

fn exec(plugin: &str, label: &str) -> v1::ExecRequest {
    v1::ExecRequest {
        plugin: plugin.into(),
        label: label.into(),
        values: [("name".to_owned(), string("rpc"))].into(),
        timeout_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_need_a_known_token_and_call_only_their_plugins_over_grpc() {
    let (dir, manager) = plugins();
    let goplugin = dir.path().join(".goplugin");
    let running = with_clients(Server::new(manager))
        .grpc(loopback())
        .goplugin_sockets(&goplugin)
        .start()
        .await
        .unwrap();
    let addr = tcp(running.grpc_endpoints());
    let mut client = PluginsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let hello = || exec("hello", "hello.get");
    assert_eq!(
        code(client.exec(authorized(None, hello())).await),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(client.exec(authorized(Some("nope"), hello())).await),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(client.exec(authorized(Some(BILLING), hello())).await),
        Ok(())
    );
    let counter = || exec("counter", "counter.get");
    assert_eq!(
        code(client.exec(authorized(Some(BILLING), counter())).await),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(client.exec(authorized(Some(OPS), counter())).await),
        Ok(())
    );
    let ping = |plugin: &str| v1::PingRequest {
        plugin: plugin.into(),
    };
    assert_eq!(
        code(
            client
                .ping(authorized(Some(BILLING), ping("counter")))
                .await
        ),
        Err(tonic::Code::PermissionDenied)
    );
    // List and Watch: any client.
    assert_eq!(
        code(client.list(authorized(None, v1::ListRequest {})).await),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(
            client
                .list(authorized(Some(BILLING), v1::ListRequest {}))
                .await
        ),
        Ok(())
    );
    assert_eq!(
        code(client.watch(authorized(None, v1::WatchRequest {})).await),
        Err(tonic::Code::Unauthenticated)
    );

    // The goplugin service, on the main endpoint and on a plugin's own socket.
    let mut go = PluginClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut named = authorized(Some(BILLING), ());
    named
        .metadata_mut()
        .insert("x-dynplug-plugin", "counter".parse().unwrap());
    assert_eq!(
        code(go.ping(named).await),
        Err(tonic::Code::PermissionDenied)
    );
    let socket = goplugin.join("counter.sock");
    support::server::eventually("counter.sock", || {
        let socket = socket.clone();
        async move { socket.exists() }
    })
    .await;
    let mut go = PluginClient::new(grpc_over_unix(&socket).await);
    assert_eq!(
        code(go.ping(authorized(None, ())).await),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(go.ping(authorized(Some(BILLING), ())).await),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(code(go.ping(authorized(Some(OPS), ())).await), Ok(()));
    running.shutdown().await;
}

// ---- TLS and client certificates ----

struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dynplug test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    /// A certificate signed by the CA: (chain PEM, key PEM).
    fn issue(
        &self,
        names: &[&str],
        cn: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn client_config(
        &self,
        identity: Option<(String, String)>,
        alpn: &[&[u8]],
    ) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

async fn grpc_over_tls(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> tonic::transport::Channel {
    let config = Arc::new(config);
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let config = (*config).clone();
            async move {
                let tls = tls_connect(addr, config).await?;
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_client_certificates_name_clients() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"], "dynplug", ServerAuth);
    std::fs::write(pki.path("cert.pem"), cert).unwrap();
    std::fs::write(pki.path("key.pem"), key).unwrap();
    let billing = pki.issue(&["billing.example"], "billing", ClientAuth);
    let stranger = pki.issue(&["stranger.example"], "stranger", ClientAuth);

    let (_dir, manager) = plugins();
    let running = Server::new(manager)
        .http(loopback())
        .grpc(loopback())
        .tls(pki.path("cert.pem"), pki.path("key.pem"))
        .tls_client_ca(pki.path("ca.pem"))
        .client(
            Client::new("billing")
                .cert_name("billing")
                .plugins(["hello"]),
        )
        .client(Client::new("ops").token(OPS).plugins(["*"]))
        .start()
        .await
        .unwrap();
    let http = tcp(running.http_endpoints());
    let grpc = tcp(running.grpc_endpoints());

    // HTTP over TLS: the certificate's CN names `billing`.
    let https = |identity: Option<(String, String)>,
                 method: &'static str,
                 path: &'static str,
                 token: Option<&'static str>| {
        let config = pki.client_config(identity, &[b"http/1.1"]);
        async move {
            let tls = tls_connect(http, config).await.unwrap();
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            exchange(tls, method, path, &headers, b"").await
        }
    };
    let r = https(Some(billing.clone()), "GET", "/api/hello/cert", None).await;
    assert_eq!(
        (r.status, r.json()["greeting"].clone()),
        (200, "hello, cert".into())
    );
    assert_eq!(
        https(Some(billing.clone()), "POST", "/api/counter", None)
            .await
            .status,
        403
    );
    assert_eq!(
        https(None, "GET", "/api/hello/x", None).await.status,
        401,
        "no certificate, no token"
    );
    assert_eq!(
        https(Some(stranger.clone()), "GET", "/api/hello/x", None)
            .await
            .status,
        401
    );
    assert_eq!(
        https(None, "POST", "/api/counter", Some(OPS)).await.status,
        200,
        "a token still works"
    );
    // Plain HTTP on a TLS port gets nowhere.
    let mut plain = TcpStream::connect(http).await.unwrap();
    plain
        .write_all(b"GET /api/hello/x HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("hello"),
        "served in clear text"
    );
    // A certificate from another CA fails the handshake.
    let other = Pki::new().issue(&["billing.example"], "billing", ClientAuth);
    let refused = async {
        let mut tls = tls_connect(http, pki.client_config(Some(other), &[b"http/1.1"])).await?;
        // TLS 1.3 reports the server's refusal on the first read.
        tls.write_all(b"GET /api/hello/x HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await
    };
    assert!(
        refused.await.is_err(),
        "a certificate from another CA was accepted"
    );

    // gRPC over TLS (ALPN h2).
    let mut client =
        PluginsClient::new(grpc_over_tls(grpc, pki.client_config(Some(billing), &[b"h2"])).await);
    let reply = client
        .exec(exec("hello", "hello.get"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.values["greeting"], string("hello, rpc"));
    let status = client
        .exec(exec("counter", "counter.get"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let mut anonymous =
        PluginsClient::new(grpc_over_tls(grpc, pki.client_config(None, &[b"h2"])).await);
    let status = anonymous
        .exec(exec("hello", "hello.get"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    running.shutdown().await;
}

/// A connection that never says anything, a body declared and never sent,
/// and a gRPC message declared and never sent are each cut off in bounded
/// time, freeing their slots. (Before: the silent connection lasted the
/// idle time, the stalled bodies forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_stalled_bodies_are_cut_off() {
    let (_dir, manager) = plugins();
    let running = Server::new(manager)
        .http(loopback())
        .grpc(loopback())
        .max_connections(3)
        .header_read_timeout(Duration::from_millis(300))
        .body_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let addr = tcp(running.http_endpoints());

    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_server(&mut silent).await < Duration::from_secs(5));

    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            b"GET /api/hello/x HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\nonly this",
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stalled.read_exact(&mut head))
        .await
        .expect("answered before 10 s")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");

    // gRPC: a 4 MiB message declared (its 5-byte prefix), nothing after.
    let grpc = tcp(running.grpc_endpoints());
    let stream = TcpStream::connect(grpc).await.unwrap();
    let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let exec = grpc_post("/dynplug.v1.Plugins/Exec");
    let (response, mut send) = client.send_request(exec, false).unwrap();
    send.send_data(axum::body::Bytes::from_static(&[0, 0, 0x40, 0, 0]), false)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered before 10 s")
        .unwrap();
    let status = match response.headers().get("grpc-status") {
        Some(status) => status.clone(),
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = tokio::time::timeout(Duration::from_secs(10), body.trailers())
                .await
                .expect("trailers before 10 s")
                .unwrap()
                .expect("trailers");
            trailers["grpc-status"].clone()
        }
    };
    assert_ne!(status, "0", "the call cannot have succeeded");

    // Every slot is free again.
    let reply = request(addr, "GET", "/api/hello/after", &[]).await;
    assert_eq!(reply.status, 200);
    running.shutdown().await;
}
