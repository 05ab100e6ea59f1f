//! RabbitMQ's routing keys. What the messages under them carry is the
//! broker-neutral relay format of `switchboard_core::relay`.

use crate::config::Mode;

pub(crate) use switchboard_core::relay::{
    Control, Copy, Message, Seen, Sequences, Tracker, bundle, bundle_message, decode,
    envelope_message,
};

/// Longest routing key the broker accepts.
const MAX_KEY: usize = 255;

/// The routing key of everything addressed to every node.
pub(crate) const BROADCAST_KEY: &str = "b";

/// The stream a message under `key` is numbered on: its routing key in
/// routing mode; one stream in fanout mode, where every node gets them all.
pub(crate) fn stream(mode: Mode, key: &str) -> &str {
    match mode {
        Mode::Fanout => "",
        Mode::Routing => key,
    }
}

/// The routing key of one node.
pub(crate) fn node_key(node: &str) -> String {
    key("n.", node)
}

/// The routing key of one user.
pub(crate) fn user_key(user: &str) -> String {
    key("u.", user)
}

/// The routing key of one group.
pub(crate) fn group_key(group: &str) -> String {
    key("g.", group)
}

/// A direct exchange matches any bytes: only length makes a key hashed.
fn key(kind: &str, id: &str) -> String {
    switchboard_core::relay::short_key(kind, id, MAX_KEY, |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_distinct_and_stable() {
        assert_eq!(user_key("alice"), "u.alice");
        assert_eq!(group_key("alice"), "g.alice");
        assert_eq!(node_key("n1"), "n.n1");
        let long = "x".repeat(300);
        let k = user_key(&long);
        assert!(k.len() <= MAX_KEY && k.starts_with("u.#"), "{k}");
        assert_eq!(k, user_key(&long), "stable");
        assert!(user_key("#abc").starts_with("u.#") && user_key("#abc").len() == 2 + 1 + 32);
    }
}
