//! The life of one accepted connection, whatever its transport.
//!
//! One task per connection reads frames and hands them to the application,
//! writes what its [`Outbox`] holds in batches (one flush per batch), pings, and
//! enforces the idle and write timeouts. A write that stalls is raced against
//! close requests and the write timeout, so a client that stops reading is
//! closed without delaying anyone else.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

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
pub(crate) trait Wire: Send {
    /// The next inbound event. Must be cancel-safe: it is raced against writes.
    fn recv(&mut self) -> impl Future<Output = Incoming> + Send;
    /// Writes every frame of `batch` (draining it) with one flush at the end.
    /// Returns how many frames could not be framed and were skipped.
    fn send_batch(
        &mut self,
        batch: &mut VecDeque<Frame>,
    ) -> impl Future<Output = Result<u32, CloseReason>> + Send;
    /// Sends a keep-alive.
    fn ping(&mut self) -> impl Future<Output = Result<(), CloseReason>> + Send;
    /// Ends the connection for `reason` (close frame, close handshake, shutdown).
    fn close(&mut self, reason: &CloseReason) -> impl Future<Output = ()> + Send;
}

/// Runs an accepted connection to its end, then unregisters it and tells the
/// application why it closed.
///
/// Not an `async fn`: its arguments would be kept in its future beside the
/// copies `drive` holds, for the whole life of the connection.
pub(crate) fn run<W: Wire>(
    hub: Hub,
    conn: ConnId,
    outbox: Arc<Outbox>,
    wire: W,
    transport: Transport,
) -> impl Future<Output = ()> + Send {
    let span = tracing::debug_span!("conn", node = %hub.node_id(), conn = %conn, ?transport);
    drive(hub, conn, outbox, wire, transport).instrument(span)
}

async fn drive<W: Wire>(
    hub: Hub,
    conn: ConnId,
    outbox: Arc<Outbox>,
    mut wire: W,
    transport: Transport,
) {
    let limits = hub.limits();
    let idle = match transport {
        Transport::Tcp => limits.tcp_idle_timeout,
        _ => limits.ws_idle_timeout,
    };
    let (write_timeout, close_timeout) = (limits.write_timeout, limits.close_timeout);
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + limits.heartbeat, limits.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_in = Instant::now();
    let mut batch = VecDeque::new();
    // The greeting waits until the cluster can reach this connection, so that a
    // welcomed client is reachable from every node.
    // Boxed, like every rare path below: the task's future is sized by its
    // largest state, and an idle connection is mostly this future.
    Box::pin(hub.settle()).await;
    tracing::debug!("open");

    let reason = loop {
        tokio::select! {
            () = outbox.wait() => {
                if let Some(reason) = flush(&hub, &mut wire, &outbox, &mut batch, write_timeout, close_timeout).await {
                    break reason;
                }
            }
            incoming = wire.recv() => match incoming {
                Incoming::Frame(frame) => {
                    last_in = Instant::now();
                    Counters::add(&hub.counters().frames_in, 1);
                    hub.handler().on_message(&hub, &conn, frame).await;
                }
                Incoming::Alive => last_in = Instant::now(),
                Incoming::Closed(reason) => break reason,
            },
            _ = heartbeat.tick() => {
                if let Some(idle) = idle && last_in.elapsed() >= idle {
                    break CloseReason::IdleTimeout;
                }
                match Box::pin(tokio::time::timeout(write_timeout, wire.ping())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => break reason,
                    Err(_) => break CloseReason::SlowConsumer,
                }
            }
        }
    };

    // Unregister first, so that nothing more is queued to a closing connection.
    hub.forget(&conn, &reason);
    let _ = Box::pin(tokio::time::timeout(close_timeout, async {
        if reason.flush_first() {
            flush(
                &hub,
                &mut wire,
                &outbox,
                &mut batch,
                close_timeout,
                close_timeout,
            )
            .await;
        }
        wire.close(&reason).await;
    }))
    .await;
    tracing::debug!(%reason, "closed");
    hub.handler().on_close(&hub, &conn, &reason).await;
}

/// Writes everything queued, batch after batch, until the queue is empty.
/// Returns a close reason when the connection must end.
async fn flush<W: Wire>(
    hub: &Hub,
    wire: &mut W,
    outbox: &Outbox,
    batch: &mut VecDeque<Frame>,
    write_timeout: std::time::Duration,
    close_timeout: std::time::Duration,
) -> Option<CloseReason> {
    loop {
        let closing = outbox.drain(batch);
        if let Some(reason) = &closing
            && !reason.flush_first()
        {
            batch.clear();
            return closing;
        }
        if batch.is_empty() {
            return closing;
        }
        let mut write = pin!(wire.send_batch(batch));
        // Most writes complete at once (the socket buffer has room): only a write
        // that would block pays for a timer and a race against close requests.
        let result =
            match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(r) => r,
                // Boxed: its timers would otherwise size every connection's task.
                Poll::Pending => Box::pin(async {
                    tokio::select! {
                        r = &mut write => r,
                        reason = outbox.wait_closing() => {
                            if reason.flush_first() {
                                match tokio::time::timeout(close_timeout, &mut write).await {
                                    Ok(r) => r,
                                    Err(_) => Err(reason),
                                }
                            } else {
                                Err(reason)
                            }
                        }
                        () = tokio::time::sleep(write_timeout) => Err(CloseReason::SlowConsumer),
                    }
                })
                .await,
            };
        match result {
            Ok(skipped) => Counters::add(&hub.counters().frames_dropped, u64::from(skipped)),
            Err(reason) => return Some(reason),
        }
    }
}
