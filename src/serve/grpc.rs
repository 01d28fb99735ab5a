//! The gRPC façade: `dynplug.v1.Plugins` and the goplugin `plugin.Plugin`
//! service, on TCP and Unix sockets. Errors become `Status` here and only here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::State;
use super::conn::Limits;
use super::goplugin::GoPlugin;
use super::grpc_request::{authorize, caller, check_value_count, executor, timeout};
use super::proto::goplugin::plugin_server;
use super::proto::v1::{self, plugins_server, value::Kind};
use crate::error::Result;
use crate::{Context, Error, PluginState, Value};

/// `dynplug.v1.Plugins` and the goplugin service, served by `conn` like
/// the HTTP façade (so with the same limits, TLS and idle rule).
pub(crate) fn routes(state: &State, limits: &Limits) -> Routes {
    let plugins = plugins_server::PluginsServer::new(Plugins(Arc::clone(state)))
        .max_decoding_message_size(limits.grpc_max_message_size);
    let goplugin = plugin_server::PluginServer::new(GoPlugin {
        state: Arc::clone(state),
        plugin: None,
    })
    .max_decoding_message_size(limits.grpc_max_message_size);
    Routes::new(plugins).add_service(goplugin).prepare()
}

/// The one place errors become gRPC statuses.
impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let message = error.to_string();
        match error {
            Error::NotFound { .. } => Status::not_found(message),
            Error::Unauthenticated { .. } => Status::unauthenticated(message),
            Error::Forbidden { .. } => Status::permission_denied(message),
            Error::Unavailable { .. } | Error::Overloaded { .. } => Status::unavailable(message),
            Error::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            Error::Cancelled { .. } => Status::cancelled(message),
            Error::Downgrade { .. } | Error::RouteConflict { .. } => {
                Status::failed_precondition(message)
            }
            Error::NameTaken { .. } => Status::already_exists(message),
            Error::Plugin {
                code: Some(-32601), ..
            } => Status::unimplemented(message),
            Error::Plugin {
                code: Some(-32700 | -32600 | -32602),
                ..
            } => Status::invalid_argument(message),
            _ => Status::internal(message),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::LifecycleEvent, Status>> + Send>>;

struct Plugins(State);

#[tonic::async_trait]
impl plugins_server::Plugins for Plugins {
    async fn ping(
        &self,
        request: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        authorize(&self.0, &request, &request.get_ref().plugin)?;
        let name = request.into_inner().plugin;
        let info = self.0.manager.info(&name).ok_or_else(|| Error::NotFound {
            plugin: name.clone(),
        })?;
        if !matches!(info.state, PluginState::Loaded | PluginState::Deferred) {
            return Err(Status::unavailable(format!(
                "{name}: {}{}",
                info.state.as_str(),
                info.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        Ok(Response::new(v1::PingResponse {
            plugin: name,
            version: info.version.unwrap_or_default(),
            state: info.state.as_str().to_owned(),
        }))
    }

    async fn exec(
        &self,
        request: Request<v1::ExecRequest>,
    ) -> Result<Response<v1::ExecResponse>, Status> {
        authorize(&self.0, &request, &request.get_ref().plugin)?;
        let deadline = timeout(&self.0, request.metadata(), request.get_ref().timeout_ms);
        let request = request.into_inner();
        check_value_count(request.values.len())?;
        let callee = self.0.routes.load().callee(&request.plugin);
        let executor = match &callee {
            Some(callee) => callee.executor.clone(),
            None => executor(&self.0, &request.plugin)?,
        };
        let mut ctx = Context::with_capacity(request.label, request.values.len() + 2);
        for (key, value) in request.values {
            ctx.set(key, from_proto(value));
        }
        super::call(
            &self.0,
            &executor,
            callee.as_ref().map(|c| &*c.latency),
            &mut ctx,
            deadline,
            super::Facade::Grpc,
        )
        .await?;
        // The values the plugin set; the caller knows what it sent.
        let values = ctx
            .into_written()
            .map(|(k, v)| (k.into_string(), to_proto_owned(v)))
            .collect();
        Ok(Response::new(v1::ExecResponse { values }))
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        // Any client may list and watch: names and states, no plugin data.
        caller(&self.0, &request)?;
        let plugins = self
            .0
            .manager
            .list()
            .into_iter()
            .map(|p| v1::PluginInfo {
                name: p.name,
                version: p.version.unwrap_or_default(),
                mode: p.mode.unwrap_or_default(),
                isolation: p
                    .isolation
                    .map(|i| i.as_str().to_owned())
                    .unwrap_or_default(),
                state: p.state.as_str().to_owned(),
                error: p.error.unwrap_or_default(),
                upgrades: p.upgrades,
                unloads: p.unloads,
                interfaces: p.socket.map(|s| s.interfaces).unwrap_or_default(),
                capabilities: p.capabilities,
            })
            .collect();
        Ok(Response::new(v1::ListResponse { plugins }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        caller(&self.0, &request)?;
        let events = BroadcastStream::new(self.0.manager.subscribe().into_inner())
            .filter_map(Result::ok)
            .map(Some);
        // End at shutdown, or graceful shutdown would wait for the client.
        let stop = WatchStream::new(self.0.shutdown.clone())
            .filter(|stop| *stop)
            .map(|_| None);
        let stream = events.merge(stop).take_while(Option::is_some).map(|event| {
            let event = event.unwrap_or_else(|| unreachable!("take_while stops before None"));
            let json = serde_json::to_value(&event).unwrap_or_default();
            Ok(v1::LifecycleEvent {
                event: json["event"].as_str().unwrap_or_default().to_owned(),
                plugin: event.plugin().unwrap_or_default().to_owned(),
                json: json.to_string(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Wire value → context value.
pub fn from_proto(value: v1::Value) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::IntValue(i)) => Value::Int(i),
        Some(Kind::FloatValue(f)) => Value::Float(f),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BytesValue(b)) => Value::Bytes(b),
        Some(Kind::ListValue(l)) => Value::List(l.items.into_iter().map(from_proto).collect()),
        Some(Kind::MapValue(m)) => Value::Map(
            m.entries
                .into_iter()
                .map(|(k, v)| (k, from_proto(v)))
                .collect(),
        ),
    }
}

/// Context value → wire value, moving strings and bytes rather than copying.
fn to_proto_owned(value: Value) -> v1::Value {
    let kind = match value {
        Value::String(s) => Kind::StringValue(s),
        Value::Bytes(b) => Kind::BytesValue(b),
        Value::List(items) => Kind::ListValue(v1::ValueList {
            items: items.into_iter().map(to_proto_owned).collect(),
        }),
        Value::Map(entries) => Kind::MapValue(v1::ValueMap {
            entries: entries
                .into_iter()
                .map(|(k, v)| (k, to_proto_owned(v)))
                .collect::<HashMap<_, _>>(),
        }),
        other => return to_proto(&other),
    };
    v1::Value { kind: Some(kind) }
}

/// Context value → wire value.
pub fn to_proto(value: &Value) -> v1::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(true),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Int(i) => Kind::IntValue(*i),
        Value::Float(f) => Kind::FloatValue(*f),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Bytes(b) => Kind::BytesValue(b.clone()),
        Value::List(items) => Kind::ListValue(v1::ValueList {
            items: items.iter().map(to_proto).collect(),
        }),
        Value::Map(entries) => Kind::MapValue(v1::ValueMap {
            entries: entries
                .iter()
                .map(|(k, v)| (k.clone(), to_proto(v)))
                .collect::<HashMap<_, _>>(),
        }),
    };
    v1::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_protobuf() {
        let value =
            Value::from(serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {"c": "d"}}));
        assert_eq!(from_proto(to_proto(&value)), value);
        assert_eq!(
            from_proto(to_proto(&Value::Bytes(vec![0, 1]))),
            Value::Bytes(vec![0, 1])
        );
    }
}
