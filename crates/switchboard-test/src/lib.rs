//! The one test harness of switchboard.
//!
//! - [`cluster`]: start a cluster of reference-app nodes in a given mode
//!   (in-process, or as processes of the real binary) behind one [`Cluster`] trait.
//! - [`client`]: WebSocket and TCP clients speaking `docs/CLIENT-PROTOCOL.md`.
//! - [`http`]: a small HTTP client for the nodes' plain endpoints.
//! - [`browser`]: headless Chromium through chromedriver, for the web pages.
//! - [`conformance`]: the checks every mode must pass, and the
//!   [`conformance_suite!`] macro that turns them into tests for one mode.
//! - [`probe`]: an honest client's round trips while others misbehave.
//! - [`programs`]: the example backends in `examples/` and their interpreters.
//! - [`hub_api`]: the Hub API checks across two sides of a cluster, and the
//!   [`hub_api_suite!`] macro that turns them into tests for one mode.
//! - [`broker_clusters`]: private broker clusters whose members a test kills
//!   and restarts: a Redis Cluster (three masters with a replica each) and
//!   NATS servers with JetStream.
//! - [`netns`]: a network namespace whose link to the brokers a test cuts or
//!   degrades while a node inside keeps its clients.

#![allow(missing_docs, unreachable_pub, clippy::unwrap_used)]

pub mod broker_clusters;
pub mod browser;
pub mod client;
pub mod cluster;
pub mod conformance;
pub mod faults;
pub mod gateway;
pub mod http;
pub mod hub_api;
pub mod netns;
pub mod probe;
pub mod programs;
pub mod services;

pub use client::{Client, Kind};
pub use cluster::{Cluster, InProcess, Mode, Process};

/// How long any single expected event may take before a test fails.
pub const STEP: std::time::Duration = std::time::Duration::from_secs(10);
