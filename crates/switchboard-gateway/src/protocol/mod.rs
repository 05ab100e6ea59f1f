//! The GatewayWorker wire protocols, byte-exact with the PHP implementation.
//!
//! Everything here is a pure function over bytes; the register, gateway and
//! worker runtimes add the sockets.

pub mod cmd;
pub mod php;
