//! Socket plugins: a JSON-RPC call over a Unix socket through an
//! `Executor`, against a raw hyper client calling the same server; and the
//! time from a registry `Register` to the first successful call.
//!
//! Run: `cargo bench --bench sockets`. It prints:
//!
//! * `call`: p50/p99 of one JSON-RPC call (`Greet` with one value, a
//!   one-key object back) through an `Executor` (`execute_async` on a
//!   current-thread runtime) to a plugin found in a sockets directory, and
//!   of a raw hyper HTTP/1.1 client on the same runtime sending the same
//!   request to the same server and parsing the reply as JSON; and the p50
//!   ratio. The server is a hyper JSON-RPC server on a thread of its own.
//! * `register`: p50/p90 over 50 rounds of `Register` (peer check,
//!   endpoint check, dial-back Ping, load) until the first successful call
//!   through an `Executor`, to a goplugin gRPC server already listening;
//!   each round ends with `Unregister`.

#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynplug::serve::proto::goplugin::{self, plugin_server};
use dynplug::serve::proto::registry::{
    PluginCapability, PluginInfo, plugin_registry_client::PluginRegistryClient,
};
use dynplug::serve::{Registry, Server};
use dynplug::{Context, Executor, PluginManager};
use http_body_util::BodyExt;

const SAMPLES: usize = 20_000;
const ROUNDS: usize = 10;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

/// A JSON-RPC 2.0 server on `path`, on a thread of its own.
fn jsonrpc_server(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(answer);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<String>, Infallible> {
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let call: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let result = match call["method"].as_str() {
        Some("Plugin.Implements") => {
            serde_json::json!({"Interfaces": [{"Name": "Greeter", "Version": "0.1.0"}]})
        }
        _ => {
            let name = call["params"]["name"].as_str().unwrap_or("world");
            serde_json::json!({ "greeting": format!("hello, {name}") })
        }
    };
    let reply = serde_json::json!({"jsonrpc": "2.0", "result": result, "id": call["id"]});
    Ok(hyper::Response::new(reply.to_string()))
}

async fn timed<F: std::future::Future<Output = ()>>(mut call: impl FnMut() -> F) -> Vec<Duration> {
    for _ in 0..500 {
        call().await;
    }
    let mut samples = Vec::with_capacity(SAMPLES / ROUNDS);
    for _ in 0..SAMPLES / ROUNDS {
        let started = Instant::now();
        call().await;
        samples.push(started.elapsed());
    }
    samples
}

async fn ours_call(executor: &Executor) {
    let mut ctx = Context::new("Greet").with("name", "Ada");
    executor.execute_async(&mut ctx).await.unwrap();
    assert!(ctx.get_str("greeting").is_some());
}

async fn raw_hyper(
    socket: &Path,
) -> impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http1::handshake::<_, String>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let send = std::rc::Rc::new(tokio::sync::Mutex::new(send));
    let mut id = 0u64;
    move || {
        let send = std::rc::Rc::clone(&send);
        id += 1;
        let body =
            format!(r#"{{"jsonrpc":"2.0","method":"Greet","params":{{"name":"Ada"}},"id":{id}}}"#);
        Box::pin(async move {
            let request = hyper::Request::post("/")
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            let mut send = send.lock().await;
            send.ready().await.unwrap();
            let response = send.send_request(request).await.unwrap();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert!(reply["result"]["greeting"].is_string());
        })
    }
}

fn call_latency() {
    let run = support::private_tempdir();
    let sockets = run.path().to_owned();
    let plugins = tempfile::tempdir().unwrap();
    let socket = sockets.join("greeter");
    jsonrpc_server(&socket);
    let manager = PluginManager::new(plugins.path()).unwrap();
    let found = manager.discover_sockets(&sockets).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_, executor) = manager.get_plugin("greeter").unwrap();
        let mut raw_call = raw_hyper(&socket).await;
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.extend(timed(|| ours_call(&executor)).await);
            raw.extend(timed(&mut raw_call).await);
        }
        let (p50, p99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
        let (r50, r99) = (percentile(&mut raw, 0.5), percentile(&mut raw, 0.99));
        println!(
            "call  jsonrpc (unix)  executor p50 {p50:>9.2?} p99 {p99:>9.2?} | raw hyper p50 {r50:>9.2?} p99 {r99:>9.2?} | p50 ratio {:.2}x",
            p50.as_secs_f64() / r50.as_secs_f64()
        );
    });
    drop(found);
    manager.unload_all();
}

/// A goplugin `plugin.Plugin` server.
struct Greeter;

#[tonic::async_trait]
impl plugin_server::Plugin for Greeter {
    async fn ping(
        &self,
        _: tonic::Request<()>,
    ) -> Result<tonic::Response<goplugin::PingResponse>, tonic::Status> {
        Ok(tonic::Response::new(goplugin::PingResponse {
            status: "success".into(),
            data: None,
        }))
    }

    async fn exec(
        &self,
        _: tonic::Request<goplugin::ExecRequest>,
    ) -> Result<tonic::Response<goplugin::ExecResponse>, tonic::Status> {
        Ok(tonic::Response::new(goplugin::ExecResponse {
            status: "success".into(),
            data: Some(goplugin::DataRpc {
                response: br#"{"greeting":"hello"}"#.to_vec(),
            }),
        }))
    }
}

fn grpc_server(path: PathBuf) {
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            tonic::transport::Server::builder()
                .add_service(plugin_server::PluginServer::new(Greeter))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
}

fn register_to_first_call() {
    let run = support::private_tempdir();
    let plugins = tempfile::tempdir().unwrap();
    let endpoint = run.path().join("greeter.sock");
    grpc_server(endpoint.clone());
    let manager = PluginManager::new(plugins.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let registry = run.path().join("registry.sock");
        let running = Server::new(manager.clone())
            .registry(Registry::new(&registry))
            .start()
            .await
            .unwrap();
        let path = registry.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .unwrap();
        let mut client = PluginRegistryClient::new(channel);
        let info = PluginInfo {
            name: "greeter".into(),
            endpoint: endpoint.display().to_string(),
            capabilities: vec![PluginCapability::Exec as i32],
        };
        let mut samples = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            client.register(info.clone()).await.unwrap();
            let (_, executor) = manager.get_plugin("greeter").unwrap();
            let mut ctx = Context::new("Greet");
            executor.execute_async(&mut ctx).await.unwrap();
            samples.push(started.elapsed());
            assert!(ctx.get_str("greeting").is_some());
            client.unregister(info.clone()).await.unwrap();
            // Unloaded (off the request path): the next round loads anew.
            while manager
                .info("greeter")
                .is_some_and(|i| i.state.in_service())
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (p50, p90) = (percentile(&mut samples, 0.5), percentile(&mut samples, 0.9));
        println!("register → first successful call: p50 {p50:>9.2?}  p90 {p90:>9.2?} (50 rounds)");
        running.shutdown().await;
    });
}

fn main() {
    call_latency();
    register_to_first_call();
}
