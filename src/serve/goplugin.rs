//! The goplugin `plugin.Plugin` service, for clients written for goplugin:
//! on the main gRPC endpoints (the plugin named by `x-dynplug-plugin`), and on
//! a Unix socket per plugin (no metadata needed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::conn::Settings;
use super::grpc_request::{PLUGIN_METADATA, authorize, check_value_count, executor, timeout};
use super::proto::goplugin::{self, plugin_server};
use super::server::Listening;
use super::{Endpoint, State};
use crate::{Context, Value};

/// The goplugin service: for one plugin (its own socket), or for the plugin
/// named by the request metadata.
pub(crate) struct GoPlugin {
    pub(crate) state: State,
    pub(crate) plugin: Option<String>,
}

impl GoPlugin {
    fn plugin(&self, metadata: &MetadataMap) -> Result<String, Status> {
        if let Some(plugin) = &self.plugin {
            return Ok(plugin.clone());
        }
        metadata
            .get(PLUGIN_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "select the plugin with the `{PLUGIN_METADATA}` metadata"
                ))
            })
    }
}

#[tonic::async_trait]
impl plugin_server::Plugin for GoPlugin {
    async fn ping(&self, request: Request<()>) -> Result<Response<goplugin::PingResponse>, Status> {
        let name = self.plugin(request.metadata())?;
        authorize(&self.state, &request, &name)?;
        executor(&self.state, &name)?;
        Ok(Response::new(goplugin::PingResponse {
            status: "success".into(),
            data: Some(goplugin::Data {
                response: "pong".into(),
            }),
        }))
    }

    async fn exec(
        &self,
        request: Request<goplugin::ExecRequest>,
    ) -> Result<Response<goplugin::ExecResponse>, Status> {
        let name = self.plugin(request.metadata())?;
        authorize(&self.state, &request, &name)?;
        let deadline = timeout(&self.state, request.metadata(), 0);
        let request = request.into_inner();
        let executor = executor(&self.state, &name)?;
        let mut ctx = Context::new(request.command);
        // A JSON object payload becomes the values; anything else is passed as `payload` bytes.
        match serde_json::from_slice::<serde_json::Value>(&request.payload) {
            Ok(serde_json::Value::Object(values)) => {
                check_value_count(values.len())?;
                for (key, value) in values {
                    ctx.set(key, Value::from(value));
                }
            }
            _ if request.payload.is_empty() => {}
            _ => ctx.set("payload", Value::Bytes(request.payload)),
        }
        super::call(
            &self.state,
            &executor,
            None,
            &mut ctx,
            deadline,
            super::Facade::Grpc,
        )
        .await?;
        let values: BTreeMap<&str, &Value> = ctx.written().collect();
        Ok(Response::new(goplugin::ExecResponse {
            status: "success".into(),
            data: Some(goplugin::DataRpc {
                response: serde_json::to_vec(&values).unwrap_or_default(),
            }),
        }))
    }
}

/// Serves the goplugin service on `<dir>/<plugin>.sock` for every loaded
/// plugin, so an unmodified goplugin client (which knows nothing of
/// `x-dynplug-plugin`) can call any dynplug plugin. Sockets follow plugins as
/// they load and unload; all are removed at shutdown.
pub(crate) async fn plugin_sockets(
    state: State,
    dir: PathBuf,
    listening: Listening,
    settings: Arc<Settings>,
    max_message_size: usize,
) {
    let mut events = state.manager.subscribe();
    let mut shutdown = state.shutdown.clone();
    let mut served: HashMap<String, (watch::Sender<bool>, JoinHandle<()>)> = HashMap::new();
    let sockets = Sockets {
        dir: &dir,
        listening,
        settings,
        max_message_size,
    };
    loop {
        sync_sockets(&state, &sockets, &mut served).await;
        tokio::select! {
            event = events.recv() => {
                if let Err(crate::EventsError::Closed) = event {
                    break;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    for (_, (stop, task)) in served.drain() {
        let _ = stop.send(true);
        let _ = task.await;
    }
}

fn socket_path(dir: &Path, plugin: &str) -> PathBuf {
    dir.join(format!("{plugin}.sock"))
}

/// How the per-plugin sockets are served.
struct Sockets<'a> {
    dir: &'a Path,
    listening: Listening,
    settings: Arc<Settings>,
    max_message_size: usize,
}

async fn sync_sockets(
    state: &State,
    sockets: &Sockets<'_>,
    served: &mut HashMap<String, (watch::Sender<bool>, JoinHandle<()>)>,
) {
    let dir = sockets.dir;
    let loaded: HashSet<String> = state
        .manager
        .list()
        .into_iter()
        .filter(|p| p.state.in_service())
        .map(|p| p.name)
        .collect();
    let gone: Vec<String> = served
        .keys()
        .filter(|n| !loaded.contains(*n))
        .cloned()
        .collect();
    for name in gone {
        if let Some((stop, task)) = served.remove(&name) {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
    for name in loaded {
        if served.contains_key(&name) {
            continue;
        }
        let service = plugin_server::PluginServer::new(GoPlugin {
            state: Arc::clone(state),
            plugin: Some(name.clone()),
        })
        .max_decoding_message_size(sockets.max_message_size);
        // Its own stop flag: the plugin may go before the server (whose
        // shutdown `plugin_sockets` passes on).
        let (stop, stopped) = watch::channel(false);
        let listening = Listening {
            shutdown: stopped,
            ..sockets.listening.clone()
        };
        let endpoint = Endpoint::Unix(socket_path(dir, &name));
        match listening
            .serve(&endpoint, Routes::new(service).prepare(), &sockets.settings)
            .await
        {
            Ok((_, task)) => {
                served.insert(name, (stop, task));
            }
            Err(e) => tracing::warn!(plugin = %name, "goplugin socket not served: {e}"),
        }
    }
}
