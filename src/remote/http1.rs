//! Pooled HTTP/1.1 connections to one address, for every wire that is HTTP
//! with JSON bodies (goplugin REST, JSON-RPC, Docker's plugin protocol).
//!
//! Connections are kept per tokio runtime (see `link.rs`); a request that
//! a closed pooled connection never sent goes out once more on a new
//! connection, and nothing sent is ever sent again.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::link::{Address, CallError, MAX_REPLY};

/// Idle connections kept per address; more are closed after their call.
const MAX_IDLE: usize = 64;
/// How much of a bad reply an error quotes.
pub(crate) const QUOTED: usize = 200;

pub(crate) struct Http1 {
    address: Address,
    authority: HeaderValue,
    idle: Mutex<Vec<Conn>>,
}

/// One HTTP/1.1 connection: the request handle and the task that drives
/// it, on the runtime it was opened on.
struct Conn {
    runtime: tokio::runtime::Id,
    send: SendRequest<String>,
    task: AbortHandle,
}

/// A connection taken for a call: given back when the call completes,
/// closed (the task aborted, so the plugin sees the request go away) when
/// the call is dropped halfway, at a deadline or a cancellation.
struct Taken<'a> {
    pool: &'a Http1,
    conn: Option<Conn>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.task.abort();
        }
    }
}

impl Taken<'_> {
    fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            } else {
                conn.task.abort();
            }
        }
    }
}

impl Http1 {
    pub(crate) fn new(address: Address) -> Http1 {
        let authority = match &address {
            Address::Tcp(addr) => addr.to_string(),
            Address::Unix(..) => "localhost".to_owned(),
        };
        Http1 {
            authority: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            address,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn address(&self) -> &Address {
        &self.address
    }

    /// A request to `path` with `Host` set; a POST carries `body` as JSON,
    /// and the call's deadline as `X-Dynplug-Timeout-Ms` (HTTP has no
    /// standard header for it; the call is abandoned, and its connection
    /// closed, at the deadline anyway).
    pub(crate) fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
        timeout: Option<Duration>,
    ) -> Request<String> {
        let mut request = Request::new(body);
        *request.uri_mut() = path.parse().unwrap_or(hyper::Uri::from_static("/"));
        let post = method == Method::POST;
        *request.method_mut() = method;
        let headers = request.headers_mut();
        headers.insert(HOST, self.authority.clone());
        if post {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(timeout) = timeout
                && let Ok(value) = HeaderValue::from_str(&timeout.as_millis().to_string())
            {
                headers.insert("x-dynplug-timeout-ms", value);
            }
        }
        request
    }

    /// Sends on a pooled connection of this runtime, or a new one. A
    /// request that a closed pooled connection never sent goes out once
    /// more on a new connection; nothing sent is ever sent again.
    pub(crate) async fn send(
        &self,
        request: Request<String>,
    ) -> Result<(StatusCode, Vec<u8>), CallError> {
        let mut taken = self.take().await?;
        let mut request = Some(request);
        let mut fresh = false;
        let response = loop {
            let conn = taken.conn.as_mut().expect("taken holds a connection");
            // Ready once the previous response is read; an error means the
            // plugin closed the idle connection.
            let sent = match conn.send.ready().await {
                Ok(()) => {
                    let request = request.take().expect("sent at most once");
                    conn.send.try_send_request(request).await
                }
                Err(_) if !fresh => {
                    taken = self.fresh().await?;
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(CallError::Lost(e.to_string())),
            };
            match sent {
                Ok(response) => break response,
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        request = Some(unsent);
                        taken = self.fresh().await?;
                        fresh = true;
                    }
                    _ => return Err(CallError::Lost(e.into_error().to_string())),
                },
            }
        };
        let (parts, body) = response.into_parts();
        if let Some(len) = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > MAX_REPLY as u64
        {
            return Err(too_large(len));
        }
        let body = collect(body).await?;
        taken.give_back();
        Ok((parts.status, body))
    }

    async fn fresh(&self) -> Result<Taken<'_>, CallError> {
        Ok(Taken {
            pool: self,
            conn: Some(self.connect().await?),
        })
    }

    /// An idle connection opened on this runtime, or a new one.
    async fn take(&self) -> Result<Taken<'_>, CallError> {
        let runtime = Handle::current().id();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.send.is_closed());
            idle.iter()
                .rposition(|c| c.runtime == runtime)
                .map(|i| idle.swap_remove(i))
        };
        let conn = match found {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        Ok(Taken {
            pool: self,
            conn: Some(conn),
        })
    }

    async fn connect(&self) -> Result<Conn, CallError> {
        let stream = self
            .address
            .connect()
            .await
            .map_err(|e| CallError::Connect(format!("{}: {e}", self.address)))?;
        let (send, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CallError::Connect(e.to_string()))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            runtime: Handle::current().id(),
            send,
            task: task.abort_handle(),
        })
    }
}

/// Reads a reply body, up to `MAX_REPLY` bytes.
async fn collect(mut body: hyper::body::Incoming) -> Result<Vec<u8>, CallError> {
    use http_body::Body;
    let mut bytes = Vec::new();
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return Ok(bytes),
            Some(Err(e)) => return Err(CallError::Lost(format!("reading the reply: {e}"))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > MAX_REPLY {
                        return Err(too_large((bytes.len() + data.len()) as u64));
                    }
                    bytes.extend_from_slice(&data);
                }
            }
        }
    }
}

fn too_large(len: u64) -> CallError {
    CallError::BadReply(format!(
        "a reply of {len} bytes or more, over the limit of {MAX_REPLY} bytes"
    ))
}

/// A bounded, printable quote of a reply body, for errors.
pub(crate) fn quote(body: &[u8]) -> String {
    crate::text::printable(&String::from_utf8_lossy(body), QUOTED).into_owned()
}
