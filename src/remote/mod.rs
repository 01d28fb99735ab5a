//! The wire to plugins that run in another process, shared by the kinds
//! that have one (`exec`: a program dynplug starts; `socket`: a server
//! already running). Feature `exec`.
//!
//! A [`Link`](link::Link) is the way to one server: its address and pooled
//! connections, for each wire: goplugin's REST (`rest.rs`) and gRPC
//! (`grpc.rs`) protocols, JSON-RPC 2.0 over HTTP (`jsonrpc.rs`) and
//! Docker's plugin protocol (`docker.rs`), the HTTP ones over `http1.rs`.
//! `payload.rs` turns a context's values into what each wire sends and a
//! reply back into values; `call.rs` makes one call bounded by the
//! context's deadline and cancel token; `runtime.rs` is the small runtime
//! that carries calls made outside one. Everything about keeping a server
//! up (starting a program, health, restarts or reconnects) belongs to the
//! kind, not here.

pub(crate) mod call;
mod docker;
mod grpc;
mod http1;
mod jsonrpc;
pub(crate) mod link;
pub(crate) mod payload;
mod rest;
pub(crate) mod runtime;

pub use payload::{REPLY_KEY, RESULT_KEY};
