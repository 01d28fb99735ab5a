//! The goplugin REST protocol, client side: `GET /ping` and `POST /exec`
//! with a hex payload, over pooled HTTP/1.1 connections (`http1.rs`).

use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use super::http1::{Http1, QUOTED, quote};
use super::link::{Address, CallError};
use super::payload::{hex, unhex};

pub(crate) struct Rest {
    http: Http1,
    host: HeaderValue,
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
        Rest {
            host: HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("dynplug")),
            http: Http1::new(address),
        }
    }

    pub(crate) fn address(&self) -> &Address {
        self.http.address()
    }

    pub(crate) async fn ping(&self) -> Result<(), CallError> {
        let request = self.request(Method::GET, "/ping", String::new(), None);
        let (status, body) = self.http.send(request).await?;
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
        let (status, body) = self.http.send(request).await?;
        reply(status, &body)
    }

    /// goplugin's requests carry `X-Host`, which its plugins may check
    /// against their allowed hosts.
    fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
        timeout: Option<Duration>,
    ) -> Request<String> {
        let mut request = self.http.request(method, path, body, timeout);
        request.headers_mut().insert("x-host", self.host.clone());
        request
    }
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
