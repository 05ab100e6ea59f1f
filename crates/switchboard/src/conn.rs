//! The life of one accepted connection, whatever its transport.
//!
//! One task per connection reads frames and hands them to the application,
//! writes what its [`Outbox`] holds in batches (what pushes could not write
//! directly), pings, and enforces the idle and write timeouts. A write that stalls is raced against
//! close requests and the write timeout, so a client that stops reading is
//! closed without delaying anyone else.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::Either;
use switchboard_core::{ConnId, Frame};

use crate::config::{Bucket, Take};
use crate::handler::{CloseReason, Transport};
use crate::hub::Hub;
use crate::outbox::Outbox;
use crate::stats::{Counters, Dropped};

/// What a transport read.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A message for the application.
    Frame(Frame),
    /// Proof of life that is not a message (ping, pong).
    Alive,
    /// The connection is over.
    Closed(CloseReason),
}

/// A transport, as the connection task sees it.
///
/// Writing is non-blocking ([`Wire::try_flush`]) with a separate wait for room
/// ([`Wire::writable`]): the common case, a socket with room, costs no future
/// state in the connection's task.
pub(crate) trait Wire: Send {
    /// The next inbound event. Must be cancel-safe: it is raced against writes.
    fn recv(&mut self) -> impl Future<Output = Incoming> + Send;
    /// Writes what the transport holds (control frames) and what `outbox`
    /// holds, as far as the socket takes it now.
    fn try_flush(&mut self, outbox: &Outbox) -> Result<Flushed, CloseReason>;
    /// Waits until the socket may take more.
    fn writable(&mut self) -> impl Future<Output = Result<(), CloseReason>> + Send;
    /// Queues a keep-alive (the next flush writes it).
    fn ping(&mut self) -> Result<(), CloseReason>;
    /// Queues a last frame that says why the server closes, for a transport
    /// with no close frame of its own (TCP); the next flush writes it.
    fn notify(&mut self, frame: &Frame) {
        let _ = frame;
    }
    /// Whether the transport holds bytes of its own to write (a pong).
    fn wants_flush(&self) -> bool {
        false
    }
    /// Ends the connection for `reason` (close frame, close handshake,
    /// shutdown), after what `outbox` still holds of a frame begun.
    fn close(&mut self, outbox: &Outbox, reason: &CloseReason) -> impl Future<Output = ()> + Send;
}

/// The outcome of a non-blocking flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Flushed {
    /// Everything is written.
    pub(crate) done: bool,
    /// Frames of the outbox written (whole), for [`HubStats::frames_written`](crate::HubStats).
    pub(crate) written: u32,
    /// Frames that could not be framed for this transport and were dropped.
    pub(crate) skipped: u32,
}

impl Flushed {
    pub(crate) const BLOCKED: Flushed = Flushed {
        done: false,
        written: 0,
        skipped: 0,
    };
}

/// Runs an accepted connection to its end, then unregisters it and tells the
/// application why it closed.
///
/// An `async move` block and not an `async fn`: an `async fn` keeps its
/// arguments in its future beside the locals they move into, for the whole
/// life of the connection, and an idle connection is mostly this future.
// An `async fn` keeps its arguments twice (see above).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<W: Wire>(
    hub: Hub,
    conn: ConnId,
    outbox: Arc<Outbox>,
    mut wire: W,
    transport: Transport,
    settled: bool,
) -> impl Future<Output = ()> + Send {
    // No span per connection: it would cost every idle connection 40 bytes
    // of task (and a larger allocation class). Events name the connection.
    async move {
        // The greeting waits until the cluster can reach this connection, so
        // that a welcomed client is reachable from every node (`settled`: the
        // caller waited already, and wrote the greeting).
        // Boxed, like every rare path below: the task's future is sized by its
        // largest state, and an idle connection is mostly this future. For the
        // same reason the keep-alive is the hub's (see `Outbox::keepalive`),
        // not a timer here.
        if !settled {
            Box::pin(hub.settle()).await;
        }
        tracing::debug!(node = %hub.node_id(), %conn, ?transport, "open");

        // Only rate-limited connections pay for a bucket, on the heap: an
        // idle connection is mostly this future.
        let mut bucket = hub
            .limits()
            .message_rate
            .map(|l| Box::new(Bucket::new(&l, hub.clock_ms())));
        // Messages handled in a row: see `FAIR_SHARE`.
        let mut in_a_row: u8 = 0;
        let reason = loop {
            tokio::select! {
                () = outbox.wait() => {
                    if outbox.take_ping() && let Err(reason) = wire.ping() {
                        break reason;
                    }
                    if let Some(reason) = flush(&hub, &mut wire, &outbox).await {
                        break reason;
                    }
                }
                incoming = wire.recv() => match incoming {
                    Incoming::Frame(frame) => {
                        let now = hub.clock_ms();
                        outbox.heard(now);
                        Counters::add(&hub.counters().frames_in, 1);
                        let take = match (bucket.as_deref_mut(), &hub.limits().message_rate) {
                            (Some(b), Some(limit)) => b.take(limit, now),
                            _ => Take::Allow,
                        };
                        match take {
                            Take::Allow => hub.handler().on_message(&hub, &conn, frame).await,
                            Take::Over => {
                                Counters::add(&hub.counters().rate_limited, 1);
                                hub.handler().on_rate_limited(&hub, &conn).await;
                            }
                            Take::Abuse => {
                                Counters::add(&hub.counters().rate_limited, 1);
                                break policy_close(&hub);
                            }
                        }
                        in_a_row = in_a_row.wrapping_add(1);
                    }
                    Incoming::Alive => {
                        outbox.heard(hub.clock_ms());
                        if wire.wants_flush()
                            && let Some(reason) = flush(&hub, &mut wire, &outbox).await
                        {
                            break reason;
                        }
                    }
                    Incoming::Closed(reason) => break reason,
                },
            }
            // Here, where nothing of the select is alive, so that the yield
            // adds no state to an idle connection's future.
            if in_a_row >= FAIR_SHARE {
                in_a_row = 0;
                tokio::task::yield_now().await;
            }
        };

        // Unregister first, so that nothing more is queued to a closing connection.
        hub.forget(&conn, &reason, transport);
        let close_timeout = hub.limits().close_timeout;
        let _ = Box::pin(tokio::time::timeout(close_timeout, async {
            if reason.flush_first() {
                flush(&hub, &mut wire, &outbox).await;
            } else {
                discard(&hub, &outbox, &reason);
            }
            let told = !matches!(reason, CloseReason::Client { .. } | CloseReason::Io(_));
            if let Some(notice) = told
                .then(|| hub.handler().close_notice(&hub, &reason))
                .flatten()
            {
                wire.notify(&notice);
                while let Ok(f) = wire.try_flush(&outbox) {
                    counted(&hub, f);
                    if f.done || wire.writable().await.is_err() {
                        break;
                    }
                }
            }
            wire.close(&outbox, &reason).await;
        }))
        .await;
        tracing::debug!(node = %hub.node_id(), %conn, %reason, "closed");
        hub.handler().on_close(&hub, &conn, &reason).await;
    }
}

/// A client's messages already in the read buffer are decoded without
/// touching the socket, so tokio's cooperative budget never runs out on them:
/// without a yield of its own, a burst of thousands would be handled in one
/// go, starving every other connection on this worker thread. The task yields
/// every this many messages.
const FAIR_SHARE: u8 = 32;

/// Why a client that keeps sending over its rate is closed.
fn policy_close(hub: &Hub) -> CloseReason {
    let rate = hub.limits().message_rate.map_or(0.0, |l| l.per_second);
    CloseReason::Policy(format!(
        "kept sending over the limit of {rate} messages a second"
    ))
}

/// Writes everything queued. Returns a close reason when the connection must
/// end.
///
/// A socket with room is the common case and is done at once, with no future
/// state: only a full socket pays for the (boxed) wait, raced against close
/// requests and the write timeout.
fn flush<'a, W: Wire>(
    hub: &'a Hub,
    wire: &'a mut W,
    outbox: &'a Outbox,
) -> impl Future<Output = Option<CloseReason>> + Send + 'a {
    match flush_now(hub, wire, outbox) {
        Step::Done(r) => Either::Left(std::future::ready(r)),
        Step::Blocked => Either::Right(Box::pin(flush_blocked(hub, wire, outbox))),
    }
}

enum Step {
    Done(Option<CloseReason>),
    Blocked,
}

/// One non-blocking pass: everything written, the connection to end, or the
/// socket full.
fn flush_now<W: Wire>(hub: &Hub, wire: &mut W, outbox: &Outbox) -> Step {
    let closing = outbox.closing();
    if let Some(reason) = &closing
        && !reason.flush_first()
    {
        discard(hub, outbox, reason);
        return Step::Done(closing);
    }
    match wire.try_flush(outbox) {
        Ok(f) => {
            counted(hub, f);
            if f.done {
                Step::Done(closing)
            } else {
                Step::Blocked
            }
        }
        Err(reason) => Step::Done(Some(reason)),
    }
}

/// Counts what a flush wrote and dropped.
fn counted(hub: &Hub, f: Flushed) {
    let c = hub.counters();
    Counters::add(&c.written, u64::from(f.written));
    c.dropped(Dropped::Unframable, u64::from(f.skipped));
}

/// Drops what a connection closing for `reason` still has queued (the rest
/// of a frame begun aside). What a slow consumer never got is counted as
/// dropped: the node could not deliver it. Other closes are the client's
/// doing (it left, idled, broke a rule), and its frames are not counted.
fn discard(hub: &Hub, outbox: &Outbox, reason: &CloseReason) {
    let dropped = outbox.discard();
    if *reason == CloseReason::SlowConsumer {
        hub.counters()
            .dropped(Dropped::SlowConsumer, dropped as u64);
    }
}

async fn flush_blocked<W: Wire>(hub: &Hub, wire: &mut W, outbox: &Outbox) -> Option<CloseReason> {
    let limits = hub.limits();
    loop {
        let closing = outbox.closing();
        let limit = if closing.is_some() {
            limits.close_timeout
        } else {
            limits.write_timeout
        };
        let waited = tokio::select! {
            r = wire.writable() => r.err(),
            // A close request that does not flush ends the wait; one that
            // does continues it under the close timeout.
            reason = outbox.wait_closing(), if closing.is_none() => {
                (!reason.flush_first()).then_some(reason)
            }
            () = tokio::time::sleep(limit) => Some(closing.unwrap_or(CloseReason::SlowConsumer)),
        };
        if let Some(reason) = waited {
            return Some(reason);
        }
        match flush_now(hub, wire, outbox) {
            Step::Done(r) => return r,
            Step::Blocked => {}
        }
    }
}
