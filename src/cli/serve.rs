//! `dynplug serve` and `dynplug watch`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dynplug::serve::{Endpoint, Server};
use dynplug::{Event, PluginManager};
use tokio::signal::unix::{SignalKind, signal};

use super::{PluginsDir, ServeArgs};

// A server whose stdout or stderr was closed (a supervisor that read the
// first line and went away) keeps serving: `println!` would panic on EPIPE.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when it is awaited: call it before announcing the server, or a
/// signal sent right after the announcement kills the process ungracefully.
pub(crate) fn terminated() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The TCP addresses of a façade: those given, or `127.0.0.1:port` when no
/// endpoint of that kind (TCP or Unix) was given at all.
fn tcp_or_default(tcp: &[SocketAddr], unix: &[PathBuf], port: u16) -> Vec<SocketAddr> {
    if tcp.is_empty() && unix.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], port))]
    } else {
        tcp.to_vec()
    }
}

async fn load(dir: &PluginsDir) -> anyhow::Result<PluginManager> {
    let plugins = dir.plugins();
    let manager = dir.manager()?;
    let loader = manager.clone();
    let report = tokio::task::spawn_blocking(move || loader.load_plugins()).await??;
    let how = if dir.load_on_first_call || dir.unload_idle_after.is_some() {
        "registered (each loaded by its first call)"
    } else {
        "loaded"
    };
    tell!(
        "{} plugin(s) {how} from {}, {} failed",
        report.loaded.len(),
        plugins.display(),
        report.failed.len()
    );
    Ok(manager)
}

/// Raises the soft limit on open files to the hard one: every connection is
/// a descriptor, and the connection cap's default is half the soft limit
/// (measured: 1,100 idle sockets under the usual soft 1,024 stopped a server
/// that had no cap).
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit does not exist for files on Linux; leave it.
    let (Some(current), Some(maximum)) = (limit.current, limit.maximum) else {
        return;
    };
    if current < maximum {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("could not raise the open files limit from {current} to {maximum}: {e}");
        }
    }
}

pub(crate) async fn run(args: ServeArgs, verbose: bool) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.management_token.as_ref().is_none_or(|t| !t.is_empty()),
        "the management token is empty (--management-token, DYNPLUG_MANAGEMENT_TOKEN or the configuration file): it would guard nothing"
    );
    raise_open_files_limit();
    let terminated = terminated()?;
    let manager = load(&args.dir).await?;
    let watcher = if args.watch {
        Some(manager.watch()?)
    } else {
        None
    };
    let mut server = Server::new(manager.clone())
        .timeout(args.timeout.unwrap_or(Duration::from_secs(30)))
        .log_calls(verbose);
    for addr in tcp_or_default(&args.http, &args.http_unix, 8080) {
        server = server.http(addr);
    }
    for path in args.http_unix {
        server = server.http_unix(path);
    }
    for addr in tcp_or_default(&args.grpc, &args.grpc_unix, 50051) {
        server = server.grpc(addr);
    }
    for path in args.grpc_unix {
        server = server.grpc_unix(path);
    }
    if let Some(dir) = &args.goplugin_dir {
        server = server.goplugin_sockets(dir);
    }
    for dir in &args.dir.sockets {
        server = server.sockets(dir);
    }
    if let Some(path) = &args.registry_unix {
        let mut registry = dynplug::serve::Registry::new(path);
        for dir in &args.registry_endpoint_dir {
            registry = registry.endpoint_dir(dir);
        }
        if !args.registry_allow_uid.is_empty() {
            registry = registry.allowed_uids(args.registry_allow_uid.iter().copied());
        }
        if args.registry_probe_interval.is_some() || args.registry_probe_misses.is_some() {
            registry = registry.probe(
                args.registry_probe_interval
                    .unwrap_or(Duration::from_secs(1)),
                args.registry_probe_misses.unwrap_or(3),
            );
        }
        server = server.registry(registry);
    }
    if let Some(token) = &args.management_token {
        server = server.management_token(token);
    }
    server = server
        .allow_open_management(args.allow_open_management)
        .allowed_hosts(args.allowed_hosts.iter().cloned());
    for client in &args.clients {
        server = server.client(client.client());
    }
    if let Some(max) = args.max_connections {
        server = server.max_connections(max);
    }
    if let Some(timeout) = args.header_read_timeout {
        server = server.header_read_timeout(timeout);
    }
    if let Some(timeout) = args.idle_timeout {
        server = server.idle_timeout(timeout);
    }
    if let Some(max) = args.max_header_bytes {
        server = server.max_header_bytes(max);
    }
    if let Some(max) = args.max_concurrent_streams {
        server = server.max_concurrent_streams(max);
    }
    if let Some(max) = args.grpc_max_message_size {
        server = server.grpc_max_message_size(max);
    }
    if let Some(mode) = args.unix_socket_mode {
        server = server.unix_socket_mode(mode);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        server = server.tls(cert, key);
    }
    if let Some(ca) = &args.tls_client_ca {
        server = server.tls_client_ca(ca);
    }
    let tls = args.tls_cert.is_some();
    let running = server.start().await?;
    for endpoint in running.http_endpoints() {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let scheme = if tls { "https" } else { "http" };
                say!(
                    "HTTP  {scheme}://{addr}/  (management: {scheme}://{addr}/_dynplug/, metrics: {scheme}://{addr}/metrics)"
                );
                if manager.info("hello").is_some() && args.clients.is_empty() && !tls {
                    say!("      try: curl http://{addr}/api/hello/Ada");
                }
            }
            Endpoint::Unix(path) => {
                say!(
                    "HTTP  {endpoint}  (try: curl --unix-socket {} http://localhost/_dynplug/plugins)",
                    path.display()
                );
            }
        }
    }
    for endpoint in running.grpc_endpoints() {
        say!("gRPC  {endpoint}  (services dynplug.v1.Plugins, plugin.Plugin; see proto/)");
    }
    if args.watch {
        say!(
            "watching {} for plugins to load, upgrade and unload",
            args.dir.plugins().display()
        );
    }
    if let Some(path) = &args.registry_unix {
        say!(
            "registry unix:{}  (gRPC plugins.PluginRegistry; see proto/registry.proto)",
            path.display()
        );
    }
    for dir in &args.dir.sockets {
        say!(
            "following sockets in {} (call one: POST /plugins/<name>/<method>)",
            dir.display()
        );
    }
    terminated.await;
    tell!("shutting down: finishing requests, draining and unloading plugins");
    drop(watcher);
    running.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

pub(crate) async fn watch(dir: &PluginsDir) -> anyhow::Result<std::process::ExitCode> {
    let terminated = terminated()?;
    let plugins = dir.plugins();
    let manager = load(dir).await?;
    let mut events = manager.subscribe();
    let watcher = manager.watch()?;
    let finder = manager.clone();
    let sockets = dir.sockets.clone();
    let found = tokio::task::spawn_blocking(move || {
        sockets
            .iter()
            .map(|dir| finder.discover_sockets(dir))
            .collect::<dynplug::Result<Vec<_>>>()
    })
    .await??;
    tell!(
        "watching {}; events follow as JSON lines",
        plugins.display()
    );
    let print = async {
        loop {
            match events.recv().await {
                Ok(event) => print_event(&event),
                Err(dynplug::EventsError::Lagged(missed)) => {
                    tell!("dynplug: {missed} event(s) dropped: the output fell behind");
                }
                Err(_) => break,
            }
        }
    };
    tokio::select! {
        _ = print => {}
        () = terminated => {}
    }
    drop(watcher);
    tokio::task::spawn_blocking(move || {
        drop(found);
        manager.unload_all();
    })
    .await?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_event(event: &Event) {
    say!("{}", serde_json::to_string(event).unwrap_or_default());
}
