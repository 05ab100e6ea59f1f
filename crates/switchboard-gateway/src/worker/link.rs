//! One worker's link to one gateway.
//!
//! Commands go out through a bounded queue and a writer task that batches
//! them. Queries go out on the same link, after the commands written before
//! them, so a query sees the effect of this worker's earlier commands (a
//! `join` then a `group_count` answer consistently). A gateway writes a
//! query's reply on the connection the query came on; replies come back in
//! order and are told apart from event frames by their fifth byte (see
//! [`crate::ext`]).
//!
//! Some pushes and every close need a look-up first (`CMD_SELECT`: which of
//! the gateway's connections a target selects), and only its answer says
//! what to send. So that nothing issued later overtakes them, a look-up holds
//! a place in the link's order ([`Place`]), and while a place is unfilled
//! everything issued after it waits behind it ([`Held`]), without making the
//! caller wait. The look-up itself is a read: it goes out at once unless a
//! command that changes the gateway's state (a bind, a join, an accepted
//! client) is held before it, so look-ups in a row take one round trip, not
//! one each. Ordering holds per link, that is per worker and gateway.
//!
//! Replies carry no request id: a reply is the oldest outstanding query's
//! because it comes next, nothing else says so. That holds only while the
//! gateway answers every query, so a link is trusted to pair replies until
//! one of its queries goes unanswered past its deadline (the query timeout,
//! counted from when the hub handed the request over, so the link gives up
//! no later than the hub's caller does). The gateway then skipped that query
//! or will answer it late, and either way the next reply may be another
//! query's answer, which would be returned as if it were right. So the link
//! is given up ([`Link::untrust`]): a reply read once the oldest query's
//! deadline has passed is not handed to anyone, every waiting query fails at
//! once, what is held is dropped and counted, nothing more is written, and
//! the connection is closed. The worker links the gateway again as after any
//! lost link; on a new connection the gateway's replies start in step again.
//! Before the deadline a reply is still taken by order, so a gateway that
//! skips a query and promptly answers the next ones can have those answers
//! taken for the skipped one's within that one timeout; without request ids
//! a timeout can bound that, not rule it out.
//!
//! Drops are counted once each in `publish_dropped`: what [`Link::deliver`]
//! and [`Link::look_up`] refuse, their caller reports in the publish's
//! hand-off, which the backplane counts; what the link loses after
//! accepting it (a held entry of a link that ends, an abandoned look-up), or
//! refuses to [`Link::send`] and [`Link::query`], whose callers report no
//! hand-off, the link counts itself, in a counter that outlives it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use switchboard::core::NodeId;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::protocol::frame::{Frame as GwFrame, FrameDecoder, Header};
use crate::protocol::php::{self, Value};
use crate::protocol::{ProtocolError, cmd};

/// The byte stream of a worker link broke the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum LinkStreamError {
    /// A bad frame.
    #[error(transparent)]
    Frame(#[from] ProtocolError),
    /// A reply longer than the largest frame.
    #[error("reply of {0} bytes is too long")]
    ReplyTooLong(usize),
    /// A reply that is not PHP `serialize` output.
    #[error("undecodable reply")]
    BadReply(#[source] crate::protocol::php::PhpError),
    /// The socket failed.
    #[error("i/o error on a gateway link")]
    Io(#[from] std::io::Error),
}

/// Frames queued to one gateway. The application's pushes must never wait,
/// so a full queue drops (counted in `publish_dropped`); this is sized for a
/// burst of 1,000 clients × 100 pushes, each to every gateway, at about
/// 150 bytes a frame (10 MB at most).
pub(super) const LINK_QUEUE: usize = 64 * 1024;

/// Entries held behind unanswered look-ups on one link, at most. Beyond
/// this, what is issued is dropped and counted like a full [`LINK_QUEUE`]:
/// the newest goes, so what does arrive still arrives in order. A look-up
/// is answered within a round trip, or abandoned after the query timeout,
/// so this only fills when a gateway stops answering.
pub(super) const HELD: usize = LINK_QUEUE;

/// A query on a link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkError {
    /// The link is gone or its queue is full.
    Unavailable,
    /// No reply by the deadline: the link was given up.
    Unanswered,
}

/// What arrives on a worker link.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A frame (a client event, a ping, an extension).
    Frame(GwFrame),
    /// The reply to the oldest outstanding query.
    Reply(Value),
}

/// Splits a worker link's byte stream into frames and query replies.
#[derive(Debug)]
pub(super) struct LinkDecoder {
    frames: FrameDecoder,
    max: usize,
}

impl LinkDecoder {
    pub(super) fn new(max: usize) -> Self {
        Self {
            frames: FrameDecoder::new(max),
            max,
        }
    }
}

/// Whether a message's fifth byte starts PHP `serialize` output (a reply).
fn is_reply(b: u8) -> bool {
    matches!(b, b'N' | b'b' | b'i' | b'd' | b's' | b'a')
}

impl Decoder for LinkDecoder {
    type Item = Incoming;
    type Error = LinkStreamError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, LinkStreamError> {
        if src.len() < 5 {
            return Ok(None);
        }
        if !is_reply(src[4]) {
            return Ok(self.frames.decode(src)?.map(Incoming::Frame));
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            return Err(LinkStreamError::ReplyTooLong(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let payload = src.split_to(len);
        let value = php::unserialize(&payload).map_err(LinkStreamError::BadReply)?;
        Ok(Some(Incoming::Reply(value)))
    }
}

/// A live link, as the rest of the worker sees it.
#[derive(Debug)]
pub(super) struct Link {
    /// The gateway's node id.
    pub(super) node: NodeId,
    tx: mpsc::Sender<Bytes>,
    /// Locked while anything is queued, so its order is the order on the
    /// wire.
    order: Mutex<Order>,
    /// The gateway speaks the switchboard extensions.
    pub(super) negotiated: AtomicBool,
    /// The gateway confirmed a drain: no event follows.
    pub(super) drained: AtomicBool,
    pub(super) drained_notify: Notify,
    /// What the link lost after accepting it, or refused where its caller
    /// reports no hand-off; shared by the worker's links, so it survives
    /// them.
    pub(super) dropped: Arc<AtomicU64>,
    /// Cancelled when the link is given up: its connection must close.
    pub(super) untrusted: CancellationToken,
}

/// A query's reply waiter, and when the query is given up.
#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Value>,
    deadline: Instant,
}

/// What is on its way on a link, and what waits for its turn.
#[derive(Debug, Default)]
struct Order {
    /// Waiters of the queries written, oldest first: replies come in this
    /// order.
    replies: VecDeque<Waiter>,
    /// What was issued from the oldest unfilled place on, in issue order;
    /// empty when no look-up is outstanding (then everything goes out at
    /// once).
    held: VecDeque<Held>,
    /// The number of `held[0]`: held entries are numbered in a row, so a
    /// place is found from its number.
    head: u64,
    /// One past the number of the last held entry that may change the
    /// gateway's state: such an entry is held while this exceeds `head`.
    changes_until: u64,
    /// The link ended or was given up: nothing more goes out, no reply is
    /// paired.
    closed: bool,
}

/// One entry held behind a look-up.
#[derive(Debug)]
enum Held {
    /// Frames; empty for a place whose look-up sends nothing.
    Frames(Bytes),
    /// Frames ending with a query, and its reply's waiter.
    Query(Bytes, Waiter),
    /// Kept for what a look-up's answer decides.
    Place,
}

impl Order {
    /// Holds `h`; returns its number.
    fn hold(&mut self, h: Held, changes_state: bool) -> u64 {
        let n = self.head + self.held.len() as u64;
        self.held.push_back(h);
        if changes_state {
            self.changes_until = n + 1;
        }
        n
    }

    /// Whether the oldest query written is past its deadline: its reply, if
    /// one still comes, can no longer be told from the next one's.
    fn overdue(&self) -> bool {
        self.replies
            .front()
            .is_some_and(|w| w.deadline <= Instant::now())
    }
}

/// A look-up's reply, and its place in the link's order.
pub(super) struct LookUp {
    pub(super) reply: oneshot::Receiver<Value>,
    pub(super) place: Place,
}

/// A place in a link's order, held for what a look-up decides to send.
/// Dropped unfilled (the look-up failed or timed out), it is counted as a
/// drop and frees what waits behind it.
pub(super) struct Place {
    link: Arc<Link>,
    n: u64,
    filled: bool,
}

impl Place {
    /// Sends `frames` (deliveries to clients or closes, nothing that changes
    /// what a later look-up finds) in this place; empty to send nothing.
    pub(super) fn fill(mut self, frames: Bytes) {
        self.filled = true;
        self.link.fill(self.n, frames);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.filled {
            self.link.count_drop();
            self.link.fill(self.n, Bytes::new());
        }
    }
}

impl Link {
    /// A link whose drops are counted in `dropped`.
    pub(super) fn new(node: NodeId, tx: mpsc::Sender<Bytes>, dropped: Arc<AtomicU64>) -> Self {
        Self {
            node,
            tx,
            order: Mutex::new(Order::default()),
            negotiated: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            drained_notify: Notify::new(),
            dropped,
            untrusted: CancellationToken::new(),
        }
    }

    fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes to the writer's queue; `false`: full or gone, not counted here.
    /// Called with the order locked.
    fn write(&self, bytes: Bytes) -> bool {
        self.tx.try_send(bytes).is_ok()
    }

    /// Whether a query may be paired with a reply on this link; gives the
    /// link up when its oldest query is overdue. Called with the order
    /// locked.
    fn pairs(&self, o: &mut Order) -> bool {
        if o.overdue() {
            self.give_up(o, "a query went unanswered past its deadline");
        }
        !o.closed
    }

    /// Queues `bytes` in order, behind any unanswered look-up; never waits.
    /// `false`: refused (the link is gone or full), not counted here.
    fn put(&self, bytes: Bytes, changes_state: bool) -> bool {
        let mut o = self.order();
        if o.closed {
            return false;
        }
        if o.held.is_empty() {
            return self.write(bytes);
        }
        if o.held.len() >= HELD {
            return false;
        }
        o.hold(Held::Frames(bytes), changes_state);
        true
    }

    /// Queues commands (one or more frames) to the gateway; never waits. A
    /// refusal is counted: no hand-off reports it.
    pub(super) fn send(&self, bytes: Bytes) -> bool {
        let ok = self.put(bytes, true);
        if !ok {
            self.count_drop();
        }
        ok
    }

    /// Queues frames that only deliver to clients (pushes): a look-up issued
    /// after them need not wait for them to find the same connections. A
    /// refusal is the caller's to report in its hand-off.
    pub(super) fn deliver(&self, bytes: Bytes) -> bool {
        self.put(bytes, false)
    }

    /// Queues `frames` ending with a query, and waits for the reply until
    /// `deadline`; gives the link up if none comes by then. A refusal is
    /// counted: the request's hand-off is already reported.
    pub(super) async fn query(&self, frames: Bytes, deadline: Instant) -> Result<Value, LinkError> {
        let rx = {
            let mut o = self.order();
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx, deadline };
            if !self.pairs(&mut o) || o.held.len() >= HELD {
                self.count_drop();
                return Err(LinkError::Unavailable);
            }
            if o.held.is_empty() {
                if !self.write(frames) {
                    self.count_drop();
                    return Err(LinkError::Unavailable);
                }
                o.replies.push_back(waiter);
            } else {
                o.hold(Held::Query(frames, waiter), true);
            }
            rx
        };
        self.reply_by(rx, deadline).await
    }

    /// Waits for the reply `rx` of a query of this link until `deadline`;
    /// gives the link up if none comes by then.
    pub(super) async fn reply_by(
        &self,
        rx: oneshot::Receiver<Value>,
        deadline: Instant,
    ) -> Result<Value, LinkError> {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(LinkError::Unavailable),
            Err(_) => {
                self.untrust("a query went unanswered past its deadline");
                Err(LinkError::Unanswered)
            }
        }
    }

    /// Issues `select`, a query that changes nothing and is answered by
    /// `deadline`, and holds a place after it for what its reply decides;
    /// never waits. `None`: refused (the link is gone or full), for the
    /// caller to report in its hand-off.
    pub(super) fn look_up(self: &Arc<Self>, select: Bytes, deadline: Instant) -> Option<LookUp> {
        let mut o = self.order();
        if !self.pairs(&mut o) || o.held.len() + 2 > HELD {
            return None;
        }
        let (tx, reply) = oneshot::channel();
        let waiter = Waiter { tx, deadline };
        if o.changes_until > o.head {
            // Must see the held change: the select waits its turn too.
            o.hold(Held::Query(select, waiter), false);
        } else {
            if !self.write(select) {
                return None;
            }
            o.replies.push_back(waiter);
        }
        let n = o.hold(Held::Place, false);
        Some(LookUp {
            reply,
            place: Place {
                link: self.clone(),
                n,
                filled: false,
            },
        })
    }

    /// Fills place `n`, then writes everything held that no unfilled place
    /// precedes any more. What was accepted and cannot be written now is
    /// counted.
    fn fill(&self, n: u64, frames: Bytes) {
        let mut o = self.order();
        let place = n
            .checked_sub(o.head)
            .and_then(|at| o.held.get_mut(at as usize));
        match place {
            Some(h @ Held::Place) => *h = Held::Frames(frames),
            // Cleared with the link.
            _ => {
                if !frames.is_empty() {
                    self.count_drop();
                }
                return;
            }
        }
        while let Some(h) = o.held.pop_front() {
            match h {
                Held::Place => {
                    o.held.push_front(h);
                    break;
                }
                Held::Frames(b) if b.is_empty() => {}
                Held::Frames(b) => {
                    if !self.write(b) {
                        self.count_drop();
                    }
                }
                Held::Query(b, waiter) => {
                    if self.write(b) {
                        o.replies.push_back(waiter);
                    } else {
                        self.count_drop();
                    }
                }
            }
            o.head += 1;
        }
    }

    /// Hands a reply to the oldest outstanding query, unless that query is
    /// past its deadline or there is none: then the reply cannot be placed
    /// and the link is given up.
    pub(super) fn reply(&self, v: Value) {
        let mut o = self.order();
        if o.closed {
            return;
        }
        if o.replies.is_empty() {
            self.give_up(&mut o, "a reply nobody asked for");
            return;
        }
        if !self.pairs(&mut o) {
            return;
        }
        if let Some(w) = o.replies.pop_front() {
            let _ = w.tx.send(v);
        }
    }

    /// Gives the link up: it can no longer pair replies with queries (see
    /// the module's documentation). Its connection is closed.
    pub(super) fn untrust(&self, why: &str) {
        let mut o = self.order();
        self.give_up(&mut o, why);
    }

    fn give_up(&self, o: &mut Order, why: &str) {
        if o.closed {
            return;
        }
        tracing::warn!(gateway = %self.node, "{why}: replies can no longer be paired with queries, closing the link");
        self.close(o);
        self.untrusted.cancel();
    }

    /// The link ended: no reply comes any more, and nothing held goes out.
    /// Its waiters fail at once instead of waiting for their timeouts.
    pub(super) fn end(&self) {
        let mut o = self.order();
        self.close(&mut o);
    }

    /// Fails every waiter, drops what is held (counted: it was accepted), and
    /// refuses whatever comes next.
    fn close(&self, o: &mut Order) {
        o.closed = true;
        o.replies.clear();
        // A place is counted by its owner, when it drops it unfilled.
        let lost = o
            .held
            .iter()
            .filter(|h| match h {
                Held::Frames(b) => !b.is_empty(),
                Held::Query(..) => true,
                Held::Place => false,
            })
            .count();
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        o.head += o.held.len() as u64;
        o.held.clear();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A frame toward a gateway: GatewayWorker's all-zero template with `cmd`,
/// `connection_id`, `flag`, `ext_data` and `body` set.
pub(super) fn frame(
    out: &mut BytesMut,
    cmd: u8,
    conn: u32,
    flag: u8,
    ext_data: Bytes,
    body: Bytes,
) {
    GwFrame {
        header: Header {
            cmd,
            connection_id: conn,
            flag,
            ..Header::default()
        },
        ext_data,
        body,
    }
    .encode(out);
}

/// One frame toward a gateway, as bytes.
pub(super) fn one(cmd: u8, conn: u32, flag: u8, ext_data: Bytes, body: Bytes) -> Bytes {
    let mut out = BytesMut::new();
    frame(&mut out, cmd, conn, flag, ext_data, body);
    out.freeze()
}

/// A frame whose body is an empty scalar.
pub(super) fn plain(cmd: u8, conn: u32, ext_data: Bytes) -> Bytes {
    one(cmd, conn, cmd::FLAG_BODY_IS_SCALAR, ext_data, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// A link whose writer's queue is `rx`.
    fn link() -> (Arc<Link>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let node = NodeId::new("g").unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        (Arc::new(Link::new(node, tx, dropped)), rx)
    }

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn dropped(l: &Link) -> u64 {
        l.dropped.load(Ordering::Relaxed)
    }

    fn written(rx: &mut mpsc::Receiver<Bytes>) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(match &b[..] {
                b"s1" => "s1",
                b"s2" => "s2",
                b"s3" => "s3",
                b"a" => "a",
                b"b" => "b",
                b"c" => "c",
                b"bind" => "bind",
                b"filled" => "filled",
                other => panic!("unexpected {other:?}"),
            });
        }
        out
    }

    /// Polls `f` once: a query takes its place in the order when first
    /// polled.
    fn started<F: Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn what_follows_a_look_up_waits_for_its_answer() {
        let (l, mut rx) = link();
        l.deliver(b("a"));
        let p = l.look_up(b("s1"), later()).unwrap();
        assert!(l.deliver(b("b")), "held, not refused");
        assert!(l.send(b("c")));
        assert_eq!(written(&mut rx), ["a", "s1"]);
        p.place.fill(b("filled"));
        assert_eq!(written(&mut rx), ["filled", "b", "c"]);
        // Nothing held any more: straight through.
        l.deliver(b("a"));
        assert_eq!(written(&mut rx), ["a"]);
    }

    #[test]
    fn places_are_filled_in_order_whatever_order_the_answers_take() {
        let (l, mut rx) = link();
        let p1 = l.look_up(b("s1"), later()).unwrap();
        l.deliver(b("a"));
        let p2 = l.look_up(b("s2"), later()).unwrap();
        l.deliver(b("b"));
        assert_eq!(written(&mut rx), ["s1", "s2"], "look-ups go out at once");
        p2.place.fill(b("filled"));
        assert_eq!(
            written(&mut rx),
            Vec::<&str>::new(),
            "behind the first place"
        );
        // An empty filling sends nothing and lets the rest go.
        p1.place.fill(Bytes::new());
        assert_eq!(written(&mut rx), ["a", "filled", "b"]);
    }

    #[test]
    fn a_look_up_waits_for_a_held_change_of_state() {
        let (l, mut rx) = link();
        let p1 = l.look_up(b("s1"), later()).unwrap();
        l.send(b("bind"));
        let p2 = l.look_up(b("s2"), later()).unwrap();
        l.deliver(b("a"));
        assert_eq!(written(&mut rx), ["s1"], "s2 must see the bind");
        p1.place.fill(Bytes::new());
        assert_eq!(written(&mut rx), ["bind", "s2"]);
        // Once the change is out, a look-up goes at once again.
        let p3 = l.look_up(b("s3"), later()).unwrap();
        assert_eq!(written(&mut rx), ["s3"]);
        p2.place.fill(b("filled"));
        assert_eq!(written(&mut rx), ["filled", "a"]);
        drop(p3);
    }

    // Replies are handed over as they are read: each is checked at once,
    // nothing is awaited. (A runtime only for the queries' timers.)
    #[tokio::test]
    async fn replies_reach_queries_in_the_order_written() {
        let (l, mut rx) = link();
        let mut p1 = l.look_up(b("s1"), later()).unwrap();
        l.send(b("bind"));
        let mut p2 = l.look_up(b("s2"), later()).unwrap();
        let mut q = std::pin::pin!(l.query(b("s3"), later()));
        assert!(started(q.as_mut()).is_pending());
        assert_eq!(written(&mut rx), ["s1"]);
        l.reply(Value::Int(1));
        assert_eq!(p1.reply.try_recv(), Ok(Value::Int(1)));
        p1.place.fill(Bytes::new());
        assert_eq!(written(&mut rx), ["bind", "s2"]);
        l.reply(Value::Int(2));
        assert_eq!(p2.reply.try_recv(), Ok(Value::Int(2)));
        p2.place.fill(Bytes::new());
        assert_eq!(written(&mut rx), ["s3"]);
        l.reply(Value::Int(3));
        assert_eq!(started(q), std::task::Poll::Ready(Ok(Value::Int(3))));
    }

    #[test]
    fn an_abandoned_look_up_is_counted_and_lets_the_rest_go() {
        let (l, mut rx) = link();
        let p = l.look_up(b("s1"), later()).unwrap();
        l.deliver(b("a"));
        drop(p);
        assert_eq!(written(&mut rx), ["s1", "a"]);
        assert_eq!(dropped(&l), 1);
    }

    #[test]
    fn what_is_held_is_bounded_and_the_newest_is_dropped() {
        let (l, mut rx) = link();
        let p = l.look_up(b("s1"), later()).unwrap();
        for _ in 0..HELD - 1 {
            assert!(l.deliver(b("a")));
        }
        assert!(!l.deliver(b("b")), "full");
        assert!(l.look_up(b("s2"), later()).is_none(), "full");
        assert_eq!(dropped(&l), 0, "refusals are for the caller to report");
        assert!(!l.send(b("c")), "full");
        assert_eq!(dropped(&l), 1, "no caller reports a command's refusal");
        assert_eq!(written(&mut rx), ["s1"]);
        p.place.fill(Bytes::new());
        let after = written(&mut rx);
        assert_eq!(after.len(), HELD - 1);
        assert!(after.iter().all(|w| *w == "a"));
    }

    #[tokio::test]
    async fn a_link_that_ends_fails_what_waits_on_it() {
        let (l, _rx) = link();
        let mut p = l.look_up(b("s1"), later()).unwrap();
        let mut q = std::pin::pin!(l.query(b("s2"), later()));
        assert!(started(q.as_mut()).is_pending());
        l.end();
        assert_eq!(
            p.reply.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            started(q),
            std::task::Poll::Ready(Err(LinkError::Unavailable))
        );
        assert_eq!(dropped(&l), 1, "the held query");
        // Its place no longer exists: filling it is harmless, and what it
        // would have sent is counted.
        p.place.fill(b("filled"));
        assert_eq!(dropped(&l), 2);
        assert!(!l.untrusted.is_cancelled(), "ended, not given up");
    }

    // The gateway never answers s1. The reply that comes next is s2's, but
    // nothing on the wire says so; taken by order it would answer s1, and
    // the one after it s2. Once s1 is overdue, no reply is placed.
    #[tokio::test(start_paused = true)]
    async fn no_reply_is_paired_once_the_oldest_query_is_overdue() {
        let (l, mut rx) = link();
        let soon = Instant::now() + Duration::from_secs(1);
        let mut p1 = l.look_up(b("s1"), soon).unwrap();
        let mut p2 = l.look_up(b("s2"), later()).unwrap();
        l.deliver(b("a"));
        tokio::time::advance(Duration::from_secs(2)).await;
        let q3 = l.query(b("s3"), later());
        l.reply(Value::Int(2));
        l.reply(Value::Int(3));
        assert_eq!(
            p1.reply.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "s1 must not take s2's answer"
        );
        assert_eq!(
            p2.reply.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "s2 must not take s3's answer"
        );
        assert_eq!(q3.await, Err(LinkError::Unavailable));
        assert!(l.untrusted.is_cancelled(), "the connection must close");
        assert_eq!(written(&mut rx), ["s1", "s2"], "nothing written after");
        // The held push, and the refused query.
        assert_eq!(dropped(&l), 2);
        drop((p1, p2));
        assert_eq!(dropped(&l), 4, "and both places");
        assert!(!l.deliver(b("a")), "nothing more is taken");
    }

    // Without a reply to come, the query's own deadline gives the link up.
    #[tokio::test(start_paused = true)]
    async fn a_query_unanswered_by_its_deadline_gives_the_link_up() {
        let (l, mut rx) = link();
        let mut q = std::pin::pin!(l.query(b("s1"), Instant::now() + Duration::from_secs(1)));
        assert!(started(q.as_mut()).is_pending());
        let mut p = l.look_up(b("s2"), later()).unwrap();
        // Time moves on while the test waits.
        assert_eq!(q.await, Err(LinkError::Unanswered));
        assert!(l.untrusted.is_cancelled());
        assert_eq!(
            p.reply.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "what waits on the link fails at once"
        );
        assert_eq!(written(&mut rx), ["s1", "s2"]);
        assert!(!l.send(b("bind")), "nothing more is taken");
    }

    // A reply with no query waiting shows the gateway's replies are out of
    // step with the queries, so the next one could be paired wrongly too.
    #[tokio::test]
    async fn a_reply_nobody_asked_for_gives_the_link_up() {
        let (l, _rx) = link();
        l.reply(Value::Int(1));
        assert!(l.untrusted.is_cancelled());
        assert_eq!(l.query(b("s1"), later()).await, Err(LinkError::Unavailable));
    }

    #[test]
    fn replies_and_frames_are_told_apart() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&plain(cmd::ON_CONNECT, 7, Bytes::new()));
        buf.extend_from_slice(&[0, 0, 0, 4]);
        buf.extend_from_slice(b"i:1;");
        buf.extend_from_slice(&plain(cmd::ON_CLOSE, 7, Bytes::new()));
        let mut d = LinkDecoder::new(1 << 20);
        let mut got = Vec::new();
        // Fed one byte at a time: every split point is handled.
        let mut src = BytesMut::new();
        for b in buf {
            src.extend_from_slice(&[b]);
            while let Some(i) = d.decode(&mut src).unwrap() {
                got.push(i);
            }
        }
        assert!(matches!(&got[0], Incoming::Frame(f) if f.header.cmd == cmd::ON_CONNECT));
        assert!(matches!(&got[1], Incoming::Reply(Value::Int(1))));
        assert!(matches!(&got[2], Incoming::Frame(f) if f.header.cmd == cmd::ON_CLOSE));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn a_huge_reply_length_is_refused_before_it_arrives() {
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, b'a'][..]);
        assert!(LinkDecoder::new(1 << 20).decode(&mut src).is_err());
    }
}
