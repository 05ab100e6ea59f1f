//! The conformance suite on NATS, as processes of the real binary sharing
//! the NATS on 127.0.0.1:4222 (each test under a subject prefix of its own).

#![allow(clippy::unwrap_used)]

use switchboard_test::Process;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

mod core_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::nats(BIN, 2, "core", ""));
}

mod core_3 {
    use super::*;
    switchboard_test::conformance_suite!(Process::nats(BIN, 3, "core", ""));
}

mod jetstream_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::nats(BIN, 2, "jetstream", ""));
}
