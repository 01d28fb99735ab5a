//! Many plugins at once: load time, threads, memory, descriptors, mappings,
//! serving, and shutdown time.
//!
//! Run: `cargo run --release --example scale -- --plugins 1000 [--isolation pooled]
//! [--load-on-first-call] [--called N] [--unload-idle-after-ms MS]`
//!
//! Installs N copies of the `hello` sample (each with one route of its own,
//! `/api/p<i>/:name`), then measures, in this order:
//! * ready: `PluginManager::new` + `load_plugins` (every plugin serving);
//! * at rest after loading: OS threads of the process, RSS, open descriptors,
//!   memory mappings;
//! * one call to every plugin (or the first `--called N`) through an
//!   `Executor`, and one HTTP request to each of them through the façade (a
//!   server on 127.0.0.1:0), which with `--load-on-first-call` is what loads
//!   them;
//! * at rest after serving (once idle workers had time to leave);
//! * shutdown: `Running::shutdown` (every plugin drained and unloaded);
//!
//! and, as the baselines of the same run, the threads, RSS, descriptors and
//! mappings of the process before any plugin was loaded.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use dynplug::serve::{Endpoint, Server};
use dynplug::{Context, PluginManager};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Plugins to load.
    #[arg(long, default_value_t = 1000)]
    plugins: usize,
    /// Isolation of every plugin (the manifest's default when not given).
    #[arg(long)]
    isolation: Option<String>,
    /// How long to wait for idle pool workers to leave before counting
    /// threads at rest after serving.
    #[arg(long, default_value_t = 3)]
    rest_seconds: u64,
    /// Pause this long after installing the plugins, before measuring (to
    /// attach a profiler).
    #[arg(long, default_value_t = 0)]
    pause_seconds: u64,
    /// Register the plugins and load each one on its first call
    /// (`Builder::load_on_first_call`).
    #[arg(long)]
    load_on_first_call: bool,
    /// Call only the first N plugins (all by default).
    #[arg(long)]
    called: Option<usize>,
    /// Unload versions idle this long (`Builder::unload_idle_after`): the
    /// footprint "at rest after serving" then shows what they gave back.
    #[arg(long)]
    unload_idle_after_ms: Option<u64>,
}

/// CPU time of the whole process so far (user and system), to 10 ms.
fn cpu_time() -> Duration {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks
    // (100 per second on Linux): after the command, which may hold spaces,
    // in parentheses.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_command = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_command
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// What the process holds at one moment.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    threads: usize,
    rss_kib: u64,
    /// Of which anonymous (heap, stacks, relocated data) and shared memory
    /// (the plugins' memfd images).
    anon_kib: u64,
    shmem_kib: u64,
    fds: usize,
    mappings: usize,
}

impl Footprint {
    fn now() -> Footprint {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let (rss_kib, anon_kib, shmem_kib) =
            (field("VmRSS:"), field("RssAnon:"), field("RssShmem:"));
        let mappings = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
        Footprint {
            threads: count("/proc/self/task"),
            rss_kib,
            anon_kib,
            shmem_kib,
            fds: count("/proc/self/fd"),
            mappings,
        }
    }

    fn print(&self, what: &str, base: &Footprint) {
        println!(
            "{what:<28} threads {:>5} ({:+})  RSS {:>8} KiB ({:+} KiB: anon {:+}, shmem {:+})  fds {:>6} ({:+})  mappings {:>6} ({:+})",
            self.threads,
            self.threads as i64 - base.threads as i64,
            self.rss_kib,
            self.rss_kib as i64 - base.rss_kib as i64,
            self.anon_kib as i64 - base.anon_kib as i64,
            self.shmem_kib as i64 - base.shmem_kib as i64,
            self.fds,
            self.fds as i64 - base.fds as i64,
            self.mappings,
            self.mappings as i64 - base.mappings as i64,
        );
    }
}

/// Raises the soft open-files limit to the hard one, as `dynplug serve` does.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(_), Some(maximum)) = (limit.current, limit.maximum) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(maximum),
                maximum: Some(maximum),
            },
        );
    }
}

/// One `GET` on a fresh connection; returns the status line.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: scale\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    let text = String::from_utf8_lossy(&reply);
    text.lines().next().unwrap_or_default().to_owned()
}

fn main() {
    let args = Args::parse();
    raise_open_files_limit();
    support::built();
    let dir = support::private_tempdir();
    let isolation = args
        .isolation
        .as_ref()
        .map(|i| format!(r#""isolation": "{i}", "#))
        .unwrap_or_default();
    for i in 0..args.plugins {
        let name = format!("p{i}");
        let extra = format!(
            r#"{isolation}"http_services": {{"driver": "axum", "routes": [{{"route": "/api/{name}/:name", "method": "GET", "label": "hello.get"}}]}}"#
        );
        let manifest = support::manifest(&name, "hello", "1.0.0", &extra);
        support::install_as(dir.path(), "hello", &name, Some(&manifest));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.pause_seconds > 0 {
        println!("installed; pausing {} s", args.pause_seconds);
    }
    // What was just installed is on its way to the disk; a host starting
    // beside a writeback of N copies would measure the disk, not the load.
    rustix::fs::sync();
    std::thread::sleep(Duration::from_millis(100) + Duration::from_secs(args.pause_seconds));
    let base = Footprint::now();
    base.print("before loading", &base);

    let started = Instant::now();
    let cpu = cpu_time();
    let mut builder =
        PluginManager::builder(dir.path()).load_on_first_call(args.load_on_first_call);
    if let Some(ms) = args.unload_idle_after_ms {
        builder = builder.unload_idle_after(Duration::from_millis(ms));
    }
    let manager = builder.build().unwrap();
    let report = manager.load_plugins().unwrap();
    let ready = started.elapsed();
    let cpu = cpu_time() - cpu;
    assert!(report.failed.is_empty(), "{:?}", report.failed.first());
    println!(
        "ready: {} plugins loaded in {:.1} ms ({:.1} ms of CPU)",
        report.loaded.len(),
        ready.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3
    );
    Footprint::now().print("loaded", &base);

    let called = args.called.unwrap_or(args.plugins).min(args.plugins);
    let started = Instant::now();
    for i in 0..called {
        let (_, executor) = manager.get_plugin(&format!("p{i}")).unwrap();
        let mut ctx = Context::new("hello.get").with("name", "scale");
        executor.execute(&mut ctx).unwrap();
    }
    println!(
        "one call to each of {called}:      {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let running = runtime.block_on(async {
        Server::new(manager.clone())
            .http("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .unwrap()
    });
    let Endpoint::Tcp(addr) = running.http_endpoints()[0].clone() else {
        unreachable!()
    };
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..called {
            let status = get(addr, &format!("/api/p{i}/scale")).await;
            assert!(status.contains(" 200 "), "p{i}: {status}");
        }
    });
    println!(
        "one HTTP request to each:     {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Footprint::now().print("after serving", &base);
    std::thread::sleep(Duration::from_secs(args.rest_seconds));
    Footprint::now().print("at rest after serving", &base);

    let started = Instant::now();
    runtime.block_on(running.shutdown());
    let shutdown = started.elapsed();
    let unloaded = manager
        .list()
        .iter()
        .filter(|p| p.state == dynplug::PluginState::Unloaded)
        .count();
    println!(
        "shutdown: {:.1} ms ({unloaded} of {} unloaded)",
        shutdown.as_secs_f64() * 1e3,
        args.plugins
    );
    Footprint::now().print("after shutdown", &base);
    println!(
        "mapped plugin images left:   {}",
        support::mapped_under(dir.path()).len()
    );
}
