//! Application events: accept or reject a connection, handle its messages,
//! learn why it closed.
//!
//! Handlers receive the [`Hub`] and a [`ConnId`], never a socket: the same
//! application code runs whether the connection is on this node, another node,
//! or a gateway process.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use switchboard_core::{ConnId, Frame, GroupId, NodeId, Position, Session, UserId};

use crate::hub::Hub;

/// The transport a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// WebSocket (RFC 6455).
    WebSocket,
    /// Raw TCP with line or length-prefixed framing.
    Tcp,
}

/// What is known about a connection when it asks to be accepted.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// The id the connection will have if accepted.
    pub conn: ConnId,
    /// How it connected.
    pub transport: Transport,
    /// The client's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// The request path (WebSocket), empty for TCP.
    pub path: String,
    /// The raw query string (WebSocket), empty for TCP.
    pub query: String,
    /// The HTTP request headers (WebSocket), empty for TCP.
    pub headers: http::HeaderMap,
    /// The first frame, for TCP listeners configured to expect a hello.
    pub hello: Option<Frame>,
}

impl ConnectInfo {
    /// What is known of a connection that arrived elsewhere (a gateway), for
    /// [`Hub::handle_connect`]: set the other fields as known.
    pub fn new(conn: ConnId, transport: Transport) -> Self {
        Self {
            conn,
            transport,
            peer: None,
            path: String::new(),
            query: String::new(),
            headers: http::HeaderMap::new(),
            hello: None,
        }
    }

    /// The first value of a query-string parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<Cow<'_, str>> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Every value of a repeated query-string parameter, percent-decoded, in
    /// order.
    pub fn query_params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        form_urlencoded::parse(self.query.as_bytes())
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Accepting a connection, with what to do as it opens. The bindings and the
/// greeting take effect before the connection is visible to any push, so the
/// greeting is always its first frame.
#[derive(Debug, Default)]
#[must_use]
pub struct Accept {
    pub(crate) user: Option<UserId>,
    pub(crate) groups: Vec<GroupId>,
    pub(crate) session: Session,
    pub(crate) greeting: Vec<Frame>,
    /// Streams to recover, and the position the client has of each.
    pub(crate) recover: Vec<(String, Position)>,
}

impl Accept {
    /// Accept with nothing else.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind the connection to a user.
    pub fn bind(mut self, user: impl Into<UserId>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Join a group.
    pub fn join(mut self, group: impl Into<GroupId>) -> Self {
        self.groups.push(group.into());
        self
    }

    /// Start with a session.
    pub fn session(mut self, session: Session) -> Self {
        self.session = session;
        self
    }

    /// Send this frame first.
    pub fn greet(mut self, frame: Frame) -> Self {
        self.greeting.push(frame);
        self
    }

    /// Recover `stream` from `pos`: after its greeting the connection gets
    /// every entry of the stream after `pos`, then
    /// `{"op":"recovered","stream":...,"recovered":true}` (or `false`, with no
    /// entry, when the history no longer covers `pos`), then its live frames,
    /// with nothing missed or repeated in between. The application decides
    /// whether the client may read the stream; a connection should be bound
    /// to the user, or a member of the group, whose stream it recovers, or it
    /// gets no live entries after the replay.
    pub fn recover(mut self, stream: impl Into<String>, pos: Position) -> Self {
        self.recover.push((stream.into(), pos));
        self
    }

    /// The user to bind, if any.
    pub fn user(&self) -> Option<&UserId> {
        self.user.as_ref()
    }

    /// The groups to join.
    pub fn groups(&self) -> &[GroupId] {
        &self.groups
    }

    /// The initial session.
    pub fn initial_session(&self) -> &Session {
        &self.session
    }

    /// The frames sent first.
    pub fn greeting(&self) -> &[Frame] {
        &self.greeting
    }
}

/// Refusing a connection.
#[derive(Debug, Clone)]
#[must_use]
pub struct Reject {
    pub(crate) status: http::StatusCode,
    pub(crate) reason: String,
    pub(crate) reply: Option<Frame>,
}

impl Reject {
    /// Refuse with a reason: HTTP 403 on WebSocket; on TCP the connection is closed.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            status: http::StatusCode::FORBIDDEN,
            reason: reason.into(),
            reply: None,
        }
    }

    /// The HTTP status for a WebSocket upgrade (default 403).
    pub fn status(mut self, status: http::StatusCode) -> Self {
        self.status = status;
        self
    }

    /// A frame written to a TCP client before closing.
    pub fn reply(mut self, frame: Frame) -> Self {
        self.reply = Some(frame);
        self
    }

    /// The HTTP status of the refusal.
    pub fn http_status(&self) -> http::StatusCode {
        self.status
    }

    /// Why the connection was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The frame written before closing, if any.
    pub fn reply_frame(&self) -> Option<&Frame> {
        self.reply.as_ref()
    }
}

/// The outcome of [`Handler::on_connect`].
#[derive(Debug)]
pub enum Decision {
    /// Accept.
    Accept(Accept),
    /// Refuse.
    Reject(Reject),
}

impl From<Accept> for Decision {
    fn from(a: Accept) -> Self {
        Decision::Accept(a)
    }
}

impl From<Reject> for Decision {
    fn from(r: Reject) -> Self {
        Decision::Reject(r)
    }
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client closed (WebSocket close frame with its code, or TCP end of stream).
    Client {
        /// The client's close code, if it sent one.
        code: Option<u16>,
        /// The client's reason text.
        reason: String,
    },
    /// The application closed it ([`Hub::close`]).
    Kicked(String),
    /// Its outbound queue overflowed or a write stalled.
    SlowConsumer,
    /// It sent nothing for longer than the idle timeout.
    IdleTimeout,
    /// It sent a message larger than the maximum.
    TooBig,
    /// It sent a WebSocket text frame that is not UTF-8.
    InvalidUtf8,
    /// It broke the protocol (bad framing, bad WebSocket frame).
    Protocol(String),
    /// It broke a policy of the server's: kept sending over its rate limit.
    Policy(String),
    /// The socket failed.
    Io(String),
    /// The server is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The WebSocket close code this reason is sent with.
    pub fn ws_code(&self) -> u16 {
        match self {
            CloseReason::Client { code, .. } => code.unwrap_or(1000),
            CloseReason::Kicked(_) | CloseReason::IdleTimeout => 1000,
            CloseReason::Shutdown => 1001,
            CloseReason::Protocol(_) => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::SlowConsumer | CloseReason::Policy(_) => 1008,
            CloseReason::TooBig => 1009,
            CloseReason::Io(_) => 1011,
        }
    }

    /// Whether the server should still try to flush queued frames before
    /// closing. A client closed for a policy gets the answers to what it sent
    /// before (its refusals among them), so that it can tell what was handled.
    pub(crate) fn flush_first(&self) -> bool {
        matches!(
            self,
            CloseReason::Kicked(_) | CloseReason::Shutdown | CloseReason::Policy(_)
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Client {
                code: Some(c),
                reason,
            } => write!(f, "client closed ({c} {reason})"),
            CloseReason::Client { code: None, .. } => f.write_str("client closed"),
            CloseReason::Kicked(r) => write!(f, "closed by the application: {r}"),
            CloseReason::SlowConsumer => f.write_str("slow consumer"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::TooBig => f.write_str("message too big"),
            CloseReason::InvalidUtf8 => f.write_str("invalid UTF-8"),
            CloseReason::Protocol(r) => write!(f, "protocol error: {r}"),
            CloseReason::Policy(r) => write!(f, "policy violation: {r}"),
            CloseReason::Io(r) => write!(f, "i/o error: {r}"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
        }
    }
}

/// The application. Every method has a default, so an application implements
/// only what it uses.
///
/// A connection's messages are handled one at a time, in order: the next
/// message of the same connection is read after `on_message` returns.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// A client asks to connect. Default: accept with nothing bound.
    async fn on_connect(&self, hub: &Hub, info: &ConnectInfo) -> Decision {
        let _ = (hub, info);
        Accept::new().into()
    }

    /// A connection sent a frame.
    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        let _ = (hub, conn, frame);
    }

    /// A connection sent a message over its rate limit
    /// ([`Limits::message_rate`](crate::Limits::message_rate)); the message
    /// was not handled. Default: nothing (tell the client, for example).
    async fn on_rate_limited(&self, hub: &Hub, conn: &ConnId) {
        let _ = (hub, conn);
    }

    /// A last frame for a client the server closes, on a transport with no
    /// close frame of its own (TCP; WebSocket clients get a close code and
    /// reason): say why, in the application's own protocol. Not asked when
    /// the client closed or the socket failed. Default: none.
    fn close_notice(&self, hub: &Hub, reason: &CloseReason) -> Option<Frame> {
        let _ = (hub, reason);
        None
    }

    /// A connection closed. Its bindings are already gone.
    async fn on_close(&self, hub: &Hub, conn: &ConnId, reason: &CloseReason) {
        let _ = (hub, conn, reason);
    }

    /// A message another node's application sent with [`Hub::send_to_peers`]
    /// or [`Hub::send_to_node`]. Called on the node's dispatcher, between
    /// envelopes from the cluster: hand the work off, never wait here.
    fn on_peer_message(&self, hub: &Hub, from: &NodeId, data: Bytes) {
        let _ = (hub, from, data);
    }
}

/// A handler that accepts everyone and ignores messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopHandler;

#[async_trait]
impl Handler for NoopHandler {}
