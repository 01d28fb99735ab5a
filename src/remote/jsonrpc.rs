//! JSON-RPC 2.0 over HTTP, client side, as InfraKit plugins speak it: every
//! call is `POST /` with `{"jsonrpc":"2.0","method":…,"params":{…},"id":N}`
//! and answers `{"result":…}` or `{"error":{"code","message","data"}}`.
//! `Plugin.Implements` says which interfaces a plugin implements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::Method;
use serde_json::Value as Json;

use super::http1::{Http1, quote};
use super::link::{Address, CallError, Handshake};

pub(crate) struct JsonRpc {
    http: Http1,
    next_id: AtomicU64,
}

impl JsonRpc {
    pub(crate) fn new(address: Address) -> JsonRpc {
        JsonRpc {
            http: Http1::new(address),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn address(&self) -> &Address {
        self.http.address()
    }

    /// Calls `method` with `params` (a JSON object, as bytes): its result.
    pub(crate) async fn call(
        &self,
        method: &str,
        params: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Json, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let method = serde_json::to_string(method).unwrap_or_default();
        let params = std::str::from_utf8(params).unwrap_or("{}");
        let body = format!(r#"{{"jsonrpc":"2.0","method":{method},"params":{params},"id":{id}}}"#);
        let request = self.http.request(Method::POST, "/", body, timeout);
        let (status, body) = self.http.send(request).await?;
        reply(status, &body, id)
    }

    /// `Plugin.Implements`: the interfaces as `Name/Version`. A JSON-RPC
    /// server without that method implements nothing in particular.
    pub(crate) async fn implements(&self, timeout: Duration) -> Result<Vec<String>, Handshake> {
        match self.call("Plugin.Implements", b"{}", Some(timeout)).await {
            Ok(result) => Ok(interfaces(&result)),
            Err(CallError::Fault { .. }) => Ok(Vec::new()),
            Err(error) => Err(Handshake::of(error)),
        }
    }
}

/// `{"Interfaces":[{"Name":"Group","Version":"0.1.0"}]}` → `["Group/0.1.0"]`.
fn interfaces(result: &Json) -> Vec<String> {
    let Some(list) = result.get("Interfaces").and_then(Json::as_array) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|spec| {
            let name = spec.get("Name")?.as_str()?;
            let name = crate::text::printable(name, 64);
            Some(match spec.get("Version").and_then(Json::as_str) {
                Some(version) => format!("{name}/{}", crate::text::printable(version, 32)),
                None => name.into_owned(),
            })
        })
        .take(64)
        .collect()
}

/// Reads a JSON-RPC response to the request `id`.
fn reply(status: hyper::StatusCode, body: &[u8], id: u64) -> Result<Json, CallError> {
    let parsed = serde_json::from_slice::<Json>(body);
    let Ok(Json::Object(mut response)) = parsed else {
        if !status.is_success() {
            return Err(CallError::Plugin(format!(
                "HTTP {}: {}",
                status.as_u16(),
                quote(body)
            )));
        }
        return Err(CallError::BadReply(format!(
            "not a JSON-RPC 2.0 response: `{}`",
            quote(body)
        )));
    };
    if let Some(version) = response.get("jsonrpc")
        && version != "2.0"
    {
        return Err(CallError::BadReply(format!(
            "`jsonrpc` is {version}, not \"2.0\""
        )));
    }
    // A parse error is answered with id null; any other id must be ours.
    match response.get("id") {
        None | Some(Json::Null) => {}
        Some(said) if said.as_u64() == Some(id) => {}
        Some(said) => {
            return Err(CallError::BadReply(format!(
                "the response is to request {said}, not {id}"
            )));
        }
    }
    match response.remove("error") {
        None | Some(Json::Null) => {}
        Some(Json::Object(error)) => {
            let code = error.get("code").and_then(Json::as_i64);
            let message = error.get("message").and_then(Json::as_str);
            return match (code, message) {
                (Some(code), Some(message)) => Err(CallError::Fault {
                    code,
                    message: crate::text::printable(message, 1024).into_owned(),
                    data: error.get("data").filter(|d| !d.is_null()).cloned(),
                }),
                _ => Err(CallError::BadReply(format!(
                    "a JSON-RPC error without an integer code and a message: `{}`",
                    quote(body)
                ))),
            };
        }
        Some(other) => {
            return Err(CallError::BadReply(format!(
                "a JSON-RPC error that is not an object: {}",
                quote(other.to_string().as_bytes())
            )));
        }
    }
    response.remove("result").ok_or_else(|| {
        CallError::BadReply(format!(
            "a JSON-RPC response with neither result nor error: `{}`",
            quote(body)
        ))
    })
}

#[cfg(test)]
mod tests {
    use hyper::StatusCode;

    use super::*;

    #[test]
    fn responses_are_read_strictly() {
        let ok = StatusCode::OK;
        assert_eq!(
            reply(
                ok,
                br#"{"jsonrpc":"2.0","result":{"Groups":null},"id":1}"#,
                1
            )
            .unwrap(),
            serde_json::json!({"Groups": null})
        );
        assert_eq!(
            reply(ok, br#"{"jsonrpc":"2.0","result":null,"id":1}"#, 1).unwrap(),
            Json::Null
        );
        match reply(
            ok,
            br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Group ID must not be blank","data":{"x":1}},"id":1}"#,
            1,
        ) {
            Err(CallError::Fault {
                code: -32000,
                message,
                data: Some(data),
            }) => {
                assert_eq!(message, "Group ID must not be blank");
                assert_eq!(data, serde_json::json!({"x": 1}));
            }
            other => panic!("{other:?}"),
        }
        for (body, why) in [
            (&b"<html>"[..], "not a JSON-RPC 2.0 response"),
            (br#"{"jsonrpc":"1.0","result":1,"id":1}"#, "not \"2.0\""),
            (br#"{"jsonrpc":"2.0","result":1,"id":2}"#, "not 1"),
            (br#"{"jsonrpc":"2.0","id":1}"#, "neither result nor error"),
            (
                br#"{"jsonrpc":"2.0","error":{"message":"x"},"id":1}"#,
                "integer code",
            ),
        ] {
            match reply(ok, body, 1) {
                Err(CallError::BadReply(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            reply(StatusCode::METHOD_NOT_ALLOWED, b"no", 1),
            Err(CallError::Plugin(m)) if m == "HTTP 405: no"
        ));
        assert_eq!(
            interfaces(
                &serde_json::json!({"Interfaces":[{"Name":"Group","Version":"0.1.0"},{"Name":"Flavor"}]})
            ),
            ["Group/0.1.0", "Flavor"]
        );
    }
}
