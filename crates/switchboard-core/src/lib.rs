//! The vocabulary of switchboard, with no sockets in it.
//!
//! - [`id`]: node, connection, user and group ids; [`ConnId`] routes without a lookup.
//! - [`frame`]: text and binary frames over shared [`bytes::Bytes`].
//! - [`target`]: who a push reaches.
//! - [`query`]: cluster-wide questions and how per-node answers combine.
//! - [`envelope`]: the compact binary messages between nodes.
//! - [`history`]: recorded pushes, their positions, and where they are kept.
//! - [`framing`]: line and length-prefixed framing for raw TCP.
//! - [`backplane`]: the cluster seam every mode implements; [`memory`] is the
//!   in-process implementation.
//! - [`relay`] and [`peers`]: the message format and the liveness protocol of
//!   the backplanes that relay through a message broker (RabbitMQ, NATS).

pub mod backplane;
pub mod bundle;
pub mod envelope;
pub mod frame;
pub mod framing;
pub mod history;
pub mod id;
pub mod memory;
pub mod peers;
pub mod query;
pub mod relay;
pub mod target;

pub use backplane::{
    Backplane, Dest, Handoff, JoinContext, LocalView, MembershipChange, Standalone, Status,
};
pub use envelope::{Body, Envelope, Op, OpResult, Session};
pub use frame::{Frame, FrameKind, Payload};
pub use framing::Framing;
pub use history::{Entry, History, HistoryError, MemoryHistory, Position, Retention, Since};
pub use id::{ConnId, GroupId, NodeId, UserId};
pub use memory::MemoryBus;
pub use query::{Answer, LocalAnswer, Query, Totals};
pub use target::Target;
