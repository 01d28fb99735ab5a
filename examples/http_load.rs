//! Façade throughput and latency, against a bare axum handler in the same run.
//!
//! Run: `cargo run --release --example http_load -- --seconds 2 --rounds 5 [--isolation inline]`
//!
//! Serves the `hello` sample through `dynplug::serve` (HTTP on TCP and a Unix
//! socket, gRPC on a Unix socket) and, beside it, a bare axum app (TCP and a
//! Unix socket) whose handler does the same work (`/api/hello/{name}` → `{"greeting": "hello, <name>"}`). A keep-alive
//! HTTP/1.1 load generator drives both in every round, back to back (which
//! goes first alternates); the median of the rounds' ratios is the figure.
//! Then sequential HTTP/1.1 requests and gRPC `Exec` calls over Unix sockets
//! measure the unary round trip with a current-thread client, against the
//! bare axum app and a bare tonic service doing the same work, in as many
//! rounds (alternating which goes first); the median of the rounds' p50
//! ratios is the figure.
//!
//! Each round also counts heap allocations per request in this process (the
//! load generator's included, the same for both servers; the plugin's own
//! allocations go through its own allocator and are not counted): a figure
//! that, unlike requests per second, does not move with the machine's noise.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::Path;
use clap::Parser;
use dynplug::PluginManager;
use dynplug::serve::proto::v1::plugins_client::PluginsClient;
use dynplug::serve::proto::v1::{self, ExecRequest, Value, plugins_server, value::Kind};
use dynplug::serve::{Endpoint, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rounds, each driving both servers back to back; the median ratio counts.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Sequential gRPC Exec calls (and as many sequential HTTP requests over a
    /// Unix socket).
    #[arg(long, default_value_t = 20_000)]
    grpc_calls: usize,
    /// Isolation of the hello plugin: auto (the default), pooled or inline.
    #[arg(long, default_value = "auto")]
    isolation: String,
    /// Worker threads of the pooled version.
    #[arg(long, default_value_t = 2)]
    pool_size: usize,
    /// Only serve for this many seconds (print both addresses) so an external
    /// load generator can drive them, e.g. `wrk -t1 -c16 -d5s URL`.
    #[arg(long)]
    hold: Option<u64>,
}

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which
// upholds `GlobalAlloc`'s contract; counting touches no memory it hands out.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on as they are.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (every allocation goes there).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as `dealloc`, and the caller's guarantees for `size` are passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Stats {
    requests: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    allocations: f64,
}

/// One keep-alive `GET` on `stream`; checks the body is hello's greeting.
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    request: &str,
    line: &mut String,
) {
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .unwrap();
    let mut length = 0;
    loop {
        line.clear();
        stream.read_line(line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    assert!(
        body.starts_with(b"{\"greeting\":\"hello, user"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

async fn load(addr: SocketAddr, seconds: u64, connections: usize) -> Stats {
    let until = Instant::now() + Duration::from_secs(seconds);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut stream = BufReader::new(stream);
                let request = format!("GET /api/hello/user{i} HTTP/1.1\r\nhost: bench\r\n\r\n");
                let mut latencies = Vec::new();
                let mut line = String::new();
                while Instant::now() < until {
                    let start = Instant::now();
                    get(&mut stream, &request, &mut line).await;
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    all.sort();
    Stats {
        requests: all.len() as u64,
        per_second: all.len() as f64 / elapsed,
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
        allocations: allocations as f64 / all.len() as f64,
    }
}

/// The bare axum app, on TCP and on the Unix socket `unix`.
async fn bare_axum(unix: &std::path::Path) -> SocketAddr {
    async fn hello(Path(name): Path<String>) -> axum::Json<serde_json::Value> {
        axum::Json(serde_json::json!({ "greeting": format!("hello, {name}") }))
    }
    let app = axum::Router::new().route("/api/hello/{name}", axum::routing::get(hello));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let unix = tokio::net::UnixListener::bind(unix).unwrap();
    tokio::spawn(axum::serve(unix, app.clone()).into_future());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A bare tonic `Plugins` service whose `Exec` does the same work as `hello.get`
/// in place: the gRPC baseline.
struct BareGrpc;

#[tonic::async_trait]
impl plugins_server::Plugins for BareGrpc {
    async fn ping(
        &self,
        _: tonic::Request<v1::PingRequest>,
    ) -> Result<tonic::Response<v1::PingResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }
    async fn exec(
        &self,
        request: tonic::Request<ExecRequest>,
    ) -> Result<tonic::Response<v1::ExecResponse>, tonic::Status> {
        let mut values = request.into_inner().values;
        let name = match values.get("name").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => s.clone(),
            _ => "world".into(),
        };
        let greeting = Value {
            kind: Some(Kind::StringValue(format!("hello, {name}"))),
        };
        values.insert("greeting".into(), greeting);
        Ok(tonic::Response::new(v1::ExecResponse { values }))
    }
    async fn list(
        &self,
        _: tonic::Request<v1::ListRequest>,
    ) -> Result<tonic::Response<v1::ListResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::LifecycleEvent, tonic::Status>> + Send>,
    >;
    async fn watch(
        &self,
        _: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }
}

async fn bare_grpc(socket: std::path::PathBuf) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(
        tokio::net::UnixListener::bind(socket).unwrap(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(plugins_server::PluginsServer::new(BareGrpc))
            .serve_with_incoming(incoming),
    );
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// p50 and p99 of `calls` sequential runs of `once` over what `connect`
/// returns (after 1,000 warm-up runs), on a current-thread runtime: measured
/// elsewhere, such a client halves unary latency against a multi-thread one.
fn sequential<C>(
    calls: usize,
    connect: impl AsyncFnOnce() -> C,
    mut once: impl AsyncFnMut(&mut C),
) -> Sequential {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut client = connect().await;
        for _ in 0..1_000 {
            once(&mut client).await;
        }
        let mut latencies: Vec<Duration> = Vec::with_capacity(calls);
        let (process, client_thread) = (
            cpu(libc::CLOCK_PROCESS_CPUTIME_ID),
            cpu(libc::CLOCK_THREAD_CPUTIME_ID),
        );
        for _ in 0..calls {
            let start = Instant::now();
            once(&mut client).await;
            latencies.push(start.elapsed());
        }
        // The server's CPU: the process's, less this (the client's) thread.
        let server = (cpu(libc::CLOCK_PROCESS_CPUTIME_ID) - process)
            .saturating_sub(cpu(libc::CLOCK_THREAD_CPUTIME_ID) - client_thread);
        latencies.sort();
        Sequential {
            p50: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
            server_cpu: server / calls as u32,
        }
    })
}

/// Sequential round trips: latency, and the server's CPU time per call (a
/// figure a busy machine moves far less than latency).
struct Sequential {
    p50: Duration,
    p99: Duration,
    server_cpu: Duration,
}

/// CPU time used so far by the process or this thread.
fn cpu(clock: libc::clockid_t) -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; the clock ids are the
    // process and thread CPU clocks, which always exist on Linux.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(clock, &mut now)
    };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Keep-alive HTTP/1.1 `GET`s over a Unix socket.
fn http_latency(socket: std::path::PathBuf, calls: usize) -> Sequential {
    let request = "GET /api/hello/user HTTP/1.1\r\nhost: bench\r\n\r\n";
    sequential(
        calls,
        async || {
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            (BufReader::new(stream), String::new())
        },
        async |(stream, line)| get(stream, request, line).await,
    )
}

/// gRPC `Exec` calls of `hello.get` over a Unix socket.
fn grpc_latency(socket: std::path::PathBuf, calls: usize) -> Sequential {
    sequential(
        calls,
        async || PluginsClient::new(support::server::grpc_over_unix(&socket).await),
        async |client| {
            let request = ExecRequest {
                plugin: "hello".into(),
                label: "hello.get".into(),
                values: [(
                    "name".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue("grpc".into())),
                    },
                )]
                .into(),
                timeout_ms: 0,
            };
            client.exec(request).await.unwrap();
        },
    )
}

fn main() {
    let args = Args::parse();
    let dir = support::private_tempdir(); // Unix sockets need a private directory
    let lib = support::library("hello");
    let manifest =
        std::fs::read_to_string(support::root().join("sample-plugins/hello/plugin.json"))
            .unwrap()
            .replace(
                r#""isolation": "pooled""#,
                &format!(r#""isolation": "{}""#, args.isolation),
            );
    support::install_as(dir.path(), "hello", "hello", Some(&manifest));
    assert!(lib.exists());
    let manager = PluginManager::builder(dir.path())
        .pool_size(args.pool_size)
        .build()
        .unwrap();
    assert!(manager.load_plugins().unwrap().failed.is_empty());
    let socket = dir.path().join(".grpc.sock");
    let bare_socket = dir.path().join(".bare-grpc.sock");
    let http_socket = dir.path().join(".http.sock");
    let bare_http_socket = dir.path().join(".bare-http.sock");

    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let (dynplug_addr, bare_addr, running) = runtime.block_on(async {
        let running = Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .http_unix(&http_socket)
            .grpc_unix(&socket)
            .start()
            .await
            .unwrap();
        let Endpoint::Tcp(addr) = running.http_endpoints()[0].clone() else {
            unreachable!()
        };
        bare_grpc(bare_socket.clone()).await;
        (addr, bare_axum(&bare_http_socket).await, running)
    });

    if let Some(seconds) = args.hold {
        println!("bare axum: http://{bare_addr}/api/hello/wrk");
        println!("dynplug:   http://{dynplug_addr}/api/hello/wrk");
        std::thread::sleep(Duration::from_secs(seconds));
        runtime.block_on(running.shutdown());
        return;
    }
    // Each round drives both servers back to back, first one then the other
    // (alternating which goes first): their ratio is the round's figure, and
    // the median over rounds is the one to quote (the machine's noise moves
    // both servers of a round alike, rounds apart).
    let (mut best_bare, mut best_dynplug): (Option<Stats>, Option<Stats>) = (None, None);
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let mut rates = [0.0; 2];
        let mut order = [
            (0, "bare axum", bare_addr, &mut best_bare),
            (1, "dynplug ", dynplug_addr, &mut best_dynplug),
        ];
        if round % 2 == 0 {
            order.reverse();
        }
        for (i, name, addr, best) in order {
            let stats = runtime.block_on(load(addr, args.seconds, args.connections));
            println!(
                "round {round} {name}: {:>9.0} req/s  p50 {:>9.1?}  p99 {:>9.1?}  ({} requests, {:.1} allocations each)",
                stats.per_second, stats.p50, stats.p99, stats.requests, stats.allocations
            );
            rates[i] = stats.per_second;
            if best
                .as_ref()
                .is_none_or(|b| stats.per_second > b.per_second)
            {
                *best = Some(stats);
            }
        }
        ratios.push(rates[1] / rates[0]);
    }
    ratios.sort_by(f64::total_cmp);
    let (bare, dynplug) = (best_bare.unwrap(), best_dynplug.unwrap());
    println!(
        "HTTP façade ({} plugin, {} connections): median of {} rounds {:.2}x bare axum (range {:.2}–{:.2}); best rounds {:.0} vs {:.0} req/s; p99 {:?} vs {:?}; allocations per request {:.1} vs {:.1}",
        args.isolation,
        args.connections,
        ratios.len(),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        dynplug.per_second,
        bare.per_second,
        dynplug.p99,
        bare.p99,
        dynplug.allocations,
        bare.allocations
    );

    // Sequential round trips, in rounds that alternate which server goes
    // first; the median of the rounds' p50 ratios is the figure.
    let sequential_rounds = |what: &str, bare: &str, measure: &dyn Fn(bool) -> Sequential| {
        let (mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            let mut runs = [None, None];
            let order = if round % 2 == 0 { [1, 0] } else { [0, 1] };
            for i in order {
                let run = measure(i == 1);
                let name = if i == 1 { "dynplug" } else { bare };
                println!(
                    "round {round} {what}, {name} ({} sequential): p50 {:?}  p99 {:?}  server CPU {:?} per call",
                    args.grpc_calls, run.p50, run.p99, run.server_cpu
                );
                runs[i] = Some(run);
            }
            let [Some(bare_run), Some(dynplug)] = runs else {
                unreachable!("both measured")
            };
            ratios.push(dynplug.p50.as_secs_f64() / bare_run.p50.as_secs_f64());
            cpu_ratios.push(dynplug.server_cpu.as_secs_f64() / bare_run.server_cpu.as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (p50, low, high) = median(&mut ratios);
        let (cpu, cpu_low, cpu_high) = median(&mut cpu_ratios);
        println!(
            "{what} ({} isolation): median of {} rounds {p50:.3}x {bare}'s p50 (range {low:.3}–{high:.3}); server CPU per call {cpu:.3}x (range {cpu_low:.3}–{cpu_high:.3})",
            args.isolation,
            ratios.len(),
        );
    };
    sequential_rounds("HTTP/1.1 GET over a Unix socket", "bare axum", &|dynplug| {
        let socket = if dynplug {
            &http_socket
        } else {
            &bare_http_socket
        };
        http_latency(socket.clone(), args.grpc_calls)
    });
    sequential_rounds("gRPC Exec over a Unix socket", "bare tonic", &|dynplug| {
        let socket = if dynplug { &socket } else { &bare_socket };
        grpc_latency(socket.clone(), args.grpc_calls)
    });
    runtime.block_on(running.shutdown());
}
