//! A registry plugin shaped like Network Service Mesh's connection plugins:
//! it serves goplugin's `plugin.Plugin` on its own Unix socket, then
//! registers that socket with dynplug's plugin registry with the
//! `CONNECTION` capability, and answers two labels:
//!
//! * `UpdateConnection`: takes `connection` (an object) and returns it with
//!   its name appended to `connection.path` (so a chain shows its order);
//! * `ValidateConnection`: returns `status` `success`, or `failure` with an
//!   `error_message` when started with `--invalid`.
//!
//! Run it beside `dynplug serve --registry-unix /run/dynplug/registry/registry.sock`:
//!
//! ```sh
//! connection --registry /run/dynplug/registry/registry.sock \
//!     --socket /run/dynplug/registry/a.sock --name a
//! ```
//!
//! Flags for the tests: `--endpoint E` registers E instead of the socket,
//! `--capability NAME` (repeatable; default CONNECTION; `none` for an empty
//! list), `--fail` (UpdateConnection errs), `--invalid`, `--sleep-ms N`
//! (each call sleeps first), `--as-uid N` (registers as user N: see
//! `become_uid`). It exits 2 if the registration is refused, printing the
//! reason.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tonic::{Request, Response, Status};

mod proto {
    #![allow(missing_docs)]
    tonic::include_proto!("plugin");
}

mod registry {
    #![allow(missing_docs)]
    tonic::include_proto!("plugins");
}

use proto::plugin_server::{Plugin, PluginServer};
use proto::{Data, DataRpc, ExecRequest, ExecResponse, PingResponse};

#[derive(Clone, Default)]
struct Connection {
    name: String,
    fail: bool,
    invalid: bool,
    sleep: Duration,
}

#[tonic::async_trait]
impl Plugin for Connection {
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
        tokio::time::sleep(self.sleep).await;
        let out = match request.command.as_str() {
            "UpdateConnection" => {
                if self.fail {
                    return Err(Status::aborted(format!(
                        "{} refuses the connection",
                        self.name
                    )));
                }
                let mut connection = values.get("connection").cloned().unwrap_or(json!({}));
                let path = connection
                    .as_object_mut()
                    .map(|c| c.entry("path").or_insert_with(|| json!([])));
                if let Some(Value::Array(path)) = path {
                    path.push(json!(self.name));
                }
                json!({ "connection": connection })
            }
            "ValidateConnection" if self.invalid => json!({
                "status": "failure",
                "error_message": format!("{} finds the connection invalid", self.name),
            }),
            "ValidateConnection" => json!({ "status": "success" }),
            "Name" => json!({ "name": self.name, "pid": std::process::id() }),
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

struct Args {
    registry: String,
    socket: String,
    endpoint: Option<String>,
    capabilities: Vec<i32>,
    as_uid: Option<u32>,
    plugin: Connection,
}

fn args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut registry, mut socket, mut endpoint) = (None, None, None);
    let mut capabilities = Vec::new();
    let mut as_uid = None;
    let mut plugin = Connection::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--registry" => registry = Some(value()?),
            "--socket" => socket = Some(value()?),
            "--endpoint" => endpoint = Some(value()?),
            "--name" => plugin.name = value()?,
            "--capability" => match value()?.as_str() {
                "CONNECTION" => capabilities.push(registry::PluginCapability::Connection as i32),
                "EXEC" => capabilities.push(registry::PluginCapability::Exec as i32),
                "none" => capabilities.push(-1),
                other => return Err(format!("unknown capability {other}")),
            },
            "--as-uid" => as_uid = Some(value()?.parse().map_err(|e| format!("--as-uid: {e}"))?),
            "--fail" => plugin.fail = true,
            "--invalid" => plugin.invalid = true,
            "--sleep-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--sleep-ms: {e}"))?;
                plugin.sleep = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if capabilities.is_empty() {
        capabilities.push(registry::PluginCapability::Connection as i32);
    }
    capabilities.retain(|c| *c >= 0);
    Ok(Args {
        registry: registry.ok_or("--registry PATH is required")?,
        socket: socket.ok_or("--socket PATH is required")?,
        endpoint,
        capabilities,
        as_uid,
        plugin,
    })
}

/// Becomes user `uid` for this thread (the runtime's only one) while
/// keeping root's capabilities, so that it can still reach root's private
/// registry directory and socket: the kernel then reports `uid` as the
/// caller (`SO_PEERCRED` gives the effective uid of the thread that
/// connects). Needs root (`CAP_SETPCAP`, `CAP_SETUID`): how the tests make
/// a caller of another user.
fn become_uid(uid: u32) -> std::io::Result<()> {
    use rustix::thread::{CapabilitiesSecureBits, set_capabilities_secure_bits};
    set_capabilities_secure_bits(CapabilitiesSecureBits::NO_SETUID_FIXUP)?;
    rustix::thread::set_thread_res_uid(None, rustix::process::Uid::from_raw(uid), None)?;
    Ok(())
}

async fn register(args: &Args) -> Result<(), Status> {
    let path = args.registry.clone();
    // Any URI will do: the connector dials the registry's socket.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| Status::unavailable(format!("registry {}: {e}", args.registry)))?;
    let mut client = registry::plugin_registry_client::PluginRegistryClient::new(channel);
    client
        .register(registry::PluginInfo {
            name: args.plugin.name.clone(),
            endpoint: args.endpoint.clone().unwrap_or_else(|| args.socket.clone()),
            capabilities: args.capabilities.clone(),
        })
        .await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("connection: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let _ = std::fs::remove_file(&args.socket);
        let listener = match tokio::net::UnixListener::bind(&args.socket) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("connection: binding {}: {e}", args.socket);
                return std::process::ExitCode::from(1);
            }
        };
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .add_service(PluginServer::new(args.plugin.clone()))
            .serve_with_incoming(incoming);
        // Serving before registering: the registry dials back at once.
        let serving = tokio::spawn(server);
        if let Some(uid) = args.as_uid
            && let Err(e) = become_uid(uid)
        {
            println!("cannot become uid {uid}: {e}");
            return std::process::ExitCode::from(3);
        }
        if let Err(status) = register(&args).await {
            println!("refused: {:?}: {}", status.code(), status.message());
            return std::process::ExitCode::from(2);
        }
        println!("registered {}", args.plugin.name);
        let _ = serving.await;
        std::process::ExitCode::SUCCESS
    })
}
