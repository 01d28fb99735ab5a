//! The exec kind's own small runtime: supervision, log readers, readiness
//! and health pings, and the I/O of calls made outside any tokio runtime.
//!
//! The library without `server` has no runtime of its own, and blocking
//! `Executor::execute` may be called from any thread (a plain thread, a
//! tokio worker): those calls need somewhere to drive their sockets that
//! is always running. Async calls made inside a runtime do their I/O there
//! instead (see `link.rs`), which saves two thread hops per call.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

/// Worker threads: supervision is mostly idle; blocking callers' calls
/// share them.
const WORKERS: usize = 2;

pub(crate) fn handle() -> &'static Handle {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .thread_name("dynplug-exec")
                .enable_all()
                .build()
                .expect("cannot start the exec runtime's threads")
        })
        .handle()
}

/// Runs `future` to completion from blocking code: on this thread when it
/// is outside any runtime (`block_on` cannot nest), else on the exec
/// runtime while this thread waits.
pub(crate) fn block<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if Handle::try_current().is_err() {
        return handle().block_on(future);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    handle().spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv()
        .expect("the exec runtime never drops a spawned task before it ends")
}
