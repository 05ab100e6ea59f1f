//! GatewayWorker interoperability for switchboard.
//!
//! [GatewayWorker](https://github.com/walkor/GatewayWorker) clusters are made of
//! a register, gateways holding the client connections, and business workers
//! running the application. [`protocol`] speaks their three wire protocols as
//! pure functions over bytes, with no sockets: the register's JSON lines, the
//! 28-byte-header frames between gateways and workers, and the length-prefixed
//! PHP `serialize()` replies to queries.
//!
//! Around it, the roles, each a thin async shell: [`register`] (where the
//! others meet), [`Gateway`] (a node holding client sockets, forwarding their
//! events to workers), [`Worker`] (runs the application's
//! [`Handler`](switchboard::Handler) through an ordinary
//! [`Hub`](switchboard::Hub)), and [`Pusher`] (pushes and queries from any
//! process). Switchboard processes also speak a few extensions ([`ext`]) to
//! each other; PHP processes see only GatewayWorker's protocol.
//!
//! ```
//! use bytes::BytesMut;
//! use switchboard_gateway::protocol::{cmd, php, ClientId, Frame, FrameDecoder};
//! use tokio_util::codec::Decoder;
//!
//! // A worker asks a gateway to send "hi" to the client on connection 7.
//! let frame = Frame::to_gateway(cmd::SEND_TO_ONE, 7, "", "hi");
//! let mut wire = BytesMut::new();
//! frame.encode(&mut wire);
//!
//! // The gateway decodes it, however the bytes were split by TCP.
//! let got = FrameDecoder::default().decode(&mut wire)?.expect("one whole frame");
//! assert_eq!(got, frame);
//! assert_eq!(got.body_value()?, php::Value::from("hi"));
//!
//! // Client ids name a connection on a gateway, as PHP prints them.
//! let id: ClientId = "7f000001326400000001".parse()?;
//! assert_eq!(id.address(), "127.0.0.1:12900");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod ext;
pub mod gateway;
pub mod protocol;
pub mod register;
mod register_link;
mod session;
pub mod worker;

pub use client::{PushError, Pusher};

/// Locks a mutex whose critical sections never panic midway, so a poisoned
/// lock is still consistent.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node id of a gateway the register advertises as `a.b.c.d:port`.
pub(crate) fn gateway_node(address: &str) -> Option<switchboard::core::NodeId> {
    match address.parse::<std::net::SocketAddr>().ok()? {
        std::net::SocketAddr::V4(a) => Some(switchboard::core::NodeId::gateway(*a.ip(), a.port())),
        std::net::SocketAddr::V6(_) => None,
    }
}
pub use gateway::{Gateway, GatewayConfig, GatewayStats};
pub use worker::{Worker, WorkerConfig, WorkerStats};
