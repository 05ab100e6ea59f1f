//! switchboard: distributed long-lived connections.
//!
//! Clients hold WebSocket or raw TCP connections to any node of a cluster.
//! Application code binds connections to users, puts them in groups, pushes to
//! a connection, a user, several users, a group or everyone, and asks
//! cluster-wide questions, through one cheap cloneable [`Hub`], without knowing
//! which node holds a socket.
//!
//! ```no_run
//! use switchboard::{Accept, ConnectInfo, Decision, Frame, Handler, Hub, Server, async_trait};
//! use switchboard::core::ConnId;
//!
//! struct Chat;
//!
//! #[async_trait]
//! impl Handler for Chat {
//!     async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
//!         match info.query_param("uid") {
//!             Some(uid) => Accept::new().bind(uid.as_ref()).join("lobby").into(),
//!             None => switchboard::Reject::new("uid required").into(),
//!         }
//!     }
//!     async fn on_message(&self, hub: &Hub, _conn: &ConnId, frame: Frame) {
//!         // Everyone in the lobby, on every node, gets it.
//!         let _ = hub.to_group("lobby", frame);
//!     }
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let hub = Hub::builder().handler(Chat).start().await?;
//! let ws = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
//! Server::new(hub)
//!     .websocket(ws, "/ws")
//!     .serve(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await;
//! # Ok(()) }
//! ```
//!
//! Modes: the default backplane is standalone (one process). Join several hubs
//! of one process with [`core::MemoryBus`]; other crates provide brokers.

#[cfg(test)]
mod alloc_count;
pub mod auth;
pub mod axum;
#[doc(hidden)]
pub mod bench_support;
pub mod config;
mod conn;
pub mod error;
pub mod handler;
pub mod hub;
mod outbox;
mod registry;
mod sequencer;
pub mod server;
mod stats;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;

pub use async_trait::async_trait;
pub use http;
pub use switchboard_core as core;
pub use switchboard_core::{
    Answer, ConnId, Frame, FrameKind, GroupId, History, MemoryHistory, NodeId, Position, Retention,
    Session, Standalone, Target, Totals, UserId,
};

pub use config::{Limits, MAX_NAME_LEN, RateLimit, SlowConsumer, check_name};
pub use error::{BuildError, OpError, PushError};
pub use handler::{
    Accept, CloseReason, ConnectInfo, Decision, Handler, NoopHandler, Reject, Transport,
};
pub use hub::{CloseReport, Hub, HubBuilder, PushReport, RecordedPush};
pub use server::Server;
pub use stats::{CloseKinds, DropKinds, HubStats, PerTransport, PushKinds};
pub use transport::TcpOptions;
