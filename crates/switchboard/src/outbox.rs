//! A connection's bounded outbound queue.
//!
//! Pushes append a shared [`Frame`] (a reference-count increment, no copy) under
//! a short mutex; the connection's task moves up to [`BATCH`] frames at a time
//! out of it onto its stack and writes them in one system call. The queue keeps
//! its buffer meanwhile, so pushes that come during a write allocate nothing.
//! It holds its first frame in place, so a connection that gets one frame at a
//! time (a paced fan-out, a welcome) never allocates at all, and an idle one
//! keeps no buffer; the hub's keep-alive frees the buffers that bursts left
//! behind (see [`Outbox::keepalive`]). When the queue is full the
//! [`SlowConsumer`] policy applies: close the connection (default) or drop the
//! frame.
//!
//! A std mutex and not a tokio one: it is held for a few instructions and never
//! across an `.await`. The writer is woken through an `AtomicWaker` and a flag,
//! not a `Notify`: one consumer, and waking it must cost as little as possible
//! since a fan-out wakes thousands of them.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use switchboard_core::{Frame, Position};

use crate::config::SlowConsumer;
use crate::handler::CloseReason;

/// The outcome of queueing one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Queued for writing.
    Yes,
    /// The queue is full and the frame was dropped; the connection stays.
    Dropped,
    /// The queue is full and the connection is being closed as slow.
    Overflowed,
    /// The connection is closing; the frame was not queued.
    Closing,
    /// A recorded frame the connection already got from its replay.
    Repeat,
}

/// Frames a writer takes at a time: as many as one `writev` carries.
pub(crate) const BATCH: usize = 16;

/// Frames moved out of an outbox for one write, on the writer's stack.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    frames: [Option<Frame>; BATCH],
    head: usize,
    len: usize,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Frame> + Clone {
        self.frames[self.head..self.head + self.len]
            .iter()
            .flatten()
    }

    pub(crate) fn pop_front(&mut self) -> Option<Frame> {
        if self.len == 0 {
            return None;
        }
        let frame = self.frames[self.head].take();
        self.head += 1;
        self.len -= 1;
        frame
    }

    /// Drops the first `n` frames (written whole), or all if fewer.
    pub(crate) fn consume(&mut self, n: usize) {
        for _ in 0..n.min(self.len) {
            self.pop_front();
        }
    }
}

impl Iterator for Batch {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        self.pop_front()
    }
}

/// Frames in order: `first`, then `more`. `first` is `None` only when the
/// queue is empty.
#[derive(Debug, Default)]
struct Queue {
    first: Option<Frame>,
    more: VecDeque<Frame>,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn push_back(&mut self, frame: Frame) {
        if self.first.is_none() {
            self.first = Some(frame);
        } else {
            self.more.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Frame> {
        let frame = self.first.take();
        self.first = self.more.pop_front();
        frame
    }

    fn push_front(&mut self, frame: Frame) {
        if let Some(old) = self.first.replace(frame) {
            self.more.push_front(old);
        }
    }

    fn bytes(&self) -> usize {
        self.first.iter().chain(&self.more).map(Frame::len).sum()
    }
}

#[derive(Debug, Default)]
struct State {
    queue: Queue,
    bytes: usize,
    /// Bytes of the first frame already written (a write the socket took
    /// only in part; see [`Outbox::put_back`]).
    offset: usize,
    /// Boxed: rare, and it keeps every outbox smaller.
    closing: Option<Box<CloseReason>>,
    /// Set for a connection that recovers streams. Boxed, as `closing`.
    recovery: Option<Box<Recovery>>,
}

/// A connection recovering streams on connect: until its replay is queued,
/// every frame for it is held, and afterwards a recorded frame of one of
/// those streams at or before what the client got is dropped. This is what
/// makes the seam exact: pushes keep flowing while the history is read, and
/// a recorded push may arrive from another node after its entry was
/// replayed.
#[derive(Debug, Default)]
struct Recovery {
    /// The recovered streams, and the latest position the client got of each.
    last: Vec<(Box<str>, Option<Position>)>,
    /// While the replay is read: what arrived meanwhile, in order, with the
    /// recovered stream and position of a recorded frame.
    held: Option<Vec<(Option<Mark>, Frame)>>,
}

/// A held recorded frame: which recovered stream (its index) and where.
type Mark = (usize, Position);

/// Capacity limits of one outbox, and how long its connection may stay silent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
    pub(crate) policy: SlowConsumer,
    /// Milliseconds without anything from the client before it is closed;
    /// 0 for never.
    pub(crate) idle_ms: u64,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Set when there is something for the writer to look at.
    signal: AtomicBool,
    waker: AtomicWaker,
    /// Shared by every connection of a transport.
    caps: Arc<Caps>,
    /// When the client was last heard from, in the hub's clock (ms).
    last_in: AtomicU64,
    /// The hub's keep-alive asks the connection to ping its client.
    ping: AtomicBool,
}

impl Outbox {
    pub(crate) fn new(caps: impl Into<Arc<Caps>>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            signal: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            caps: caps.into(),
            last_in: AtomicU64::new(0),
            ping: AtomicBool::new(false),
        }
    }

    /// Records that the client was heard from at `now_ms` (the hub's clock).
    pub(crate) fn heard(&self, now_ms: u64) {
        self.last_in.store(now_ms, Ordering::Relaxed);
    }

    /// The hub's keep-alive, once per heartbeat: closes a connection silent
    /// for longer than its idle limit, or asks it to ping its client. One
    /// sweep over the connections replaces a timer in each of them.
    ///
    /// It also frees an empty spill buffer, so a connection that had a burst
    /// does not keep its memory for life; one that keeps getting bursts
    /// allocates again once per heartbeat.
    pub(crate) fn keepalive(&self, now_ms: u64) {
        {
            let mut s = self.lock();
            if s.queue.more.is_empty() && s.queue.more.capacity() > 0 {
                s.queue.more = VecDeque::new();
            }
        }
        let silent = now_ms.saturating_sub(self.last_in.load(Ordering::Relaxed));
        if self.caps.idle_ms > 0 && silent >= self.caps.idle_ms {
            self.close(CloseReason::IdleTimeout);
        } else {
            self.ping.store(true, Ordering::Relaxed);
            self.wake();
        }
    }

    /// Whether the keep-alive asked for a ping since the last call.
    pub(crate) fn take_ping(&self) -> bool {
        self.ping.swap(false, Ordering::Relaxed)
    }

    fn wake(&self) {
        self.signal.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every
        // mutation is a single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame for writing.
    pub(crate) fn push(&self, frame: &Frame) -> Queued {
        self.push_marked(frame, None)
    }

    /// Queues a recorded frame: the entry at `pos` of `stream`.
    pub(crate) fn push_recorded(&self, frame: &Frame, stream: &str, pos: Position) -> Queued {
        self.push_marked(frame, Some((stream, pos)))
    }

    fn push_marked(&self, frame: &Frame, mark: Option<(&str, Position)>) -> Queued {
        let mut s = self.lock();
        if s.closing.is_some() {
            return Queued::Closing;
        }
        if let Some(r) = s.recovery.as_deref_mut() {
            let mark = mark.and_then(|(stream, pos)| {
                let i = r.last.iter().position(|(s, _)| &**s == stream)?;
                Some((i, pos))
            });
            if let Some((i, pos)) = mark
                && r.last[i].1.is_some_and(|last| pos.covered_by(&last))
            {
                return Queued::Repeat;
            }
            if let Some(held) = r.held.as_mut() {
                if held.len() < self.caps.frames {
                    held.push((mark, frame.clone()));
                    return Queued::Yes;
                }
                return self.full(s);
            }
            if let Some((i, pos)) = mark {
                r.last[i].1 = Some(pos);
            }
        }
        let full = s.queue.len() >= self.caps.frames
            || (s.bytes + frame.len() > self.caps.bytes && !s.queue.is_empty());
        if full {
            return self.full(s);
        }
        let was_empty = s.queue.is_empty();
        s.bytes += frame.len();
        s.queue.push_back(frame.clone());
        drop(s);
        // The writer drains everything each time it wakes, so only the push that
        // makes the queue non-empty needs to wake it.
        if was_empty {
            self.wake();
        }
        Queued::Yes
    }

    /// A frame that does not fit: the slow-consumer policy.
    fn full(&self, mut s: std::sync::MutexGuard<'_, State>) -> Queued {
        match self.caps.policy {
            SlowConsumer::DropNewest => Queued::Dropped,
            SlowConsumer::Close => {
                s.closing = Some(Box::new(CloseReason::SlowConsumer));
                drop(s);
                self.wake();
                Queued::Overflowed
            }
        }
    }

    /// Starts holding every frame for this connection until
    /// [`Outbox::finish_recovery`]: called before the connection is visible
    /// to any push.
    pub(crate) fn begin_recovery(&self, streams: impl IntoIterator<Item = Box<str>>) {
        self.lock().recovery = Some(Box::new(Recovery {
            last: streams.into_iter().map(|s| (s, None)).collect(),
            held: Some(Vec::new()),
        }));
    }

    /// Queues the replay (`frames`, already in order: each stream's missed
    /// entries then its `recovered` frame), then what was held meanwhile,
    /// without the recorded frames the replay covered. `last[i]` is the latest
    /// position the client has of the i-th stream given to
    /// [`Outbox::begin_recovery`] (`None` when it could not recover it).
    ///
    /// The replay is not held to the frame cap: the history's read limit
    /// bounds it.
    pub(crate) fn finish_recovery(&self, frames: Vec<Frame>, last: Vec<Option<Position>>) {
        let mut s = self.lock();
        if s.closing.is_some() {
            return;
        }
        let State {
            queue,
            bytes,
            recovery,
            ..
        } = &mut *s;
        let Some(r) = recovery.as_deref_mut() else {
            return;
        };
        let was_empty = queue.is_empty();
        for f in frames {
            *bytes += f.len();
            queue.push_back(f);
        }
        for (slot, l) in r.last.iter_mut().zip(last) {
            slot.1 = l;
        }
        for (mark, frame) in r.held.take().unwrap_or_default() {
            if let Some((i, pos)) = mark {
                if r.last[i].1.is_some_and(|last| pos.covered_by(&last)) {
                    continue;
                }
                r.last[i].1 = Some(pos);
            }
            *bytes += frame.len();
            queue.push_back(frame);
        }
        let wake = was_empty && !queue.is_empty();
        drop(s);
        if wake {
            self.wake();
        }
    }

    /// Asks the connection to close. The first reason wins. Returns whether this
    /// call set it.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let mut s = self.lock();
        if s.closing.is_some() {
            return false;
        }
        s.closing = Some(Box::new(reason));
        drop(s);
        self.wake();
        true
    }

    /// Moves up to [`BATCH`] queued frames into `batch` (which must be
    /// empty) for writing; returns how many bytes of the first are written
    /// already (always 0 for a writer that never calls [`Outbox::put_back`]).
    pub(crate) fn take(&self, batch: &mut Batch) -> usize {
        debug_assert!(batch.is_empty());
        batch.head = 0;
        let mut s = self.lock();
        while batch.len < BATCH
            && let Some(frame) = s.queue.pop_front()
        {
            s.bytes -= frame.len();
            batch.frames[batch.len] = Some(frame);
            batch.len += 1;
        }
        std::mem::take(&mut s.offset)
    }

    /// Returns frames the socket did not take, ahead of anything queued
    /// meanwhile, with the bytes of the first already written.
    pub(crate) fn put_back(&self, mut left: Batch, offset: usize) {
        let mut s = self.lock();
        while left.len > 0 {
            left.len -= 1;
            if let Some(frame) = left.frames[left.head + left.len].take() {
                s.bytes += frame.len();
                s.queue.push_front(frame);
            }
        }
        s.offset = offset;
    }

    /// Drops every queued frame (a close that does not flush), except one
    /// partly written already: the peer must get it whole before anything
    /// else. Returns how many were dropped.
    pub(crate) fn discard(&self) -> usize {
        let mut s = self.lock();
        let before = s.queue.len();
        s.queue.more = VecDeque::new();
        if s.offset == 0 {
            s.queue.first = None;
        }
        s.bytes = s.queue.bytes();
        before - s.queue.len()
    }

    /// The close request, if any.
    pub(crate) fn closing(&self) -> Option<CloseReason> {
        self.lock().closing.as_deref().cloned()
    }

    /// Waits until frames are queued or a close is requested. Only the
    /// connection's own task waits (one waker).
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.signal.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake between the check and the registration set the flag.
            if self.signal.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Waits until a close is requested (used to abort a stalled write).
    pub(crate) async fn wait_closing(&self) -> CloseReason {
        loop {
            if let Some(r) = self.closing() {
                return r;
            }
            self.wait().await;
        }
    }

    /// Frames queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Bytes counted against the byte cap now.
    #[cfg(test)]
    fn counted_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(policy: SlowConsumer) -> Caps {
        Caps {
            frames: 3,
            bytes: 10,
            policy,
            idle_ms: 0,
        }
    }

    #[test]
    fn keepalive_pings_a_live_connection_and_closes_a_silent_one() {
        let o = Outbox::new(Caps {
            idle_ms: 1_000,
            ..caps(SlowConsumer::Close)
        });
        o.heard(5_000);
        o.keepalive(5_900);
        assert!(o.take_ping(), "asked to ping");
        assert!(!o.take_ping(), "once");
        assert_eq!(o.closing(), None);
        o.keepalive(6_000);
        assert_eq!(o.closing(), Some(CloseReason::IdleTimeout));

        let never = Outbox::new(caps(SlowConsumer::Close));
        never.keepalive(u64::MAX);
        assert_eq!(never.closing(), None, "no idle limit");
        assert!(never.take_ping());
    }

    #[test]
    fn close_policy_closes_on_overflow() {
        let o = Outbox::new(caps(SlowConsumer::Close));
        let f = Frame::text("ab");
        for _ in 0..3 {
            assert_eq!(o.push(&f), Queued::Yes);
        }
        assert_eq!(o.push(&f), Queued::Overflowed);
        assert_eq!(o.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(o.push(&f), Queued::Closing);
        assert_eq!(o.len(), 3);
    }

    /// An outbox with room to spare, holding "a", "b" and "c".
    fn abc() -> Outbox {
        let o = Outbox::new(Caps {
            frames: 10,
            bytes: 1000,
            ..caps(SlowConsumer::Close)
        });
        for t in ["a", "b", "c"] {
            o.push(&Frame::text(t));
        }
        o
    }

    #[test]
    fn a_batch_gives_its_frames_in_order_once() {
        let o = abc();
        let mut batch = Batch::default();
        o.take(&mut batch);
        let texts: Vec<_> = batch.map(|f| f.data().to_vec()).collect();
        assert_eq!(texts, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn the_byte_cap_is_inclusive_and_what_is_taken_is_given_back() {
        let o = Outbox::new(caps(SlowConsumer::DropNewest));
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
        assert_eq!(o.push(&Frame::text("1234")), Queued::Yes, "10 of 10 bytes");
        assert_eq!(o.push(&Frame::text("1")), Queued::Dropped, "11 of 10");
        let mut batch = Batch::default();
        o.take(&mut batch);
        batch.consume(2);
        // The bytes taken are free again: two 5-byte frames fit the 10.
        assert_eq!(o.push(&Frame::text("12345")), Queued::Yes);
        assert_eq!(o.push(&Frame::text("12345")), Queued::Yes);

        let o = Outbox::new(caps(SlowConsumer::DropNewest));
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
        let mut one = Batch::default();
        o.take(&mut one);
        one.consume(1);
        assert_eq!(o.push(&Frame::text("12345")), Queued::Yes);
        assert_eq!(
            o.push(&Frame::text("12345")),
            Queued::Yes,
            "nothing left counted"
        );
    }

    #[test]
    fn the_keepalive_frees_only_an_empty_spill_buffer() {
        let o = abc();
        o.keepalive(0);
        assert_eq!(o.len(), 3, "queued frames survive the keep-alive");
    }

    #[test]
    fn a_discard_counts_only_the_frame_begun() {
        let o = Outbox::new(Caps {
            frames: 10,
            bytes: 100,
            ..caps(SlowConsumer::Close)
        });
        for t in ["aaa", "bbbbb", "c"] {
            o.push(&Frame::text(t));
        }
        let mut batch = Batch::default();
        o.take(&mut batch);
        batch.pop_front();
        o.put_back(batch, 2);
        assert_eq!(o.counted_bytes(), 6);
        assert_eq!(o.discard(), 1, "the frame begun stays");
        assert_eq!((o.len(), o.counted_bytes()), (1, 5));
    }

    #[test]
    fn drop_policy_keeps_the_connection() {
        let o = Outbox::new(caps(SlowConsumer::DropNewest));
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
        // The byte cap applies too.
        assert_eq!(o.push(&Frame::text("123456")), Queued::Dropped);
        assert_eq!(o.closing(), None);
        let mut out = Batch::default();
        o.take(&mut out);
        assert_eq!(o.closing(), None);
        assert_eq!(out.len(), 1);
        out.consume(1);
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
    }

    #[test]
    fn frames_put_back_stay_ahead_of_later_pushes() {
        let o = abc();
        let mut batch = Batch::default();
        assert_eq!(o.take(&mut batch), 0);
        batch.pop_front(); // "a" went whole; "b" went in part.
        o.push(&Frame::text("d"));
        o.put_back(batch, 1);
        o.discard();
        let mut rest = Batch::default();
        assert_eq!(o.take(&mut rest), 1, "the part written is remembered");
        let texts: Vec<_> = rest.iter().map(|f| f.data().to_vec()).collect();
        assert_eq!(
            texts,
            vec![b"b".to_vec()],
            "a close keeps only the frame begun"
        );
    }

    #[test]
    fn an_oversized_frame_still_passes_an_empty_queue() {
        let o = Outbox::new(caps(SlowConsumer::Close));
        assert_eq!(o.push(&Frame::text("x".repeat(50))), Queued::Yes);
    }

    #[tokio::test]
    async fn first_push_wakes_the_writer() {
        let o = std::sync::Arc::new(Outbox::new(caps(SlowConsumer::Close)));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.wait().await });
        tokio::task::yield_now().await;
        o.push(&Frame::text("a"));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("writer woken")
            .expect("task");
        assert!(o.close(CloseReason::Shutdown));
        assert!(!o.close(CloseReason::SlowConsumer), "first reason wins");
        assert_eq!(o.wait_closing().await, CloseReason::Shutdown);
    }

    fn roomy() -> Outbox {
        Outbox::new(Caps {
            frames: 1000,
            bytes: 1 << 20,
            ..caps(SlowConsumer::Close)
        })
    }

    /// A writer's cycle as the connection's task runs it: take until the
    /// outbox comes back empty, writing each batch to the end.
    fn write_all(o: &Outbox) -> usize {
        let mut batch = Batch::default();
        let mut written = 0;
        loop {
            o.take(&mut batch);
            if batch.is_empty() {
                return written;
            }
            written += batch.len();
            batch.consume(usize::MAX);
        }
    }

    #[test]
    fn steady_pushes_and_writes_allocate_nothing() {
        let o = roomy();
        let frame = Frame::text("a paced fan-out: one frame per connection per message");
        let cycle = |burst: usize| {
            for _ in 0..burst {
                assert_eq!(o.push(&frame), Queued::Yes);
            }
            assert_eq!(write_all(&o), burst);
        };
        // Warm-up: the frame's first clone makes its payload shared, and the
        // first burst sizes the spill buffer.
        cycle(1);
        cycle(50);
        let single = crate::alloc_count::allocations(|| (0..1000).for_each(|_| cycle(1)));
        assert_eq!(single, 0, "one frame at a time");
        let bursts = crate::alloc_count::allocations(|| (0..1000).for_each(|_| cycle(50)));
        assert_eq!(bursts, 0, "bursts reuse the spill buffer");
        // Pushes that come while a batch is being written land in the
        // buffer the queue kept.
        let overlapping = crate::alloc_count::allocations(|| {
            for _ in 0..1000 {
                (0..20).for_each(|_| assert_eq!(o.push(&frame), Queued::Yes));
                let mut batch = Batch::default();
                o.take(&mut batch);
                (0..20).for_each(|_| assert_eq!(o.push(&frame), Queued::Yes));
                batch.consume(usize::MAX);
                assert_eq!(write_all(&o), 24);
            }
        });
        assert_eq!(overlapping, 0, "pushes during a write");
    }

    #[test]
    fn the_keepalive_frees_an_idle_spill_buffer() {
        let o = roomy();
        (0..100).for_each(|_| {
            o.push(&Frame::text("x"));
        });
        assert_eq!(write_all(&o), 100);
        assert!(
            o.lock().queue.more.capacity() >= 99,
            "kept for the next burst"
        );
        o.keepalive(0);
        assert_eq!(o.lock().queue.more.capacity(), 0, "freed once idle");
        // A queue of one frame never needs it.
        o.push(&Frame::text("y"));
        assert_eq!(o.lock().queue.more.capacity(), 0);
    }

    fn texts(o: &Outbox) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut b = Batch::default();
            o.take(&mut b);
            if b.is_empty() {
                return out;
            }
            out.extend(b.map(|f| f.as_text().unwrap().to_owned()));
        }
    }

    fn at(offset: u64) -> Position {
        Position { offset, epoch: 1 }
    }

    #[test]
    fn a_recovering_outbox_holds_live_frames_behind_its_replay_and_drops_repeats() {
        let o = Outbox::new(Caps {
            frames: 10,
            bytes: 1000,
            ..caps(SlowConsumer::Close)
        });
        o.push(&Frame::text("welcome"));
        o.begin_recovery(["user:u".into()]);
        assert_eq!(
            o.push_recorded(&Frame::text("e3"), "user:u", at(3)),
            Queued::Yes
        );
        assert_eq!(o.push(&Frame::text("plain")), Queued::Yes);
        assert_eq!(
            o.push_recorded(&Frame::text("e4"), "user:u", at(4)),
            Queued::Yes
        );
        // Another stream's entries are held too, never dropped.
        assert_eq!(
            o.push_recorded(&Frame::text("g1"), "group:g", at(1)),
            Queued::Yes
        );
        assert_eq!(texts(&o), ["welcome"], "held until the replay is queued");
        o.finish_recovery(
            vec![
                Frame::text("e2"),
                Frame::text("e3"),
                Frame::text("recovered"),
            ],
            vec![Some(at(3))],
        );
        assert_eq!(texts(&o), ["e2", "e3", "recovered", "plain", "e4", "g1"]);
        // Later: a repeat is dropped, a new entry passes.
        assert_eq!(
            o.push_recorded(&Frame::text("e4"), "user:u", at(4)),
            Queued::Repeat
        );
        assert_eq!(
            o.push_recorded(&Frame::text("e5"), "user:u", at(5)),
            Queued::Yes
        );
        // A new epoch is not a repeat.
        let new = Position {
            offset: 1,
            epoch: 2,
        };
        assert_eq!(
            o.push_recorded(&Frame::text("n1"), "user:u", new),
            Queued::Yes
        );
        assert_eq!(texts(&o), ["e5", "n1"]);
    }

    #[test]
    fn a_recovering_outbox_holds_no_more_than_its_cap() {
        let o = Outbox::new(caps(SlowConsumer::Close));
        o.begin_recovery(["user:u".into()]);
        for _ in 0..3 {
            assert_eq!(o.push(&Frame::text("x")), Queued::Yes);
        }
        assert_eq!(o.push(&Frame::text("x")), Queued::Overflowed);
        assert_eq!(o.closing(), Some(CloseReason::SlowConsumer));
    }
}
