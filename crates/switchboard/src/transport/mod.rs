//! Transports: WebSocket (behind an HTTP upgrade) and raw TCP. Both produce the
//! same kind of connection; what a connection's user, groups and pushes are
//! does not depend on how it arrived.

pub(crate) mod http;
pub(crate) mod tcp;
pub(crate) mod ws;

pub use tcp::TcpOptions;
pub use ws::upgrade;
