//! The child side of a `process` plugin: a runner, started by the host,
//! that loads the plugin's library with the native loader and serves calls
//! on a Unix socket.
//!
//! The runner is the `dynplug` binary (its first argument is [`ARG`]), or
//! any program that calls [`run_if_asked`] first thing in `main`. It reads
//! the load from its standard input (`spec.rs`), checks that it speaks the
//! host's protocol and ABI, sets its resource limits, loads the library
//! from those bytes (checksum, header, memfd image, `dlopen`, layout check,
//! `init`: `native::NativeVersion::load_bytes`), binds the socket the host
//! named, and serves each connection on a thread of its own, calling the
//! plugin on that thread (no hop). SIGTERM runs `shutdown` once no call is
//! running, then exits.
//!
//! Exit statuses the host reads: 2 (not started by a matching host), 3 (the
//! load failed), 4 (`init` failed); the message is the last line on stderr.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use super::spec::{self, Spec};
use super::wire::{self, Fields, Frame};
use crate::manifest::Isolation;
use crate::native::{NativeOptions, NativeVersion};
use crate::version::Outcome;
use crate::{CancelToken, Context};

/// The first argument that makes the `dynplug` binary (or a host that
/// calls [`run_if_asked`]) a runner.
pub const ARG: &str = "__dynplug-process-runner";

/// Exit status when the runner was not started by a host it can serve.
pub(crate) const EXIT_MISMATCH: u8 = 2;
/// Exit status when the library could not be loaded.
pub(crate) const EXIT_LOAD: u8 = 3;
/// Exit status when the plugin's `init` failed.
pub(crate) const EXIT_INIT: u8 = 4;

type Loaded = Arc<RwLock<NativeVersion>>;
/// The cancel tokens of the calls running, by id.
type Running = Mutex<HashMap<u64, CancelToken>>;

/// Runs this process as a `process` plugin's runner if its first argument
/// is [`ARG`] (the host starts runners that way), and returns its exit
/// status; `None` otherwise.
///
/// The `dynplug` binary does this. A host that embeds dynplug and would
/// rather be its own runner calls it first thing in `main`, and points
/// [`Builder::process_runner`](crate::Builder::process_runner) at its own
/// executable:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = dynplug::run_if_runner() {
///         return code;
///     }
///     // … the host as usual, with
///     // PluginManager::builder(dir).process_runner(std::env::current_exe().unwrap())
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn run_if_runner() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != ARG {
        return None;
    }
    let socket = match (args.next(), args.next()) {
        (Some(flag), Some(path)) if flag == "--socket" => PathBuf::from(path),
        _ => {
            eprintln!("dynplug runner: expected `{ARG} --socket PATH`");
            return Some(ExitCode::from(EXIT_MISMATCH));
        }
    };
    Some(match run(&socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("dynplug runner: {message}");
            ExitCode::from(code)
        }
    })
}

fn run(socket: &Path) -> Result<(), (u8, String)> {
    let loaded: Arc<OnceLock<Loaded>> = Arc::default();
    on_terminate(Arc::clone(&loaded)).map_err(|e| (EXIT_LOAD, format!("signals: {e}")))?;
    let stdin = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| (EXIT_MISMATCH, format!("standard input: {e}")))?;
    let (spec, bytes) = spec::read(stdin).map_err(|e| (EXIT_MISMATCH, e.to_string()))?;
    check_host(&spec)?;
    super::limits::apply(&spec.limits)
        .map_err(|e| (EXIT_LOAD, format!("setting the resource limits: {e}")))?;
    let mut manifest = spec.manifest;
    // Calls run on the thread that reads them: the process is the
    // isolation, and it never unloads the library.
    manifest.isolation = Isolation::Inline;
    let options = NativeOptions {
        shadow_dir: spec.shadow_dir,
        pool_size: 1,
        queue_limit: None,
        max_library_size: spec.max_library_size,
        init_timeout: Duration::from_millis(spec.init_timeout_ms),
        shutdown_timeout: Duration::from_millis(spec.shutdown_timeout_ms),
        // The runner reports nothing after its one version's unload: the
        // process exits.
        late: crate::native::LateEnding::ignored(),
        // Its library is loaded now, never on a first call.
        first_load: crate::native::FirstLoad::ignored(),
    };
    let version =
        NativeVersion::load_bytes(&manifest, &spec.dir, &options, bytes).map_err(|e| {
            let code = match e {
                crate::Error::Init { .. } => EXIT_INIT,
                _ => EXIT_LOAD,
            };
            (code, e.to_string())
        })?;
    let version: Loaded = Arc::new(RwLock::new(version));
    let _ = loaded.set(Arc::clone(&version));
    // A socket left by the previous process of this version.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| (EXIT_LOAD, format!("binding {}: {e}", socket.display())))?;
    let running: Arc<Running> = Arc::default();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let version = Arc::clone(&version);
        let running = Arc::clone(&running);
        let spawned = std::thread::Builder::new()
            .name("dynplug-runner-call".into())
            .spawn(move || {
                let _ = serve(stream, &version, &running);
            });
        if let Err(e) = spawned {
            eprintln!("dynplug runner: cannot start a thread for a connection: {e}");
        }
    }
    Ok(())
}

/// Refuses a load from a host that speaks another protocol or ABI.
fn check_host(spec: &Spec) -> Result<(), (u8, String)> {
    if spec.wire == wire::VERSION && spec.abi == crate::ABI_VERSION {
        return Ok(());
    }
    Err((
        EXIT_MISMATCH,
        format!(
            "this runner (dynplug {}) speaks process protocol {} and plugin ABI {}.{}, \
             the host protocol {} and ABI {}.{}: point the host at a runner of its own version",
            env!("CARGO_PKG_VERSION"),
            wire::VERSION,
            crate::ABI_VERSION.0,
            crate::ABI_VERSION.1,
            spec.wire,
            spec.abi.0,
            spec.abi.1
        ),
    ))
}

/// On SIGTERM (the host's stop), waits for the calls running, runs the
/// plugin's `shutdown` and exits.
fn on_terminate(loaded: Arc<OnceLock<Loaded>>) -> io::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("dynplug-runner-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = match signal(SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let _ = ready_tx.send(Ok(()));
                term.recv().await;
            });
            if let Some(version) = loaded.get() {
                // The write lock waits for the calls running.
                let mut version = version.write().unwrap_or_else(|e| e.into_inner());
                version.unload();
            }
            std::process::exit(0);
        })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the signal thread ended")))
}

/// Serves one connection: one request at a time, answered on this thread.
fn serve(
    mut stream: UnixStream,
    version: &RwLock<NativeVersion>,
    running: &Running,
) -> io::Result<()> {
    let invalid = |e: wire::Malformed| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut keys: Vec<compact_str::CompactString> = Vec::new();
    loop {
        let kind = match wire::read_frame(&mut stream, &mut input) {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut fields = Fields::new(&input[1..]);
        output = match kind {
            wire::PING => pong(output),
            wire::CALL => {
                let (id, ctx) = wire::read_call(&mut fields).map_err(invalid)?;
                let token = CancelToken::new();
                let mut ctx = ctx.with_cancel_token(token.clone());
                lock(running).insert(id, token);
                keys.clear();
                keys.extend(ctx.values.keys().cloned());
                let outcome = {
                    let version = version.read().unwrap_or_else(|e| e.into_inner());
                    version.execute(&mut ctx)
                };
                lock(running).remove(&id);
                reply(output, &ctx, &keys, outcome)
            }
            wire::CANCEL => {
                let id = fields.varint().map_err(invalid)?;
                if let Some(token) = lock(running).get(&id) {
                    token.cancel();
                }
                // Not answered.
                continue;
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown frame kind {other}"),
                ));
            }
        };
        wire::write_frame(&mut stream, &output)?;
    }
}

fn lock(running: &Running) -> std::sync::MutexGuard<'_, HashMap<u64, CancelToken>> {
    running.lock().unwrap_or_else(|e| e.into_inner())
}

fn pong(buf: Vec<u8>) -> Vec<u8> {
    let mut frame = Frame::start(buf, wire::PONG);
    frame.varint(wire::VERSION.into());
    frame.varint(crate::ABI_VERSION.0.into());
    frame.varint(crate::ABI_VERSION.1.into());
    frame.varint(std::process::id().into());
    frame.finish()
}

/// The `REPLY` to a call: its outcome, the keys it removed (of `before`,
/// the keys it was called with) and the values it set.
fn reply(
    buf: Vec<u8>,
    ctx: &Context,
    before: &[compact_str::CompactString],
    outcome: crate::Result<Outcome>,
) -> Vec<u8> {
    let mut frame = Frame::start(buf, wire::REPLY);
    match outcome {
        Ok(Outcome::Ok) => {
            frame.u8(wire::status::OK);
            frame.str("");
        }
        Ok(Outcome::Error(message)) => {
            frame.u8(wire::status::ERROR);
            frame.str(&message);
        }
        Ok(Outcome::Panic(message)) => {
            frame.u8(wire::status::PANIC);
            frame.str(&message);
        }
        Err(e) => {
            frame.u8(wire::status::ERROR);
            frame.str(&e.to_string());
        }
    }
    let removed = before
        .iter()
        .filter(|k| !ctx.values.contains_key(k.as_str()));
    frame.varint(removed.clone().count() as u64);
    for key in removed {
        frame.str(key);
    }
    frame.varint(ctx.written().count() as u64);
    for (key, value) in ctx.written() {
        frame.str(key);
        frame.value(value);
    }
    frame.finish()
}
