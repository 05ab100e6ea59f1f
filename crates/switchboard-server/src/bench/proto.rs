//! Messages between the bench coordinator and its worker processes (JSON lines
//! over the workers' stdin and stdout).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::client::Endpoint;

/// A benchmark scenario (see `docs/BENCHMARK-TARGETS.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N members of one group, spread over the nodes; M pushes to the group.
    Fanout,
    /// N sender→receiver pairs on different nodes; M pushes per pair to the receiver's user.
    P2p,
    /// N idle connections: server memory per connection.
    Idle,
    /// N connections opened, each until its welcome: server CPU per connection.
    Connect,
    /// No server: the kernel's CPU per small write to N loopback sockets, the
    /// floor under CPU per delivery on this machine.
    Floor,
    /// No server: the CPU of an event loop woken for each message, reading it
    /// from one socket and writing it to another, at --rate messages/s in all;
    /// the floor under each process a sparse message passes through.
    Relay,
    /// No server: the CPU of an event loop accepting N connections (at most
    /// --in-flight at once), each answered with a canned 101 and welcome; the
    /// floor under CPU per connection.
    Accept,
}

/// What one worker opens and does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The scenario.
    pub scenario: Scenario,
    /// Unique per run: prefixes user ids and the group.
    pub run: String,
    /// First global index of this worker's clients (or pairs).
    pub first: usize,
    /// How many clients (or pairs).
    pub count: usize,
    /// The nodes to spread clients over.
    pub nodes: Vec<Endpoint>,
    /// Source addresses to spread sockets over.
    pub sources: Vec<IpAddr>,
    /// Connections being opened at once by this worker.
    pub in_flight: usize,
    /// Messages per group (fanout) or per pair (p2p).
    pub messages: u64,
    /// p2p: messages per second per sender (0: at once).
    pub sender_rate: f64,
    /// Payload size in bytes.
    pub size: usize,
    /// Connect with tokens signed by this HS256 secret instead of `?uid=`.
    #[serde(default)]
    pub jwt_secret: Option<String>,
}

/// Coordinator → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Open the clients of `spec`.
    Open {
        /// What to open.
        spec: Spec,
    },
    /// p2p: start sending.
    Go,
    /// Report once every expected message arrived, or nothing arrived for `quiet_ms`.
    Finish {
        /// Milliseconds without progress after which to give up waiting.
        quiet_ms: u64,
    },
}

/// Worker → coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Ev {
    /// Every client is open (or failed).
    Ready {
        opened: u64,
        failed: u64,
        first_error: Option<String>,
        /// Serialized histogram of connect times (µs), in a file.
        connect_hist: String,
    },
    /// Messages received so far.
    Progress { received: u64 },
    /// The final counts.
    Result {
        sent: u64,
        received: u64,
        duplicates: u64,
        expected: u64,
        /// Serialized histogram of latencies (µs), in a file.
        hist: String,
        first_ns: u64,
        last_ns: u64,
        /// Connections the server closed during the run.
        closed: u64,
    },
}
