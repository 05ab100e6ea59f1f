//! GatewayWorker interoperability for switchboard.
//!
//! [GatewayWorker](https://github.com/walkor/GatewayWorker) clusters are made of
//! a register, gateways holding the client connections, and business workers
//! running the application. [`protocol`] speaks their three wire protocols as
//! pure functions over bytes, with no sockets.

pub mod protocol;
