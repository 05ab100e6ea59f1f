//! The GatewayWorker wire protocols, byte-exact with the PHP implementation.
//!
//! Everything here is a pure function over bytes; the register, gateway and
//! worker runtimes add the sockets. What travels where (docs/GATEWAY-PROTOCOL.md §1):
//!
//! - [`register`]: newline-terminated JSON between gateways/workers and the
//!   register.
//! - [`frame`]: GatewayProtocol frames (a 28-byte header, `ext_data`, body)
//!   on worker links and query sockets; [`cmd`] names their commands.
//! - [`query`]: the `u32` length + PHP `serialize()` replies a gateway sends on
//!   query sockets, and the JSON `ext_data` of commands that carry lists.
//! - [`php`]: PHP's `serialize`/`unserialize`, `json_encode`/`json_decode` and
//!   `array_replace_recursive`, which bodies, sessions and replies rely on.
//! - [`client_id`], [`session`], [`auth`] and [`websocket`]: the small
//!   conventions built on top (client ids, session versions and merges, link
//!   authorization bodies, the WebSocket handshake event).

pub mod auth;
pub mod client_id;
pub mod cmd;
pub mod frame;
pub mod php;
pub mod query;
pub mod register;
pub mod session;
mod stream;
pub mod websocket;

pub use client_id::ClientId;
pub use frame::{DEFAULT_MAX_FRAME_LEN, Frame, FrameDecoder, HEAD_LEN, Header, ProtocolError};
