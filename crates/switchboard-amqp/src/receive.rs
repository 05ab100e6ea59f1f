//! Receiving: one task reads the node's queue, hands envelopes to the node,
//! and keeps the liveness view from the control messages.
//!
//! Deliveries are acknowledged in batches once handed to the node (every
//! [`ACK_EVERY`] deliveries, or [`ACK_DELAY`] after the oldest one), so at
//! most [`PREFETCH`](crate::link::PREFETCH) wait in the client. An envelope whose
//! number was seen already (redelivered) is dropped and counted as a
//! duplicate; a jump in a stream's numbers is counted as lost
//! (`receive_dropped`). A consumer that the broker cancels, or whose channel
//! or connection fails, fails the session, which the supervisor replaces.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Acker, Consumer};
use switchboard_core::backplane::Inbound;
use tokio_util::sync::CancellationToken;

use crate::link::Session;
use crate::wire::{self, Control, Copy, Message, Seen};
use crate::{Shared, publish_control};

/// Deliveries acknowledged at once, at most.
const ACK_EVERY: u32 = 256;
/// How long a delivery may wait for its acknowledgement: acknowledgements
/// go out in batches, one frame for many deliveries, even at low rates.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Why reading a session's queue stopped.
enum Ended {
    /// The node is stopping (or stopped taking envelopes).
    Stop,
    /// The session failed.
    Failed(String),
}

/// Reads every session's queue in turn until `stop`.
pub(crate) async fn consumer(shared: Arc<Shared>, inbound: Inbound, stop: CancellationToken) {
    loop {
        let Some(session) = shared.link.ready(&stop).await else {
            return;
        };
        let Some(mut consumer) = session.take_consumer() else {
            // This session's consumer already ended: wait for the next session.
            let mut rx = shared.link.subscribe();
            tokio::select! {
                () = stop.cancelled() => return,
                _ = rx.wait_for(|s| s.generation != session.generation) => continue,
            }
        };
        shared.heard_self();
        shared.receiving.store(true, Ordering::Release);
        // Announce (again): peers answer with who is alive, and the node
        // counts as alive to them before its first heartbeat.
        let hello = Control::Hello(shared.node().clone());
        let hello = publish_control(&shared, &session, wire::BROADCAST_KEY, &hello);
        match tokio::time::timeout(BROKER_OP_TIMEOUT, hello).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.link.failed(session.generation, &e),
            Err(_) => shared
                .link
                .failed(session.generation, &"the hello timed out"),
        }
        let ended = read(&shared, &session, &mut consumer, &inbound, &stop).await;
        shared.receiving.store(false, Ordering::Release);
        match ended {
            Ended::Stop => return,
            Ended::Failed(why) => shared.link.failed(session.generation, &why),
        }
    }
}

/// How long a broker operation of the reader may take: on a connection that
/// died without lapin noticing, an acknowledgement or a publish never
/// completes, and a reader waiting on it would never read the next session.
const BROKER_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn ack(acker: &Acker) -> Result<(), Ended> {
    match tokio::time::timeout(
        BROKER_OP_TIMEOUT,
        acker.ack(BasicAckOptions { multiple: true }),
    )
    .await
    {
        Ok(r) => r
            .map(drop)
            .map_err(|e| Ended::Failed(format!("acknowledging deliveries failed: {e}"))),
        Err(_) => Err(Ended::Failed("acknowledging deliveries timed out".into())),
    }
}

async fn read(
    shared: &Shared,
    session: &Session,
    consumer: &mut Consumer,
    inbound: &Inbound,
    stop: &CancellationToken,
) -> Ended {
    let mut unacked = 0u32;
    let mut last: Option<Acker> = None;
    // When the oldest unacknowledged delivery must be acknowledged at the latest.
    let timer = tokio::time::sleep(ACK_DELAY);
    tokio::pin!(timer);
    // A consumer whose connection died does not always end: a session
    // retired for any reason (a failed publish, a deaf queue) ends its read,
    // or the node would keep reading a dead consumer while its new session's
    // queue went unread.
    let mut state = shared.link.subscribe();
    let generation = session.generation;
    let retired = async move {
        let gone = |s: &crate::link::LinkState| {
            s.session
                .as_ref()
                .is_none_or(|x| x.generation != generation)
        };
        // The guard it returns is not `Send`: drop it at once.
        let _ = state.wait_for(gone).await.map(drop);
    };
    tokio::pin!(retired);
    loop {
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => return Ended::Stop,
            () = &mut retired => return Ended::Failed("the session was retired".into()),
            item = consumer.next() => item,
            () = &mut timer, if last.is_some() => {
                unacked = 0;
                if let Some(a) = last.take()
                    && let Err(e) = ack(&a).await
                {
                    return e;
                }
                continue;
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Ended::Failed(format!("consumer failed: {e}")),
            None => return Ended::Failed("consumer cancelled by the broker".into()),
        };
        let acker = delivery.acker.clone();
        if !handle(shared, session, delivery, inbound).await {
            return Ended::Stop;
        }
        if last.is_none() {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + ACK_DELAY);
        }
        unacked += 1;
        last = Some(acker);
        if unacked >= ACK_EVERY
            && let Some(a) = last.take()
        {
            unacked = 0;
            if let Err(e) = ack(&a).await {
                return e;
            }
        }
    }
}

/// Handles one delivery; false when the node no longer takes envelopes.
async fn handle(shared: &Shared, session: &Session, d: Delivery, inbound: &Inbound) -> bool {
    let key = d.routing_key;
    let Some(message) = wire::decode(Bytes::from(d.data)) else {
        tracing::warn!(key = %key, "malformed message dropped");
        return true;
    };
    match message {
        Message::Envelope {
            epoch,
            seq,
            copy,
            envelope,
        } => {
            let one = std::iter::once(envelope);
            deliver(shared, key.as_str(), epoch, seq, copy, one, inbound).await
        }
        Message::Bundle {
            epoch,
            first,
            envelopes,
        } => {
            deliver(
                shared,
                key.as_str(),
                epoch,
                first,
                Copy::Only,
                envelopes.into_iter(),
                inbound,
            )
            .await
        }
        Message::Control(c) => {
            control(shared, session, c, key.as_str()).await;
            true
        }
    }
}

/// Hands one sender's envelopes, numbered from `first` on the stream of
/// `key`, to the node, after the checks for loss, redelivery, address and
/// repeated copies. False when the node no longer takes envelopes.
async fn deliver(
    shared: &Shared,
    key: &str,
    epoch: u64,
    first: u64,
    copy: Copy,
    envelopes: impl ExactSizeIterator<Item = Bytes>,
    inbound: &Inbound,
) -> bool {
    let count = envelopes.len() as u64;
    let mut envelopes = envelopes.peekable();
    let Some((origin, id)) = envelopes
        .peek()
        .and_then(|e| switchboard_core::envelope::peek_id(e))
    else {
        tracing::warn!(key = %key, "malformed envelope dropped");
        return true;
    };
    if origin == shared.node().as_str() {
        // The broker brings a node's own messages back when it holds a
        // recipient too; it delivered to them already.
        return true;
    }
    let stream = wire::stream(shared.cfg.mode, key);
    let stats = &shared.stats;
    {
        let mut t = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
        match t.record_range(origin, stream, epoch, first, first + count - 1) {
            Seen::Again => {
                stats.duplicates.fetch_add(count, Ordering::Relaxed);
                return true;
            }
            Seen::New { missed } if missed > 0 => {
                tracing::warn!(%origin, key = %key, missed, "envelopes lost on the way");
                stats.receive_dropped.fetch_add(missed, Ordering::Relaxed);
            }
            Seen::New { .. } => {}
        }
        if key.starts_with("n.") && key != shared.my_key() {
            // Fanout: addressed to another node.
            return true;
        }
        if t.repeated_copy(origin, copy, id) {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    for envelope in envelopes {
        stats.received.fetch_add(1, Ordering::Relaxed);
        // Waiting for room in the node's queue is not deafness.
        shared.blocked.store(true, Ordering::Relaxed);
        let taken = inbound.send(envelope).await.is_ok();
        shared.blocked.store(false, Ordering::Relaxed);
        if !taken {
            return false;
        }
    }
    shared.heard_self();
    true
}

async fn control(shared: &Shared, session: &Session, c: Control, key: &str) {
    let me = shared.node();
    match c {
        Control::Heartbeat(n) if &n == me => shared.heard_self(),
        Control::Heartbeat(n) => shared.peers.alive(&n),
        Control::Hello(n) if &n == me => shared.heard_self(),
        Control::Hello(n) => {
            shared.peers.alive(&n);
            let welcome = Control::Welcome(me.clone(), shared.peers.live(Some(me)));
            let to = wire::node_key(n.as_str());
            if let Err(e) = publish_control(shared, session, &to, &welcome).await {
                shared.link.failed(session.generation, &e);
            }
        }
        Control::Welcome(n, live) if key == shared.my_key() => {
            shared.peers.welcome(&n, &live, me);
        }
        Control::Welcome(n, _) => shared.peers.alive(&n),
        Control::Bye(n) if &n != me => {
            shared.peers.left(&n);
            shared
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_origin(n.as_str());
        }
        Control::Fence(n, f) if &n == me => {
            let keys = shared.binder.fence_reached(f);
            let mut t = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for k in keys {
                t.forget_stream(&k);
            }
        }
        Control::Bye(_) | Control::Fence(..) => {}
    }
}
