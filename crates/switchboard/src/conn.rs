//! The life of one accepted connection, whatever its transport.
//!
//! One task per connection reads frames and hands them to the application,
//! writes what its [`Outbox`] holds in batches (what pushes could not write
//! directly), pings, and enforces the idle and write timeouts. A write that stalls is raced against
//! close requests and the write timeout, so a client that stops reading is
//! closed without delaying anyone else.

use std::future::Future;
use std::sync::Arc;

use switchboard_core::{ConnId, Frame};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use crate::handler::{CloseReason, Transport};
use crate::hub::Hub;
use crate::outbox::Outbox;
use crate::stats::Counters;

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
    /// Frames that could not be framed for this transport and were dropped.
    pub(crate) skipped: u32,
}

impl Flushed {
    pub(crate) const DONE: Flushed = Flushed {
        done: true,
        skipped: 0,
    };
    pub(crate) const BLOCKED: Flushed = Flushed {
        done: false,
        skipped: 0,
    };
}

/// Runs an accepted connection to its end, then unregisters it and tells the
/// application why it closed.
///
/// An `async move` block and not an `async fn`: an `async fn` keeps its
/// arguments in its future beside the locals they move into, for the whole
/// life of the connection, and an idle connection is mostly this future.
pub(crate) fn run<W: Wire>(
    hub: Hub,
    conn: ConnId,
    outbox: Arc<Outbox>,
    mut wire: W,
    transport: Transport,
) -> impl Future<Output = ()> + Send {
    let span = tracing::debug_span!("conn", node = %hub.node_id(), conn = %conn, ?transport);
    async move {
        let limits = hub.limits();
        let idle = match transport {
            Transport::Tcp => limits.tcp_idle_timeout,
            _ => limits.ws_idle_timeout,
        };
        let timeouts = Timeouts {
            write: limits.write_timeout,
            close: limits.close_timeout,
        };
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + limits.heartbeat, limits.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_in = Instant::now();
        // The greeting waits until the cluster can reach this connection, so
        // that a welcomed client is reachable from every node.
        // Boxed, like every rare path below: the task's future is sized by its
        // largest state.
        Box::pin(hub.settle()).await;
        tracing::debug!("open");

        let reason = loop {
            tokio::select! {
                () = outbox.wait() => {
                    if let Some(reason) = flush(&hub, &mut wire, &outbox, timeouts).await {
                        break reason;
                    }
                }
                incoming = wire.recv() => match incoming {
                    Incoming::Frame(frame) => {
                        last_in = Instant::now();
                        Counters::add(&hub.counters().frames_in, 1);
                        hub.handler().on_message(&hub, &conn, frame).await;
                    }
                    Incoming::Alive => {
                        last_in = Instant::now();
                        if wire.wants_flush()
                            && let Some(reason) = flush(&hub, &mut wire, &outbox, timeouts).await
                        {
                            break reason;
                        }
                    }
                    Incoming::Closed(reason) => break reason,
                },
                _ = heartbeat.tick() => {
                    if let Some(idle) = idle && last_in.elapsed() >= idle {
                        break CloseReason::IdleTimeout;
                    }
                    if let Err(reason) = wire.ping() {
                        break reason;
                    }
                    if let Some(reason) = flush(&hub, &mut wire, &outbox, timeouts).await {
                        break reason;
                    }
                }
            }
        };

        // Unregister first, so that nothing more is queued to a closing connection.
        hub.forget(&conn, &reason);
        let _ = Box::pin(tokio::time::timeout(timeouts.close, async {
            if reason.flush_first() {
                let t = Timeouts {
                    write: timeouts.close,
                    close: timeouts.close,
                };
                flush(&hub, &mut wire, &outbox, t).await;
            } else {
                outbox.discard();
            }
            wire.close(&outbox, &reason).await;
        }))
        .await;
        tracing::debug!(%reason, "closed");
        hub.handler().on_close(&hub, &conn, &reason).await;
    }
    .instrument(span)
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    write: std::time::Duration,
    close: std::time::Duration,
}

/// Writes everything queued until the queue is empty. Returns a close reason
/// when the connection must end.
///
/// A socket with room is the common case and costs no awaiting: only a full
/// socket pays for the (boxed) wait, raced against close requests and the
/// write timeout.
async fn flush<W: Wire>(
    hub: &Hub,
    wire: &mut W,
    outbox: &Outbox,
    timeouts: Timeouts,
) -> Option<CloseReason> {
    loop {
        let closing = outbox.closing();
        if let Some(reason) = &closing
            && !reason.flush_first()
        {
            outbox.discard();
            return closing;
        }
        match wire.try_flush(outbox) {
            Ok(f) => {
                Counters::add(&hub.counters().frames_dropped, u64::from(f.skipped));
                if f.done {
                    return closing;
                }
            }
            Err(reason) => return Some(reason),
        }
        if let Some(reason) = Box::pin(wait_for_room(wire, outbox, closing, timeouts)).await {
            return Some(reason);
        }
    }
}

/// Waits until the socket may take more; a close reason if the connection
/// must end first.
async fn wait_for_room<W: Wire>(
    wire: &mut W,
    outbox: &Outbox,
    closing: Option<CloseReason>,
    timeouts: Timeouts,
) -> Option<CloseReason> {
    let limit = if closing.is_some() {
        timeouts.close
    } else {
        timeouts.write
    };
    tokio::select! {
        r = wire.writable() => r.err(),
        // A close request that does not flush ends the wait; one that does
        // continues it under the close timeout.
        reason = outbox.wait_closing(), if closing.is_none() => {
            (!reason.flush_first()).then_some(reason)
        }
        () = tokio::time::sleep(limit) => Some(closing.unwrap_or(CloseReason::SlowConsumer)),
    }
}
