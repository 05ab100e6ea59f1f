//! The conformance suite against the in-process modes: one standalone node,
//! and three nodes joined by the in-memory bus.

#![allow(clippy::unwrap_used)]

mod local {
    use switchboard_test::{InProcess, Mode};
    switchboard_test::conformance_suite!(InProcess::boxed(Mode::Local));
}

mod memory {
    use switchboard_test::{InProcess, Mode};
    switchboard_test::conformance_suite!(InProcess::boxed(Mode::Memory(3)));
}
