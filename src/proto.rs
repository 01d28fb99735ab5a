//! Code generated from `proto/*.proto` by `build.rs`; published as
//! `dynplug::serve::proto`.

/// `plugin`: the goplugin `Plugin` service. Its client calls exec plugins
/// that speak gRPC; with the `server` feature, dynplug also serves it.
#[allow(missing_docs, clippy::all)]
pub mod goplugin {
    tonic::include_proto!("plugin");
}

/// `grpc.health.v1`: the standard health service, asked when a gRPC plugin
/// has no goplugin Ping.
#[allow(missing_docs, clippy::all)]
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// `dynplug.v1`: the `Plugins` service.
#[cfg(feature = "server")]
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("dynplug.v1");
}

/// `plugins`: the `PluginRegistry` service plugins register with.
#[cfg(feature = "server")]
#[allow(missing_docs, clippy::all)]
pub mod registry {
    tonic::include_proto!("plugins");
}
