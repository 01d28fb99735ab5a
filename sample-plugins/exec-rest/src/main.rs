//! An exec plugin in Rust over the goplugin REST protocol: `GET /ping`, and
//! `POST /exec` with `{"command", "payload"}` where the payload is the hex
//! of a JSON object of values (dynplug sends the call's values so).
//!
//! It listens where dynplug says: `--port N` (or `-port N`) on 127.0.0.1,
//! or `--socket PATH`. Commands: `greet` (reads `name` or `params.name`, sets `greeting`),
//! `echo` (sets back what it got), `sleep` (`ms`, for deadlines).

use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut socket) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" | "-port" => port = args.next(),
            "--socket" => socket = args.next(),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(path) = socket {
            let listener = tokio::net::UnixListener::bind(path)?;
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(serve(stream));
            }
        } else {
            let port = port.unwrap_or_default();
            let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                tokio::spawn(serve(stream));
            }
        }
    })
}

async fn serve<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper::service::service_fn(handle);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn handle(request: Request<Incoming>) -> Result<Response<String>, Infallible> {
    let reply = match (request.method(), request.uri().path()) {
        (&Method::GET, "/ping") => (
            StatusCode::OK,
            json!({"status": "success", "data": {"response": "pong"}}),
        ),
        (&Method::POST, "/exec") => match request.into_body().collect().await {
            Ok(body) => exec(&body.to_bytes()).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    let mut response = Response::new(reply.1.to_string());
    *response.status_mut() = reply.0;
    Ok(response)
}

async fn exec(body: &[u8]) -> (StatusCode, Value) {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let command = request["command"].as_str().unwrap_or_default();
    let payload = unhex(request["payload"].as_str().unwrap_or_default());
    let values: Map<String, Value> = serde_json::from_slice(&payload).unwrap_or_default();
    let out = match command {
        "greet" => {
            // `name`, or the route's `:name` (the HTTP façade passes path
            // parameters under `params`).
            let name = values
                .get("name")
                .or_else(|| values.get("params")?.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("world");
            json!({ "greeting": format!("hello, {name}") })
        }
        "echo" => Value::Object(values),
        "sleep" => {
            let ms = values.get("ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            json!({ "slept_ms": ms })
        }
        _ => return error(StatusCode::BAD_REQUEST, "Unknown command"),
    };
    let response = hex(out.to_string().as_bytes());
    (
        StatusCode::ACCEPTED,
        json!({"status": "success", "data": {"response": response}}),
    )
}

fn error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (status, json!({"status": "error", "message": message}))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}
