//! The conformance suite on Redis, in both modes, with 2 and 3 nodes as
//! processes of the real binary sharing the Redis on 127.0.0.1:6379 (each test
//! under its own prefix).

#![allow(clippy::unwrap_used)]

use switchboard_test::Process;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

mod pubsub_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis(BIN, 2, "pubsub", ""));
}

mod pubsub_3 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis(BIN, 3, "pubsub", ""));
}

mod queue_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis(BIN, 2, "queue", ""));
}

mod queue_3 {
    use super::*;
    switchboard_test::conformance_suite!(Process::redis(BIN, 3, "queue", ""));
}
