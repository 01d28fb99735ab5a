//! The goplugin REST protocol, client side: `GET /ping` and `POST /exec`
//! with a hex payload, over pooled HTTP/1.1 connections.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::link::{Address, CallError, MAX_REPLY};
use super::payload::{hex, unhex};

/// Idle connections kept per process; more are closed after their call.
const MAX_IDLE: usize = 64;
/// How much of a bad reply an error quotes.
const QUOTED: usize = 200;

pub(crate) struct Rest {
    address: Address,
    authority: HeaderValue,
    host: HeaderValue,
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
    rest: &'a Rest,
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
            let mut idle = self.rest.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            } else {
                conn.task.abort();
            }
        }
    }
}

#[derive(Deserialize)]
struct Reply {
    status: Option<String>,
    data: Option<Data>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    response: Option<String>,
}

impl Rest {
    pub(crate) fn new(address: Address, host: &Arc<str>) -> Rest {
        let authority = match &address {
            Address::Tcp(addr) => addr.to_string(),
            Address::Unix(_) => "localhost".to_owned(),
        };
        Rest {
            authority: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            host: HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("dynplug")),
            address,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), CallError> {
        let request = self.request(Method::GET, "/ping", String::new(), None);
        let (status, body) = self.send(request).await?;
        if !status.is_success() {
            return Err(CallError::Plugin(format!("Ping answered HTTP {status}")));
        }
        // The reference answers `{"status":"success",...}`; a plugin that
        // says otherwise is not ready.
        match serde_json::from_slice::<Reply>(&body) {
            Ok(Reply {
                status: Some(said), ..
            }) if said != "success" => Err(CallError::Plugin(format!(
                "Ping answered status `{}`",
                crate::text::printable(&said, QUOTED)
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) async fn exec(
        &self,
        command: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        #[derive(serde::Serialize)]
        struct Exec<'a> {
            command: &'a str,
            payload: String,
        }
        let body = serde_json::to_string(&Exec {
            command,
            payload: hex(payload),
        })
        .unwrap_or_default();
        let request = self.request(Method::POST, "/exec", body, timeout);
        let (status, body) = self.send(request).await?;
        reply(status, &body)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
        timeout: Option<Duration>,
    ) -> Request<String> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = hyper::Uri::from_static("/");
        if let Ok(uri) = path.parse() {
            *request.uri_mut() = uri;
        }
        let headers = request.headers_mut();
        headers.insert(HOST, self.authority.clone());
        headers.insert("x-host", self.host.clone());
        if request.method() == Method::POST {
            let headers = request.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            // For plugins that want to know (HTTP has no standard header):
            // the call is abandoned, and its connection closed, then.
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
    async fn send(&self, request: Request<String>) -> Result<(StatusCode, Vec<u8>), CallError> {
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
            rest: self,
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
            rest: self,
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

/// Reads an Exec reply: the payload, the plugin's error, or why the reply
/// is not goplugin's.
fn reply(status: StatusCode, body: &[u8]) -> Result<Vec<u8>, CallError> {
    let parsed = serde_json::from_slice::<Reply>(body);
    if !status.is_success() {
        let message = match parsed {
            Ok(Reply {
                message: Some(message),
                ..
            }) => message,
            _ => quote(body),
        };
        return Err(CallError::Plugin(format!(
            "HTTP {}: {}",
            status.as_u16(),
            crate::text::printable(&message, 1024)
        )));
    }
    let reply = parsed.map_err(|e| {
        CallError::BadReply(format!(
            "the reply is not goplugin's JSON ({e}): `{}`",
            quote(body)
        ))
    })?;
    match reply.status.as_deref() {
        Some("success") => {}
        said => {
            let message = reply
                .message
                .unwrap_or_else(|| format!("status `{}`", said.unwrap_or("(none)")));
            return Err(CallError::Plugin(
                crate::text::printable(&message, 1024).into_owned(),
            ));
        }
    }
    let response = reply.data.and_then(|d| d.response).unwrap_or_default();
    unhex(&response).ok_or_else(|| {
        CallError::BadReply(format!(
            "data.response is not hex: `{}`",
            crate::text::printable(&response, QUOTED)
        ))
    })
}

fn quote(body: &[u8]) -> String {
    crate::text::printable(&String::from_utf8_lossy(body), QUOTED).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_strictly() {
        let ok = br#"{"status":"success","data":{"response":"7b7d"}}"#;
        assert_eq!(reply(StatusCode::ACCEPTED, ok).unwrap(), b"{}");
        let err = br#"{"status":"error","message":"Unknown command"}"#;
        match reply(StatusCode::BAD_REQUEST, err) {
            Err(CallError::Plugin(m)) => assert_eq!(m, "HTTP 400: Unknown command"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            reply(StatusCode::OK, b"<html>"),
            Err(CallError::BadReply(m)) if m.contains("not goplugin's JSON")
        ));
        assert!(matches!(
            reply(StatusCode::OK, br#"{"status":"success","data":{"response":"zz"}}"#),
            Err(CallError::BadReply(m)) if m.contains("not hex")
        ));
        assert!(matches!(
            reply(StatusCode::OK, br#"{"status":"error","message":"no"}"#),
            Err(CallError::Plugin(m)) if m == "no"
        ));
    }
}
