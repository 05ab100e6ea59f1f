//! Errors of hub operations.

use switchboard_core::frame::NotUtf8;
use switchboard_core::{ConnId, HistoryError, NodeId};

/// A push could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The payload is not UTF-8 but the frame kind is text.
    #[error(transparent)]
    NotUtf8(#[from] NotUtf8),
    /// A recorded push must name users or groups: their streams are what is
    /// recorded. Connections and "everyone" have no stream.
    #[error("only pushes to users or groups can be recorded")]
    NotRecordable,
    /// A recorded push on a hub with no history store.
    #[error("this node keeps no history")]
    NoHistory,
    /// The history store failed: the push was not made.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// An operation on a connection (membership, session) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// No such connection (it closed, or never existed).
    #[error("no connection {0}")]
    NoSuchConn(ConnId),
    /// The node holding the connection could not be reached.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
    /// The node holding the connection did not answer in time.
    #[error("node {0} did not answer in time")]
    Timeout(NodeId),
    /// The operation breaks a limit or a rule: a connection already in as many
    /// groups as it may be, a name that is empty, too long or has control
    /// characters. The reason is meant for the client.
    #[error("{0}")]
    Refused(String),
    /// The node answered with an error.
    #[error("node {node} failed the operation: {reason}")]
    Remote {
        /// The node.
        node: NodeId,
        /// Its reason.
        reason: String,
    },
}

/// A hub could not be built or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The backplane refused to join.
    #[error("cannot join the cluster")]
    Join(#[from] switchboard_core::backplane::JoinError),
}
