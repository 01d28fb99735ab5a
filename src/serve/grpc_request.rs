//! What both gRPC services (`dynplug.v1.Plugins`, goplugin's `plugin.Plugin`)
//! do with a request before calling a plugin: who calls, which plugin, the
//! deadline, how many values.

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::auth::{self, Known};
use super::conn::Peer;
use super::{Shared, State};
use crate::Executor;

/// Metadata key selecting the plugin for the goplugin service.
pub const PLUGIN_METADATA: &str = "x-dynplug-plugin";

/// Who calls, from `authorization: Bearer <token>` metadata or the
/// connection's client certificate; `None` when no client is configured.
pub(crate) fn caller<'a, T>(
    state: &'a Shared,
    request: &Request<T>,
) -> Result<Option<&'a Known>, Status> {
    if !state.clients.enabled() {
        // Nobody to tell apart: no header lookup per call.
        return Ok(None);
    }
    let bearer = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    let peer = request.extensions().get::<Peer>();
    Ok(state.clients.identify(bearer, peer)?)
}

/// Refuses a call to `plugin` by a caller who may not make it.
pub(crate) fn authorize<T>(
    state: &Shared,
    request: &Request<T>,
    plugin: &str,
) -> Result<(), Status> {
    if let Some(client) = caller(state, request)? {
        client.may_call(plugin)?;
    }
    Ok(())
}

pub(crate) fn executor(state: &State, plugin: &str) -> Result<Executor, Status> {
    Ok(state.manager.get_plugin(plugin)?.1)
}

/// The call's deadline: the request's, the client's `grpc-timeout`, or the
/// server's, whichever is shortest: a client may shorten the server's
/// timeout, never lengthen it (nor lift it).
pub(crate) fn timeout(state: &State, metadata: &MetadataMap, timeout_ms: u64) -> Duration {
    let asked = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    let header = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    [asked, header, Some(state.timeout)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(state.timeout)
}

/// `grpc-timeout` is digits and a unit: H, M, S, m, u, n.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    // The spec allows at most 8 digits; more is refused, not trusted.
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Most values a client may put in one call: client-chosen keys go into a
/// fast (not flood-resistant) hash map, so their number is bounded.
const MAX_VALUES: usize = 1024;

pub(crate) fn check_value_count(count: usize) -> Result<(), Status> {
    if count > MAX_VALUES {
        return Err(Status::invalid_argument(format!(
            "{count} values in one call; at most {MAX_VALUES}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("18446744073709551615S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
