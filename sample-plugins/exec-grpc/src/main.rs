//! An exec plugin in Rust over the goplugin gRPC protocol: the
//! `plugin.Plugin` service (`Ping`, `Exec`), generated from `plugin.proto`.
//! `Exec`'s payload is a JSON object of values (dynplug sends the call's
//! values so), and so is its reply.
//!
//! It listens where dynplug says: `--port N` (or `-port N`) on 127.0.0.1,
//! or `--socket PATH`. Commands: `greet` (reads `name` or `params.name`, sets `greeting`),
//! `echo` (sets back what it got), `sleep` (`ms`; it sees the deadline).

use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status};

mod proto {
    #![allow(missing_docs)]
    tonic::include_proto!("plugin");
}

use proto::plugin_server::{Plugin, PluginServer};
use proto::{Data, DataRpc, ExecRequest, ExecResponse, PingResponse};

struct Greeter;

#[tonic::async_trait]
impl Plugin for Greeter {
    async fn ping(&self, _: Request<()>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            status: "success".into(),
            data: Some(Data {
                response: "pong".into(),
            }),
        }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let request = request.into_inner();
        let values: Map<String, Value> =
            serde_json::from_slice(&request.payload).unwrap_or_default();
        let out = match request.command.as_str() {
            "greet" => {
                // `name`, or the route's `:name` (the HTTP façade passes
                // path parameters under `params`).
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
            _ => return Err(Status::invalid_argument("Unknown command")),
        };
        Ok(Response::new(ExecResponse {
            status: "success".into(),
            data: Some(DataRpc {
                response: out.to_string().into_bytes(),
            }),
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
        let server = tonic::transport::Server::builder().add_service(PluginServer::new(Greeter));
        if let Some(path) = socket {
            let listener = tokio::net::UnixListener::bind(path)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            server.serve_with_incoming(incoming).await?;
        } else {
            let port = port.unwrap_or_default();
            let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming(incoming).await?;
        }
        Ok(())
    })
}
