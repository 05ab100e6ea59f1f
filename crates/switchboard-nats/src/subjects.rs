//! Subject names. Everything lives under the deployment's prefix:
//!
//! | subject | carries |
//! |---|---|
//! | `P.n.NODE` | envelopes for one node, and welcomes |
//! | `P.b` | envelopes for every node, and heartbeats, hellos and byes |
//! | `P.u.USER` | envelopes for the nodes holding a connection of the user |
//! | `P.g.GROUP` | envelopes for the nodes holding a member of the group |
//!
//! A user or group id that is not a plain token (NATS reserves `.`, `*`, `>`
//! and whitespace) or that is long is replaced by a hash of it
//! (`P.u.#<32 hex>`).

use bytes::{Buf, Bytes};
use switchboard_core::relay::short_key;

use crate::config::is_token;

/// Longest id kept as it is in a subject.
const MAX_ID: usize = 128;

#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    /// `P.`
    head: String,
}

/// The characters an id may keep in a subject: a token's, and a few more
/// that user ids often carry.
fn plain(id: &str) -> bool {
    is_token(id)
        || id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_@:=+~".contains(c))
}

impl Subjects {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            head: format!("{prefix}."),
        }
    }

    fn under(&self, tail: &str) -> String {
        let mut s = String::with_capacity(self.head.len() + tail.len());
        s.push_str(&self.head);
        s.push_str(tail);
        s
    }

    pub(crate) fn node(&self, node: &str) -> String {
        self.under(&format!("n.{node}"))
    }

    pub(crate) fn broadcast(&self) -> String {
        self.under("b")
    }

    pub(crate) fn user(&self, user: &str) -> String {
        self.under(&short_key("u.", user, MAX_ID, plain))
    }

    pub(crate) fn group(&self, group: &str) -> String {
        self.under(&short_key("g.", group, MAX_ID, plain))
    }

    /// The subject without the prefix: the stream a sender numbers it on.
    pub(crate) fn stream<'a>(&self, subject: &'a str) -> &'a str {
        subject.strip_prefix(&self.head).unwrap_or(subject)
    }

    /// Whether `subject` is some node's own.
    pub(crate) fn is_node(&self, subject: &str) -> bool {
        self.stream(subject).starts_with("n.")
    }
}

/// A message on a core subject: the sender's publishing order (u64 BE; 0 for
/// liveness messages, which need none), then the relay message. Each
/// subscription has its own queue in the client, so the receiver needs the
/// order to put one sender's messages back in it; envelope ids do not give
/// it, since a node may publish an envelope after a later one (a push that
/// waited for a look-up).
pub(crate) fn framed(order: u64, message: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(8 + message.len());
    b.extend_from_slice(&order.to_be_bytes());
    b.extend_from_slice(message);
    Bytes::from(b)
}

/// The order and the relay message of a core message; `None` if too short.
pub(crate) fn unframed(mut payload: Bytes) -> Option<(u64, Bytes)> {
    (payload.len() >= 8).then(|| (payload.get_u64(), payload))
}

/// The order of a core message, for sorting (malformed ones first).
pub(crate) fn order_of(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_single_tokens() {
        let s = Subjects::new("app");
        assert_eq!(
            s.user("alice@x.org"),
            "app.u.#".to_owned() + &s.user("alice@x.org")[7..]
        );
        assert_eq!(s.user("alice@example"), "app.u.alice@example");
        assert_eq!(s.group("room-1"), "app.g.room-1");
        assert_eq!(s.node("n-1"), "app.n.n-1");
        assert_eq!(s.broadcast(), "app.b");
        for odd in ["a.b", "a b", "a*", "a>", "#x", &"y".repeat(200)] {
            let subject = s.user(odd);
            let tail = subject.strip_prefix("app.u.").unwrap();
            assert!(
                tail.starts_with('#') && tail.len() == 33,
                "{odd:?} -> {subject}"
            );
        }
        assert_ne!(s.user("a.b"), s.user("a b"));
        assert_eq!(s.stream("app.u.alice"), "u.alice");
        assert!(s.is_node("app.n.x") && !s.is_node("app.u.x"));
    }

    #[test]
    fn a_core_message_carries_its_order() {
        let m = framed(258, b"relay");
        assert_eq!(order_of(&m), 258);
        assert_eq!(unframed(m), Some((258, Bytes::from_static(b"relay"))));
        assert_eq!(unframed(Bytes::from_static(b"short")), None);
        assert_eq!(order_of(b"short"), 0);
    }
}
