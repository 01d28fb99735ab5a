//! Exec plugins: start time, call latency against raw clients of the same
//! child, and throughput.
//!
//! Run: `cargo bench --bench exec` (builds the samples in release mode
//! first). It prints, for the Rust samples `exec-rest` and `exec-grpc`:
//!
//! * `start`: `load_plugin` (check, private copy, spawn, Ping until ready)
//!   plus the first successful call, p50 and p90 over 30 starts;
//! * `call`: p50/p99 of one call over a Unix socket through an `Executor`
//!   (`execute_async` on a current-thread runtime), and of a raw client
//!   doing the same exchange with the same child on the same runtime: a
//!   hyper HTTP/1.1 connection sending the same `POST /exec`, a tonic
//!   `plugin.Plugin` client sending the same `Exec` (once leaving the reply
//!   unread, once sending `x-host` and decoding the reply's JSON, as the
//!   executor does); and their ratio;
//! * `throughput`: calls per second with 16 concurrent callers (tasks on a
//!   2-thread runtime) for 3 seconds.

#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use dynplug::serve::proto::goplugin::{ExecRequest, plugin_client::PluginClient};
use dynplug::{Context, Executor, PluginManager};
use http_body_util::BodyExt;

/// Calls measured per client, in rounds that alternate the two clients
/// so that drift on a shared machine weighs on both alike.
const SAMPLES: usize = 20_000;
const ROUNDS: usize = 10;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

fn context() -> Context {
    Context::new("greet").with("name", "Ada")
}

fn manifest(name: &str, sample: &str) -> String {
    let protocol = if sample == "exec-grpc" {
        "grpc"
    } else {
        "rest"
    };
    format!(
        r#"{{"name": "{name}", "version": "1.0.0", "source": {{"mode": "exec", "path": "{sample}", "protocol": "{protocol}", "listen": "unix"}}}}"#
    )
}

fn socket_of(manager: &PluginManager, name: &str) -> std::path::PathBuf {
    let process = manager.info(name).unwrap().process.unwrap();
    process.address.strip_prefix("unix:").unwrap().into()
}

fn start_times(manager: &PluginManager, name: &str) {
    let mut samples: Vec<Duration> = (0..30)
        .map(|_| {
            let started = Instant::now();
            manager.load_plugin(name).unwrap();
            let (_, executor) = manager.get_plugin(name).unwrap();
            executor.execute(&mut context()).unwrap();
            let elapsed = started.elapsed();
            manager.unload(name).unwrap();
            elapsed
        })
        .collect();
    let p50 = percentile(&mut samples, 0.5);
    let p90 = percentile(&mut samples, 0.9);
    println!("start {name:10} load + first call: p50 {p50:>10.2?}  p90 {p90:>10.2?}");
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

fn report(name: &str, ours: &mut [Duration], raw: &mut [Duration], raw_name: &str) {
    let (p50, p99) = (percentile(ours, 0.5), percentile(ours, 0.99));
    let (r50, r99) = (percentile(raw, 0.5), percentile(raw, 0.99));
    println!(
        "call  {name:10} executor p50 {p50:>9.2?} p99 {p99:>9.2?} | {raw_name} p50 {r50:>9.2?} p99 {r99:>9.2?} | p50 ratio {:.2}x",
        p50.as_secs_f64() / r50.as_secs_f64()
    );
}

async fn raw_hyper(
    socket: &std::path::Path,
) -> impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http1::handshake::<_, String>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let payload: String = br#"{"name":"Ada"}"#.iter().map(|b| format!("{b:02x}")).collect();
    let body = format!(r#"{{"command":"greet","payload":"{payload}"}}"#);
    let send = std::rc::Rc::new(tokio::sync::Mutex::new(send));
    move || {
        let send = std::rc::Rc::clone(&send);
        let body = body.clone();
        Box::pin(async move {
            let request = hyper::Request::post("/exec")
                .header("host", "localhost")
                .header("x-host", "bench")
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            let mut send = send.lock().await;
            send.ready().await.unwrap();
            let response = send.send_request(request).await.unwrap();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert!(!bytes.is_empty());
        })
    }
}

async fn raw_tonic(socket: &std::path::Path) -> PluginClient<tonic::transport::Channel> {
    let socket = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    PluginClient::new(channel)
}

fn latency(manager: &PluginManager) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_, rest) = manager.get_plugin("rest").unwrap();
        let socket = socket_of(manager, "rest");
        let mut raw_call = raw_hyper(&socket).await;
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.extend(timed(|| ours_call(&rest)).await);
            raw.extend(timed(&mut raw_call).await);
        }
        report("rest", &mut ours, &mut raw, "raw hyper");

        let (_, grpc) = manager.get_plugin("grpc").unwrap();
        let client = raw_tonic(&socket_of(manager, "grpc")).await;
        // The bare exchange: the reply's payload is not read.
        let raw_call = || {
            let mut client = client.clone();
            async move {
                let request = ExecRequest {
                    command: "greet".into(),
                    payload: br#"{"name":"Ada"}"#.to_vec(),
                };
                let reply = client.exec(request).await.unwrap().into_inner();
                assert!(reply.data.is_some());
            }
        };
        // What a caller that uses the reply does, as the executor does:
        // the goplugin `x-host` header sent, the JSON payload decoded.
        let used_call = || {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(ExecRequest {
                    command: "greet".into(),
                    payload: br#"{"name":"Ada"}"#.to_vec(),
                });
                request.metadata_mut().insert(
                    "x-host",
                    tonic::metadata::MetadataValue::from_static("bench"),
                );
                let reply = client.exec(request).await.unwrap().into_inner();
                let values: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&reply.data.unwrap().response).unwrap();
                assert!(values.contains_key("greeting"));
            }
        };
        let (mut ours, mut raw, mut used) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.extend(timed(|| ours_call(&grpc)).await);
            raw.extend(timed(raw_call).await);
            used.extend(timed(used_call).await);
        }
        report("grpc", &mut ours, &mut raw, "raw tonic");
        report("grpc", &mut ours, &mut used, "raw tonic, reply used");
    });
}

async fn ours_call(executor: &Executor) {
    let mut ctx = context();
    executor.execute_async(&mut ctx).await.unwrap();
    assert!(ctx.get_str("greeting").is_some());
}

fn throughput(manager: &PluginManager, name: &str) {
    let runtime = support::runtime();
    let (_, executor) = manager.get_plugin(name).unwrap();
    let run = Duration::from_secs(3);
    let calls = runtime.block_on(async {
        let until = Instant::now() + run;
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let executor = executor.clone();
                tokio::spawn(async move {
                    let mut calls = 0u64;
                    while Instant::now() < until {
                        let mut ctx = context();
                        executor.execute_async(&mut ctx).await.unwrap();
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        total
    });
    println!(
        "throughput {name:5} 16 callers: {:.0} calls/s",
        calls as f64 / run.as_secs_f64()
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    support::install_exec(
        dir.path(),
        "exec-rest",
        "rest",
        Some(&manifest("rest", "exec-rest")),
    );
    support::install_exec(
        dir.path(),
        "exec-grpc",
        "grpc",
        Some(&manifest("grpc", "exec-grpc")),
    );
    let manager = PluginManager::new(dir.path()).unwrap();
    for name in ["rest", "grpc"] {
        start_times(&manager, name);
    }
    let report = manager.load_plugins().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    latency(&manager);
    for name in ["rest", "grpc"] {
        throughput(&manager, name);
    }
    manager.unload_all();
}
