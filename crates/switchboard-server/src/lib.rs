//! The `switchboard` binary's library: the reference application, its
//! configuration, and starting a node. Tests and benchmarks start nodes through
//! [`node::launch`] exactly as the binary does.

pub mod api;
pub mod app;
pub mod bench;
pub mod config;
pub mod console;
pub mod demo;
pub mod events;
pub mod history;
pub mod metrics;
pub mod node;
pub mod roles;
pub mod security;
pub mod token;

pub use app::ReferenceApp;
pub use config::{ClusterUrl, ServeArgs, ServeConfig};
