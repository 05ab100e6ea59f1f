//! The conformance suite on a Redis Cluster (3 masters with a replica each,
//! started for each test), in both modes, with two nodes as processes of the
//! real binary.

#![allow(clippy::unwrap_used)]

use switchboard_test::Process;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

mod pubsub_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis_cluster(BIN, 2, "pubsub", ""));
}

mod queue_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis_cluster(BIN, 2, "queue", ""));
}
