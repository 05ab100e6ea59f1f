//! The conformance suite on RabbitMQ, in both modes, with 2 and 3 nodes as
//! processes of the real binary sharing the broker on 127.0.0.1:5672 (each
//! test with an exchange and queues of its own).

#![allow(clippy::unwrap_used)]

use switchboard_test::Process;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

mod fanout_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::amqp(BIN, 2, "fanout", ""));
}

mod fanout_3 {
    use super::*;
    switchboard_test::conformance_suite!(Process::amqp(BIN, 3, "fanout", ""));
}

mod routing_2 {
    use super::*;
    switchboard_test::conformance_suite!(Process::amqp(BIN, 2, "routing", ""));
}

mod routing_3 {
    use super::*;
    switchboard_test::conformance_suite!(Process::amqp(BIN, 3, "routing", ""));
}
