//! Cluster envelopes: what nodes send each other, as compact binary.
//!
//! An envelope is one version byte followed by a postcard body (varint
//! integers, length-prefixed strings and bytes). Encoding happens once per push,
//! never per recipient; a node decodes each envelope it receives once.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::frame::Frame;
use crate::history::Position;
use crate::id::{ConnId, GroupId, NodeId, UserId};
use crate::query::{LocalAnswer, Query};
use crate::target::Target;

/// The envelope format version this build writes and reads.
pub const VERSION: u8 = 1;

/// A connection's session: a small string map, readable and writable from any node.
pub type Session = BTreeMap<String, String>;

/// One message between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending node.
    pub origin: NodeId,
    /// Unique per origin and per life of the origin: lets queue backplanes drop
    /// duplicates and matches replies to requests.
    pub id: u64,
    /// What to do.
    pub body: Body,
}

/// What an envelope asks of the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Body {
    /// Deliver `frame` to the local connections `target` selects.
    Push {
        /// Recipients.
        target: Target,
        /// The frame, shared by every local recipient.
        frame: Frame,
    },
    /// Close the local connections `target` selects.
    Close {
        /// Connections to close.
        target: Target,
        /// Why, as given to the application's close handler and the client.
        reason: String,
    },
    /// Run `op` and send a [`Body::Reply`] with the same id back to the origin.
    Request {
        /// The operation.
        op: Op,
    },
    /// The answer to the request `id` of the receiving node.
    Reply {
        /// The outcome.
        result: OpResult,
    },
    /// A message from the application on one node to the application on
    /// others, opaque to the hub (presence bookkeeping, cache invalidation).
    App {
        /// What the application sent.
        data: Bytes,
    },
    /// Deliver a recorded push: like [`Body::Push`], with the stream and
    /// position the frame carries, so that a connection recovering that
    /// stream gets each entry once.
    Recorded {
        /// Recipients.
        target: Target,
        /// The stream the push was appended to.
        stream: String,
        /// Its position there.
        pos: Position,
        /// The frame (the `{"op":"push",...}` text), shared by every recipient.
        frame: Frame,
    },
}

/// An operation on a connection held by another node, or a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// Bind the connection to a user, moving it from any previous user.
    Bind {
        /// The connection.
        conn: ConnId,
        /// The user.
        user: UserId,
    },
    /// Unbind the connection from its user.
    Unbind {
        /// The connection.
        conn: ConnId,
    },
    /// Add the connection to a group.
    Join {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: GroupId,
    },
    /// Remove the connection from a group.
    Leave {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: GroupId,
    },
    /// Read the connection's session.
    SessionGet {
        /// The connection.
        conn: ConnId,
    },
    /// Set (`Some`) or remove (`None`) keys of the connection's session.
    SessionUpdate {
        /// The connection.
        conn: ConnId,
        /// Keys to set or remove.
        changes: Vec<(String, Option<String>)>,
    },
    /// Replace the whole session.
    SessionReplace {
        /// The connection.
        conn: ConnId,
        /// The new session.
        session: Session,
    },
    /// Answer a query about the node's own connections.
    Query(Query),
}

/// The outcome of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum OpResult {
    /// Done.
    Done,
    /// The node holds no such connection.
    NoSuchConn,
    /// The session that was asked for.
    Session(Session),
    /// The node's answer to a query.
    Answer(LocalAnswer),
    /// The node refused or failed the operation.
    Failed(String),
    /// The operation breaks a limit or a rule of the node's (a connection in
    /// too many groups, a name too long): the reason, for the client.
    Refused(String),
}

/// An envelope could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Empty input.
    #[error("empty envelope")]
    Empty,
    /// Written by an incompatible version.
    #[error("unsupported envelope version {0}")]
    Version(u8),
    /// Malformed body.
    #[error("malformed envelope")]
    Malformed(#[source] postcard::Error),
}

impl Envelope {
    /// Encodes the envelope: a version byte and a postcard body.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(64).writer();
        buf.get_mut().put_u8(VERSION);
        // Serializing these types into memory cannot fail: they hold no maps with
        // non-string keys and no sequences of unknown length.
        match postcard::to_io(self, &mut buf) {
            Ok(_) => buf.into_inner().freeze(),
            Err(e) => unreachable!("envelope serialization failed: {e}"),
        }
    }

    /// Decodes an envelope written by [`Envelope::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        postcard::from_bytes(body).map_err(DecodeError::Malformed)
    }
}

/// Reads a postcard varint (LEB128) from the front of `b`.
fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// The origin and id of an encoded envelope, read without decoding its body
/// (for duplicate detection on a hot path).
pub fn peek_id(bytes: &[u8]) -> Option<(&str, u64)> {
    let (&version, rest) = bytes.split_first()?;
    if version != VERSION {
        return None;
    }
    let (len, rest) = varint(rest)?;
    let len = usize::try_from(len).ok()?;
    if rest.len() < len {
        return None;
    }
    let origin = std::str::from_utf8(&rest[..len]).ok()?;
    let (id, _) = varint(&rest[len..])?;
    Some((origin, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node() -> impl Strategy<Value = NodeId> {
        "[a-z0-9-]{1,12}".prop_map(|s| NodeId::new(s).unwrap())
    }
    fn conn() -> impl Strategy<Value = ConnId> {
        (node(), any::<u64>()).prop_map(|(n, s)| ConnId::new(n, s))
    }
    fn target() -> impl Strategy<Value = Target> {
        (
            any::<bool>(),
            prop::collection::vec(conn(), 0..3),
            prop::collection::vec("[a-z]{0,5}", 0..3),
            prop::collection::vec("[a-z]{0,5}", 0..3),
            prop::collection::vec(conn(), 0..2),
        )
            .prop_map(|(all, conns, users, groups, except)| {
                let mut t = if all { Target::all() } else { Target::none() };
                t = t.and_conns(conns).and_groups(groups);
                for u in users {
                    t = t.and_user(u);
                }
                for c in except {
                    t = t.except_conn(c);
                }
                t
            })
    }
    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            ".{0,40}".prop_map(Frame::text),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Frame::binary),
        ]
    }
    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (target(), frame()).prop_map(|(target, frame)| Body::Push { target, frame }),
            (target(), "[a-z:]{1,8}", any::<u64>(), any::<u64>(), frame()).prop_map(
                |(target, stream, offset, epoch, frame)| Body::Recorded {
                    target,
                    stream,
                    pos: Position { offset, epoch },
                    frame,
                }
            ),
            (target(), ".{0,10}").prop_map(|(target, reason)| Body::Close { target, reason }),
            (conn(), "[a-z]{1,5}").prop_map(|(conn, u)| Body::Request {
                op: Op::Bind {
                    conn,
                    user: u.into()
                }
            }),
            (
                conn(),
                prop::collection::vec(("[a-z]{1,4}", prop::option::of(".{0,4}")), 0..3)
            )
                .prop_map(|(conn, changes)| Body::Request {
                    op: Op::SessionUpdate { conn, changes }
                }),
            "[a-z]{1,5}".prop_map(|g| Body::Request {
                op: Op::Query(Query::GroupCount(g.into()))
            }),
            prop::collection::vec(conn(), 0..4).prop_map(|c| Body::Reply {
                result: OpResult::Answer(LocalAnswer::Conns(c))
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(origin in node(), id in any::<u64>(), body in body()) {
            let env = Envelope { origin, id, body };
            let bytes = env.encode();
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        }

        #[test]
        fn peek_reads_what_decode_reads(origin in node(), id in any::<u64>(), body in body()) {
            let env = Envelope { origin, id, body };
            let bytes = env.encode();
            prop_assert_eq!(peek_id(&bytes), Some((env.origin.as_str(), id)));
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&bytes);
        }
    }

    #[test]
    fn push_is_compact() {
        let env = Envelope {
            origin: NodeId::new("n1").unwrap(),
            id: 7,
            body: Body::Push {
                target: Target::group("room"),
                frame: Frame::text("x".repeat(64)),
            },
        };
        let bytes = env.encode();
        // version, origin, id, tag, target (6 fields), frame kind + length + data
        assert!(bytes.len() < 64 + 20, "{} bytes", bytes.len());
        assert!(matches!(
            Envelope::decode(&[2, 0]),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(Envelope::decode(&[]), Err(DecodeError::Empty)));
        let bad = Envelope {
            origin: NodeId::new("n1").unwrap(),
            id: 1,
            body: Body::Push {
                target: Target::all(),
                frame: Frame::binary(vec![0xff]),
            },
        }
        .encode();
        // A binary frame re-tagged as text must be refused, not smuggled through.
        let mut tampered = bad.to_vec();
        let pos = tampered.len() - 3;
        assert_eq!(tampered[pos], 1, "kind byte of the binary frame");
        tampered[pos] = 0;
        assert!(Envelope::decode(&tampered).is_err());
    }

    #[test]
    fn peek_id_refuses_an_origin_longer_than_the_input() {
        // Version, then an origin length of 5 with only 2 bytes after it.
        assert_eq!(peek_id(&[VERSION, 5, b'a', b'b']), None);
        assert_eq!(peek_id(&[]), None);
        assert_eq!(peek_id(&[VERSION.wrapping_add(1)]), None);
    }
}
