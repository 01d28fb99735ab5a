//! Errors as HTTP responses, once: JSON `{"error", "plugin"}` with the status
//! each error kind means (the management API and the façade both answer so).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::Error;

pub(crate) fn error_json(status: StatusCode, message: &str, plugin: Option<&str>) -> Response {
    let body = serde_json::json!({ "error": message, "plugin": plugin });
    (status, axum::Json(body)).into_response()
}

impl Error {
    pub(crate) fn http_status(&self) -> StatusCode {
        match self {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Error::Forbidden { .. } => StatusCode::FORBIDDEN,
            Error::Unavailable { .. } | Error::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            // An exec plugin answered, but not in its protocol.
            Error::BadReply { .. } => StatusCode::BAD_GATEWAY,
            // A process plugin's process died during the call.
            Error::Crashed { .. } => StatusCode::BAD_GATEWAY,
            // 499 is nginx's "client closed request": the caller cancelled.
            Error::Cancelled { .. } => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Error::Downgrade { .. } | Error::RouteConflict { .. } | Error::NameTaken { .. } => {
                StatusCode::CONFLICT
            }
            // JSON-RPC's own codes say whose fault it is.
            Error::Plugin {
                code: Some(-32601), ..
            } => StatusCode::NOT_FOUND,
            Error::Plugin {
                code: Some(-32700 | -32600 | -32602),
                ..
            } => StatusCode::BAD_REQUEST,
            Error::Manifest { .. }
            | Error::Unsupported { .. }
            | Error::Package { .. }
            | Error::Signature { .. }
            | Error::Checksum { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The one place errors become HTTP responses: JSON `{"error", "plugin"}`,
/// with `code` and `data` for a plugin error that has them (JSON-RPC's).
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let plugin = Some(self.plugin()).filter(|p| !p.is_empty());
        let mut response = match &self {
            Error::Plugin {
                code: Some(code),
                data,
                ..
            } => {
                let body = serde_json::json!({
                    "error": self.to_string(),
                    "plugin": plugin,
                    "code": code,
                    "data": data,
                });
                (status, axum::Json(body)).into_response()
            }
            _ => error_json(status, &self.to_string(), plugin),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dynplug\""),
            );
        }
        response
    }
}

/// Why a request body could not be read, as a status: too slow (408),
/// broken off (400), or else too large (413: the only error of the limit).
pub(crate) fn body_error_status(error: &axum::Error) -> StatusCode {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<super::conn::BodyTimedOut>() {
            return StatusCode::REQUEST_TIMEOUT;
        }
        if e.is::<hyper::Error>() {
            return StatusCode::BAD_REQUEST;
        }
        cause = e.source();
    }
    StatusCode::PAYLOAD_TOO_LARGE
}
