//! The goplugin gRPC protocol, client side: `plugin.Plugin/Ping` and
//! `/Exec` over one HTTP/2 channel per runtime.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tonic::codegen::http::Uri;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::link::{Address, CallError, MAX_REPLY, Stream};
use crate::proto::goplugin::{ExecRequest, plugin_client::PluginClient};
use crate::proto::health::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Channels kept per process, one per runtime that called it; the oldest
/// goes past this (its runtime most likely ended).
const MAX_CHANNELS: usize = 8;

pub(crate) struct Grpc {
    address: Address,
    host: MetadataValue<tonic::metadata::Ascii>,
    clients: Mutex<Vec<(tokio::runtime::Id, PluginClient<Channel>, Channel)>>,
}

/// The connector's error: marks a failure to connect (nothing sent), as
/// opposed to a connection lost during a call.
#[derive(Debug)]
struct ConnectFailed(String);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectFailed {}

#[derive(Clone)]
struct Connector(Address);

impl tower_service::Service<Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Stream>;
    type Error = ConnectFailed;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, ConnectFailed>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let address = self.0.clone();
        Box::pin(async move {
            address
                .connect()
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(|e| ConnectFailed(format!("{address}: {e}")))
        })
    }
}

impl Grpc {
    pub(crate) fn new(address: Address, host: &Arc<str>) -> Grpc {
        Grpc {
            address,
            host: MetadataValue::try_from(&**host).unwrap_or(MetadataValue::from_static("dynplug")),
            clients: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn address(&self) -> &Address {
        &self.address
    }

    /// The client of this runtime, made (lazily connecting) on first use.
    fn client(&self) -> PluginClient<Channel> {
        self.of_runtime().0
    }

    /// This runtime's client and the channel under it.
    fn of_runtime(&self) -> (PluginClient<Channel>, Channel) {
        let runtime = Handle::current().id();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, client, channel)) = clients.iter().find(|(id, ..)| *id == runtime) {
            return (client.clone(), channel.clone());
        }
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector_lazy(Connector(self.address.clone()));
        let client = PluginClient::new(channel.clone()).max_decoding_message_size(MAX_REPLY);
        if clients.len() == MAX_CHANNELS {
            clients.remove(0);
        }
        clients.push((runtime, client.clone(), channel.clone()));
        (client, channel)
    }

    fn request<T>(&self, message: T, timeout: Option<Duration>) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert("x-host", self.host.clone());
        if let Some(timeout) = timeout {
            // `grpc-timeout`: the plugin sees the deadline.
            request.set_timeout(timeout);
        }
        request
    }

    /// goplugin's Ping; for a server without it (`UNIMPLEMENTED`), the
    /// standard `grpc.health.v1.Health/Check`, which must say `SERVING`.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), CallError> {
        let (mut client, channel) = self.of_runtime();
        let reply = match client.ping(self.request((), Some(timeout))).await {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == Code::Unimplemented => {
                return self.health(channel, timeout).await;
            }
            Err(status) => return Err(status_error(status)),
        };
        match reply.status.as_str() {
            "success" | "" => Ok(()),
            said => Err(CallError::Plugin(format!(
                "Ping answered status `{}`",
                crate::text::printable(said, 200)
            ))),
        }
    }

    /// The same channel (and connection), another service.
    async fn health(&self, channel: Channel, timeout: Duration) -> Result<(), CallError> {
        let request = self.request(HealthCheckRequest::default(), Some(timeout));
        let reply = HealthClient::new(channel)
            .check(request)
            .await
            .map_err(status_error)?
            .into_inner();
        match reply.status() {
            ServingStatus::Serving => Ok(()),
            said => Err(CallError::Plugin(format!(
                "no goplugin Ping, and grpc.health.v1 says {}",
                said.as_str_name()
            ))),
        }
    }

    pub(crate) async fn exec(
        &self,
        command: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let message = ExecRequest {
            command: command.to_owned(),
            payload: payload.to_vec(),
        };
        let reply = self
            .client()
            .exec(self.request(message, timeout))
            .await
            .map_err(status_error)?
            .into_inner();
        match reply.status.as_str() {
            // Some plugins leave Status empty on success.
            "success" | "" => Ok(reply.data.map(|d| d.response).unwrap_or_default()),
            said => Err(CallError::Plugin(format!(
                "status `{}`",
                crate::text::printable(said, 200)
            ))),
        }
    }
}

/// A status from the plugin (no source) is its answer; one made by the
/// client from a transport error (with a source) says the connection
/// failed, before anything was sent (our connector's error) or after.
fn status_error(status: Status) -> CallError {
    let message = crate::text::printable(status.message(), 1024).into_owned();
    let mut source = std::error::Error::source(&status);
    if source.is_some() {
        while let Some(error) = source {
            if let Some(failed) = error.downcast_ref::<ConnectFailed>() {
                return CallError::Connect(failed.0.clone());
            }
            // The client's own timer (the call's deadline, given to
            // tonic as its timeout) can fire before the caller's.
            if error.is::<tonic::TimeoutExpired>() {
                return CallError::Deadline;
            }
            source = error.source();
        }
        return match status.code() {
            Code::DeadlineExceeded => CallError::Deadline,
            // Our own cancellations drop the call and make no status: a
            // transport's "cancelled" is a stream reset by a server that
            // went away (seen when a plugin is killed mid-call).
            Code::Cancelled | Code::Unavailable | Code::Unknown => CallError::Lost(message),
            _ => CallError::BadReply(message),
        };
    }
    match status.code() {
        Code::DeadlineExceeded => CallError::Deadline,
        Code::Cancelled => CallError::Cancelled,
        Code::Unavailable => CallError::Unavailable(message),
        Code::ResourceExhausted if message.contains("message length too large") => {
            CallError::BadReply(message)
        }
        code => CallError::Plugin(format!("{code:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_own_timeout_is_the_deadline_not_a_lost_connection() {
        let status = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(matches!(status_error(status), CallError::Deadline));
    }

    #[test]
    fn a_plugins_statuses_are_its_answers() {
        assert!(matches!(
            status_error(Status::deadline_exceeded("late")),
            CallError::Deadline
        ));
        assert!(matches!(
            status_error(Status::unavailable("down")),
            CallError::Unavailable(_)
        ));
        assert!(matches!(
            status_error(Status::invalid_argument("no")),
            CallError::Plugin(m) if m.contains("InvalidArgument")
        ));
    }
}
