//! What travels through a message broker between nodes (RabbitMQ, NATS), as
//! pure functions over bytes: the header in front of every envelope, the
//! control messages of the liveness protocol, the per-stream sequence tracking
//! that turns gaps into loss counts, and short keys for long ids.
//!
//! Every message body starts with a kind byte:
//!
//! | kind | body |
//! |---|---|
//! | `2` envelope | epoch (u64 BE), sequence number (u64 BE), copy marker (u8), the envelope |
//! | `3` bundle | epoch (u64 BE), number of its first envelope (u64 BE), then per envelope its length (u32 BE) and bytes |
//! | `1` control | op (u8), node id (u8 length + bytes), op-specific data |
//!
//! A bundle carries consecutive envelopes of one sender for one key (a routing
//! key, a subject),
//! each the only copy of its envelope, numbered one after the other from the
//! first: a burst costs the broker one message, not one per push.
//!
//! A sender numbers its envelopes per *stream*: per key where brokers route by
//! key, one stream where every node receives everything. Within one
//! epoch the numbers of a stream grow by one, so a receiver that sees a jump
//! knows how many messages of that stream it lost, and a number it has seen
//! already is a redelivery.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::NodeId;
use crate::bundle::{self, Bundle};

/// Kind byte of an envelope message.
const ENVELOPE: u8 = 2;
/// Kind byte of a control message.
const CONTROL: u8 = 1;
/// Kind byte of a bundle of envelopes.
const BUNDLE: u8 = 3;
/// Length of a bundle's header.
const BUNDLE_HEADER: usize = 17;
/// Most bytes of a bundle: a queue's cap counts messages, so this also bounds
/// what one message of a full queue holds.
pub const MAX_BUNDLE: usize = 64 * 1024;
/// Length of an envelope message's header.
pub const HEADER: usize = 18;

/// `kind` + `id` when `plain(id)` holds and the result is at most `max`
/// bytes long, else `kind` + `#` + a 128-bit hash of `id`: a key for an id
/// that the broker could not take as it is (too long, or characters it
/// reserves). An id that starts with `#` is hashed too, so that it never
/// passes for a hash. Two ids sharing a hash only cost the node that holds one
/// of them an envelope it then delivers to nobody.
pub fn short_key(kind: &str, id: &str, max: usize, plain: impl Fn(&str) -> bool) -> String {
    if kind.len() + id.len() <= max && !id.starts_with('#') && plain(id) {
        let mut k = String::with_capacity(kind.len() + id.len());
        k.push_str(kind);
        k.push_str(id);
        k
    } else {
        format!("{kind}#{:016x}{:016x}", fnv1a(id, 0), fnv1a(id, 1))
    }
}

/// FNV-1a, seeded: stable across builds and platforms, unlike std's hasher.
fn fnv1a(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where a copy of an envelope stands among the copies a sender made of it
/// (one per routing key in routing mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// The envelope went out once.
    Only,
    /// The first of several copies.
    First,
    /// A later copy: a node that got an earlier one drops it.
    Later,
}

impl Copy {
    fn byte(self) -> u8 {
        match self {
            Copy::Only => 0,
            Copy::First => 1,
            Copy::Later => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Copy::Only,
            1 => Copy::First,
            2 => Copy::Later,
            _ => return None,
        })
    }
}

/// Encodes an envelope message.
pub fn envelope_message(epoch: u64, seq: u64, copy: Copy, envelope: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + envelope.len());
    b.push(ENVELOPE);
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.push(copy.byte());
    b.extend_from_slice(envelope);
    b
}

/// An empty bundle (kind `3`) to fill with envelopes.
pub fn bundle() -> Bundle {
    Bundle::new(BUNDLE_HEADER, MAX_BUNDLE)
}

/// The message body of a filled bundle, its envelopes numbered from `first`.
pub fn bundle_message(mut bundle: Bundle, epoch: u64, first: u64) -> Vec<u8> {
    let header = bundle.header_mut();
    header[0] = BUNDLE;
    header[1..9].copy_from_slice(&epoch.to_be_bytes());
    header[9..17].copy_from_slice(&first.to_be_bytes());
    bundle.into_bytes()
}

/// A decoded message body.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// An envelope for the hub.
    Envelope {
        /// The sender's epoch.
        epoch: u64,
        /// Its number in the sender's stream.
        seq: u64,
        /// Which copy this is.
        copy: Copy,
        /// The envelope itself (a slice of the body, no copy).
        envelope: Bytes,
    },
    /// Envelopes numbered `first`, `first + 1`, ..., each an only copy.
    Bundle {
        /// The sender's epoch.
        epoch: u64,
        /// The number of the first.
        first: u64,
        /// The envelopes (slices of the body, no copy).
        envelopes: Vec<Bytes>,
    },
    /// A liveness message.
    Control(Control),
}

/// Messages of the liveness protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// "I am alive" (broadcast every third of the TTL; a node also hears its own).
    Heartbeat(NodeId),
    /// "I just joined: who is there?" (broadcast).
    Hello(NodeId),
    /// The answer to a hello, sent to the new node: the sender and the live
    /// nodes it knows.
    Welcome(NodeId, Vec<NodeId>),
    /// "I am leaving" (broadcast).
    Bye(NodeId),
    /// A marker a node sends itself after removing bindings: everything routed
    /// by those bindings is ahead of it in the queue.
    Fence(NodeId, u64),
}

impl Control {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(80);
        b.put_u8(CONTROL);
        let (op, node) = match self {
            Control::Heartbeat(n) => (1, n),
            Control::Hello(n) => (2, n),
            Control::Welcome(n, _) => (3, n),
            Control::Bye(n) => (4, n),
            Control::Fence(n, _) => (5, n),
        };
        b.put_u8(op);
        put_node(&mut b, node);
        match self {
            Control::Welcome(_, live) => {
                let live = &live[..live.len().min(usize::from(u16::MAX))];
                b.put_u16(live.len() as u16);
                for n in live {
                    put_node(&mut b, n);
                }
            }
            Control::Fence(_, n) => b.put_u64(*n),
            _ => {}
        }
        b.to_vec()
    }
}

fn put_node(b: &mut BytesMut, node: &NodeId) {
    // Node ids are at most 64 bytes (`MAX_NODE_ID_LEN`).
    let s = node.as_str().as_bytes();
    b.put_u8(s.len() as u8);
    b.put_slice(s);
}

/// Reads from the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    fn node(&mut self) -> Option<NodeId> {
        let n = usize::from(self.u8()?);
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        NodeId::new(s).ok()
    }
}

/// Decodes a message body; `None` if it is malformed.
pub fn decode(body: Bytes) -> Option<Message> {
    let mut r = Reader(&body);
    match r.u8()? {
        ENVELOPE => {
            let epoch = r.u64()?;
            let seq = r.u64()?;
            let copy = Copy::from_byte(r.u8()?)?;
            Some(Message::Envelope {
                epoch,
                seq,
                copy,
                envelope: body.slice(HEADER..),
            })
        }
        BUNDLE => {
            let epoch = r.u64()?;
            let first = r.u64()?;
            let envelopes = bundle::envelopes(body.slice(BUNDLE_HEADER..))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            if envelopes.is_empty() {
                return None;
            }
            Some(Message::Bundle {
                epoch,
                first,
                envelopes,
            })
        }
        CONTROL => {
            let op = r.u8()?;
            let node = r.node()?;
            let c = match op {
                1 => Control::Heartbeat(node),
                2 => Control::Hello(node),
                3 => {
                    let n = r.u16()?;
                    let mut live = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        live.push(r.node()?);
                    }
                    Control::Welcome(node, live)
                }
                4 => Control::Bye(node),
                5 => Control::Fence(node, r.u64()?),
                _ => return None,
            };
            Some(Message::Control(c))
        }
        _ => None,
    }
}

/// A sender's numbering of its streams. Bounded: past `cap` streams it starts
/// a new epoch, which receivers take as a fresh start (no loss counted).
#[derive(Debug)]
pub struct Sequences {
    epoch: u64,
    next: HashMap<String, u64>,
    cap: usize,
}

impl Sequences {
    /// Numbering from 1 on every stream, in `epoch`; at most `cap` streams.
    pub fn new(epoch: u64, cap: usize) -> Self {
        Self {
            epoch,
            next: HashMap::new(),
            cap,
        }
    }

    /// The epoch and number of the next message on `stream`.
    pub fn next(&mut self, stream: &str) -> (u64, u64) {
        self.take(stream, 1)
    }

    /// The epoch and the first of the next `count` numbers on `stream`.
    pub fn take(&mut self, stream: &str, count: u64) -> (u64, u64) {
        if let Some(n) = self.next.get_mut(stream) {
            let first = *n + 1;
            *n += count;
            return (self.epoch, first);
        }
        if self.next.len() >= self.cap {
            self.next.clear();
            self.epoch = self.epoch.wrapping_add(1);
        }
        self.next.insert(stream.to_owned(), count);
        (self.epoch, 1)
    }
}

/// What a receiver makes of an envelope's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// New; `missed` earlier messages of the stream never arrived.
    New {
        /// Messages of the stream lost before this one.
        missed: u64,
    },
    /// Seen before (a redelivery): drop it.
    Again,
}

/// Senders a receiver tracks at most.
const MAX_ORIGINS: usize = 4096;

/// A receiver's view of every sender's streams, and of the copies it got.
/// A sender's streams are kept until it says goodbye, across silences: a
/// node that lost its broker connection for a while and comes back resumes
/// its numbering, and what it sent that never arrived counts as lost.
#[derive(Debug, Default)]
pub struct Tracker {
    /// origin → stream → (epoch, last number seen).
    streams: HashMap<String, HashMap<String, (u64, u64)>>,
    /// origin → ids of the multi-copy envelopes delivered lately.
    copies: HashMap<String, RecentCopies>,
}

/// How many multi-copy envelopes of one sender a receiver remembers. Where
/// one queue takes every copy (RabbitMQ) the copies of an envelope arrive
/// back to back and one would do; where each key has its own subscription
/// (NATS) copies can be read apart, by as much as the subscriptions' queues
/// hold. Beyond the window a late copy is delivered again.
pub const COPY_WINDOW: usize = 1024;

/// The ids of one sender's recent multi-copy envelopes, oldest first.
#[derive(Debug, Default)]
struct RecentCopies {
    order: std::collections::VecDeque<u64>,
    ids: std::collections::HashSet<u64>,
}

impl RecentCopies {
    /// Remembers `id`; false if it was remembered already.
    fn insert(&mut self, id: u64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        if self.order.len() == COPY_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.order.push_back(id);
        true
    }
}

impl Tracker {
    /// Records message `seq` of `epoch` on `origin`'s `stream`.
    #[cfg(test)]
    pub(crate) fn record(&mut self, origin: &str, stream: &str, epoch: u64, seq: u64) -> Seen {
        self.record_range(origin, stream, epoch, seq, seq)
    }

    /// Records the messages `first..=last` of `epoch` on `origin`'s `stream`,
    /// which arrive together (one bundle) or not at all.
    pub fn record_range(
        &mut self,
        origin: &str,
        stream: &str,
        epoch: u64,
        first: u64,
        last: u64,
    ) -> Seen {
        if !self.streams.contains_key(origin) && self.streams.len() >= MAX_ORIGINS {
            // Senders that died without a goodbye pile up: start over (what
            // is lost meanwhile is not counted, the counts are a lower bound).
            self.streams.clear();
            self.copies.clear();
        }
        let streams = match self.streams.get_mut(origin) {
            Some(s) => s,
            None => self.streams.entry(origin.to_owned()).or_default(),
        };
        let Some(seen) = streams.get_mut(stream) else {
            streams.insert(stream.to_owned(), (epoch, last));
            return Seen::New { missed: 0 };
        };
        if seen.0 != epoch {
            // A restarted sender, or one that started over: not a loss.
            *seen = (epoch, last);
            return Seen::New { missed: 0 };
        }
        if first <= seen.1 {
            return Seen::Again;
        }
        let missed = first - seen.1 - 1;
        seen.1 = last;
        Seen::New { missed }
    }

    /// Whether a copy of envelope `id` from `origin` was delivered already
    /// (within the last [`COPY_WINDOW`] multi-copy envelopes of `origin`).
    pub fn repeated_copy(&mut self, origin: &str, copy: Copy, id: u64) -> bool {
        if copy == Copy::Only {
            return false;
        }
        let recent = match self.copies.get_mut(origin) {
            Some(r) => r,
            None => self.copies.entry(origin.to_owned()).or_default(),
        };
        !recent.insert(id)
    }

    /// Forgets a stream of every sender (its binding was removed: a later
    /// binding starts afresh).
    pub fn forget_stream(&mut self, stream: &str) {
        self.streams.retain(|_, s| {
            s.remove(stream);
            !s.is_empty()
        });
    }

    /// Keeps only the streams `keep` accepts, of every sender.
    pub fn retain_streams(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.streams.retain(|_, s| {
            s.retain(|k, _| keep(k));
            !s.is_empty()
        });
    }

    /// Forgets a sender (it left, or died).
    pub fn forget_origin(&mut self, origin: &str) {
        self.streams.remove(origin);
        self.copies.remove(origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn short_keys_are_plain_when_they_can_be_and_hashed_otherwise() {
        let plain = |id: &str| !id.contains(' ');
        assert_eq!(short_key("u.", "alice", 255, plain), "u.alice");
        let long = "x".repeat(300);
        let k = short_key("u.", &long, 255, plain);
        assert!(k.len() <= 255 && k.starts_with("u.#"), "{k}");
        assert_eq!(k, short_key("u.", &long, 255, plain), "stable");
        assert_ne!(k, short_key("u.", &"y".repeat(300), 255, plain));
        assert!(
            short_key("u.", "a b", 255, plain).starts_with("u.#"),
            "not plain"
        );
        // An id that looks like a hashed key is hashed too, never confused.
        let hashed = short_key("u.", "#abc", 255, plain);
        assert!(hashed.starts_with("u.#") && hashed.len() == 2 + 1 + 32);
        assert_eq!(fnv1a("", 0), 0xcbf2_9ce4_8422_2325, "FNV-1a offset basis");
    }

    #[test]
    fn messages_round_trip() {
        let body = envelope_message(7, 42, Copy::Later, b"env");
        assert_eq!(body.len(), HEADER + 3);
        assert_eq!(
            decode(Bytes::from(body)),
            Some(Message::Envelope {
                epoch: 7,
                seq: 42,
                copy: Copy::Later,
                envelope: Bytes::from_static(b"env"),
            })
        );
        for c in [
            Control::Heartbeat(node("a")),
            Control::Hello(node("b")),
            Control::Welcome(node("c"), vec![node("a"), node("b")]),
            Control::Welcome(node("c"), vec![]),
            Control::Bye(node("d")),
            Control::Fence(node("e"), 9),
        ] {
            assert_eq!(
                decode(Bytes::from(c.encode())),
                Some(Message::Control(c.clone()))
            );
        }
        for bad in [
            &b""[..],
            b"\x09",
            b"\x02\x00",
            b"\x01\x01\x05ab",
            b"\x01\x09\x01a",
        ] {
            assert_eq!(decode(Bytes::copy_from_slice(bad)), None, "{bad:?}");
        }
        let mut bad_copy = envelope_message(1, 1, Copy::Only, b"x");
        bad_copy[17] = 9;
        assert_eq!(decode(Bytes::from(bad_copy)), None);
    }

    #[test]
    fn bundles_round_trip_and_stay_within_their_size() {
        let mut b = bundle();
        b.push(b"one");
        b.push(b"");
        b.push(b"three");
        let body = bundle_message(b, 7, 40);
        assert_eq!(
            decode(Bytes::from(body.clone())),
            Some(Message::Bundle {
                epoch: 7,
                first: 40,
                envelopes: vec![
                    Bytes::from_static(b"one"),
                    Bytes::new(),
                    Bytes::from_static(b"three")
                ],
            })
        );
        // Cut anywhere inside an envelope, it is malformed, not shorter.
        for cut in [body.len() - 1, BUNDLE_HEADER + 2, BUNDLE_HEADER + 5] {
            assert_eq!(decode(Bytes::copy_from_slice(&body[..cut])), None, "{cut}");
        }
        assert_eq!(
            decode(Bytes::from(bundle_message(bundle(), 1, 1))),
            None,
            "empty"
        );

        let mut full = bundle();
        let env = vec![0u8; 1000];
        while full.fits(env.len()) {
            full.push(&env);
        }
        let body = bundle_message(full, 1, 1);
        assert!(body.len() <= MAX_BUNDLE && body.len() + 1004 > MAX_BUNDLE);
    }

    #[test]
    fn a_bundle_takes_its_range_of_numbers() {
        let mut t = Tracker::default();
        assert_eq!(t.record_range("a", "", 1, 1, 5), Seen::New { missed: 0 });
        assert_eq!(t.record("a", "", 1, 6), Seen::New { missed: 0 });
        assert_eq!(t.record_range("a", "", 1, 9, 20), Seen::New { missed: 2 });
        assert_eq!(
            t.record_range("a", "", 1, 9, 20),
            Seen::Again,
            "redelivered"
        );
        assert_eq!(t.record("a", "", 1, 21), Seen::New { missed: 0 });
    }

    #[test]
    fn sequences_count_per_stream_and_start_over_when_full() {
        let mut s = Sequences::new(5, 2);
        assert_eq!(s.next("a"), (5, 1));
        assert_eq!(s.next("a"), (5, 2));
        assert_eq!(s.next("b"), (5, 1));
        assert_eq!(s.next("c"), (6, 1), "a third stream starts a new epoch");
        assert_eq!(s.next("a"), (6, 1));
        assert_eq!(s.take("a", 10), (6, 2), "a bundle takes a range");
        assert_eq!(s.next("a"), (6, 12));
    }

    #[test]
    fn the_tracker_counts_gaps_and_redeliveries() {
        let mut t = Tracker::default();
        assert_eq!(t.record("a", "k", 1, 5), Seen::New { missed: 0 }, "first");
        assert_eq!(t.record("a", "k", 1, 6), Seen::New { missed: 0 });
        assert_eq!(t.record("a", "k", 1, 9), Seen::New { missed: 2 });
        assert_eq!(t.record("a", "k", 1, 8), Seen::Again);
        assert_eq!(t.record("a", "k", 1, 9), Seen::Again);
        assert_eq!(
            t.record("a", "j", 1, 3),
            Seen::New { missed: 0 },
            "streams apart"
        );
        assert_eq!(
            t.record("b", "k", 1, 3),
            Seen::New { missed: 0 },
            "senders apart"
        );
        assert_eq!(
            t.record("a", "k", 2, 1),
            Seen::New { missed: 0 },
            "new epoch"
        );
        t.forget_stream("k");
        assert_eq!(t.record("a", "k", 2, 7), Seen::New { missed: 0 }, "rebound");
        assert_eq!(t.record("a", "j", 1, 4), Seen::New { missed: 0 }, "kept");
        t.retain_streams(|k| k != "j");
        assert_eq!(t.record("a", "j", 1, 9), Seen::New { missed: 0 }, "dropped");
        t.forget_origin("a");
        assert_eq!(t.record("a", "j", 1, 12), Seen::New { missed: 0 });
    }

    #[test]
    fn later_copies_of_a_delivered_envelope_are_dropped() {
        let mut t = Tracker::default();
        assert!(!t.repeated_copy("a", Copy::First, 10));
        assert!(t.repeated_copy("a", Copy::Later, 10));
        assert!(t.repeated_copy("a", Copy::Later, 10));
        assert!(
            !t.repeated_copy("a", Copy::Only, 10),
            "single copies always pass"
        );
        assert!(!t.repeated_copy("b", Copy::Later, 10), "another sender");
        assert!(
            !t.repeated_copy("a", Copy::Later, 11),
            "the first copy that reached this node"
        );
        assert!(t.repeated_copy("a", Copy::Later, 11));
        // Copies read apart, other envelopes between them, are still known.
        assert!(!t.repeated_copy("a", Copy::First, 12));
        assert!(t.repeated_copy("a", Copy::Later, 10));
        for id in 100..100 + COPY_WINDOW as u64 {
            assert!(!t.repeated_copy("a", Copy::First, id));
        }
        assert!(!t.repeated_copy("a", Copy::Later, 10), "out of the window");
        t.forget_origin("a");
        assert!(!t.repeated_copy("a", Copy::Later, 100 + COPY_WINDOW as u64 - 1));
    }
}
