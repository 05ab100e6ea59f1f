//! Limits and timeouts of a hub and its connections, with their defaults.

use std::time::Duration;

use bytes::Bytes;

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowConsumer {
    /// Close the connection (code 1008 on WebSocket). Its peers are unaffected
    /// and nothing is silently lost: the client sees the close and can resync.
    #[default]
    Close,
    /// Drop the new frame and keep the connection. Counted in
    /// [`HubStats::frames_dropped`](crate::HubStats).
    DropNewest,
}

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Largest inbound message, in bytes. Larger: WebSocket close 1009, TCP close.
    pub max_message_size: usize,
    /// Frames a connection's outbound queue holds before [`SlowConsumer`] applies.
    pub outbox_frames: usize,
    /// Bytes a connection's outbound queue holds before [`SlowConsumer`] applies.
    pub outbox_bytes: usize,
    /// What to do with a connection whose outbound queue is full.
    pub slow_consumer: SlowConsumer,
    /// A write that makes no progress for this long closes the connection as slow.
    pub write_timeout: Duration,
    /// Time allowed from TCP accept to an accepted connection (HTTP upgrade, or
    /// the first frame of a TCP connection that expects a hello).
    pub handshake_timeout: Duration,
    /// How often WebSocket connections are pinged (and TCP connections sent
    /// [`Limits::tcp_ping`]); also how often idleness is checked.
    pub heartbeat: Duration,
    /// A WebSocket connection that sends nothing (pongs count) for this long is closed.
    pub ws_idle_timeout: Option<Duration>,
    /// A TCP connection that sends nothing for this long is closed. Off by
    /// default: raw TCP clients have no standard ping; TCP keepalive catches dead peers.
    pub tcp_idle_timeout: Option<Duration>,
    /// Bytes sent as one frame to TCP clients every heartbeat, if set.
    pub tcp_ping: Option<Bytes>,
    /// Time given to a closing connection to flush and finish its close handshake.
    pub close_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            outbox_frames: 1024,
            outbox_bytes: 4 * 1024 * 1024,
            slow_consumer: SlowConsumer::Close,
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(25),
            ws_idle_timeout: Some(Duration::from_secs(60)),
            tcp_idle_timeout: None,
            tcp_ping: None,
            close_timeout: Duration::from_secs(2),
        }
    }
}
