//! Docker's plugin protocol, client side: the `POST /Plugin.Activate`
//! handshake (`{"Implements": [...]}`), then `POST /<Service.Method>` with
//! a JSON body; errors are `{"Err": "…"}`.

use std::time::Duration;

use hyper::header::{ACCEPT, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::Value as Json;

use super::http1::{Http1, quote};
use super::link::{Address, CallError, Handshake};

/// What Docker's client sends as `Accept`.
const ACCEPT_PLUGIN: &str = "application/vnd.docker.plugins.v1.2+json";

pub(crate) struct Docker {
    http: Http1,
}

impl Docker {
    pub(crate) fn new(address: Address) -> Docker {
        Docker {
            http: Http1::new(address),
        }
    }

    pub(crate) fn address(&self) -> &Address {
        self.http.address()
    }

    /// Calls `method` with `params` (a JSON object, as bytes): the reply
    /// body, `None` when it is empty.
    pub(crate) async fn call(
        &self,
        method: &str,
        params: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Option<Json>, CallError> {
        // A method is one path segment: `Service.Method`.
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(CallError::Plugin(format!(
                "`{}` is not a Docker plugin method (`Service.Method`)",
                crate::text::printable(method, 100)
            )));
        }
        let body = String::from_utf8_lossy(params).into_owned();
        let (status, body) = self.post(&format!("/{method}"), body, timeout).await?;
        reply(status, &body)
    }

    /// `Plugin.Activate`: the subsystems the plugin implements.
    pub(crate) async fn activate(&self, timeout: Duration) -> Result<Vec<String>, Handshake> {
        let (status, body) = self
            .post("/Plugin.Activate", String::new(), Some(timeout))
            .await
            .map_err(Handshake::of)?;
        let parsed = serde_json::from_slice::<Json>(&body).ok();
        let implements = parsed
            .as_ref()
            .filter(|_| status == StatusCode::OK)
            .and_then(|reply| reply.get("Implements")?.as_array());
        match implements {
            Some(list) => Ok(list
                .iter()
                .filter_map(|name| Some(crate::text::printable(name.as_str()?, 64).into_owned()))
                .take(64)
                .collect()),
            None => Err(Handshake::Refused(format!(
                "Plugin.Activate answered HTTP {}: `{}`",
                status.as_u16(),
                quote(&body)
            ))),
        }
    }

    async fn post(
        &self,
        path: &str,
        body: String,
        timeout: Option<Duration>,
    ) -> Result<(StatusCode, Vec<u8>), CallError> {
        let mut request = self.http.request(Method::POST, path, body, timeout);
        request
            .headers_mut()
            .insert(ACCEPT, HeaderValue::from_static(ACCEPT_PLUGIN));
        self.http.send(request).await
    }
}

/// Reads a reply: the body, or the plugin's `Err`.
fn reply(status: StatusCode, body: &[u8]) -> Result<Option<Json>, CallError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if status.is_success() {
            return Ok(None);
        }
        return Err(CallError::Plugin(format!("HTTP {}", status.as_u16())));
    }
    let parsed = serde_json::from_slice::<Json>(body);
    let err = parsed
        .as_ref()
        .ok()
        .and_then(|reply| reply.get("Err")?.as_str())
        .filter(|err| !err.is_empty());
    if let Some(err) = err {
        return Err(CallError::Plugin(
            crate::text::printable(err, 1024).into_owned(),
        ));
    }
    if !status.is_success() {
        return Err(CallError::Plugin(format!(
            "HTTP {}: {}",
            status.as_u16(),
            quote(body)
        )));
    }
    match parsed {
        Ok(Json::Object(mut reply)) => {
            // Docker's replies carry `"Err": ""` on success.
            reply.remove("Err");
            Ok(Some(Json::Object(reply)))
        }
        Ok(other) => Ok(Some(other)),
        Err(e) => Err(CallError::BadReply(format!(
            "the reply is not JSON ({e}): `{}`",
            quote(body)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            reply(StatusCode::OK, br#"{"Err":"","Mountpoint":"/m"}"#).unwrap(),
            Some(serde_json::json!({"Mountpoint": "/m"}))
        );
        assert_eq!(reply(StatusCode::OK, b"").unwrap(), None);
        assert!(matches!(
            reply(StatusCode::INTERNAL_SERVER_ERROR, br#"{"Err":"no such volume"}"#),
            Err(CallError::Plugin(m)) if m == "no such volume"
        ));
        assert!(matches!(
            reply(StatusCode::OK, br#"{"Err":"refused"}"#),
            Err(CallError::Plugin(m)) if m == "refused"
        ));
        assert!(matches!(
            reply(StatusCode::NOT_FOUND, b"404 page not found"),
            Err(CallError::Plugin(m)) if m == "HTTP 404: 404 page not found"
        ));
        assert!(matches!(
            reply(StatusCode::OK, b"<html>"),
            Err(CallError::BadReply(m)) if m.contains("not JSON")
        ));
    }
}
