//! Interest and receiving, in one task: it subscribes to the node's own
//! subject, the broadcast subject, and the subject of every user and group
//! the node holds a connection of (subscribed on the first, unsubscribed on
//! the last), reads all of them, and hands envelopes to the node.
//!
//! Membership changes arrive synchronously, with the node's registry lock
//! held, so they only mark the subject wanted or not ([`Interest::report`]);
//! the task applies them, then sends a fence to the node's own subject: the
//! server reads a connection in order, so once the fence comes back the
//! server has the subscriptions, which is when [`Interest::settle`] returns.
//! (In a NATS cluster, the other servers learn of a subscription one route
//! hop later.) The client resubscribes by itself after a
//! reconnect.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{Message, Subscriber};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamFuture};
use futures_util::{FutureExt, Stream, StreamExt};
use switchboard_core::backplane::Inbound;
use switchboard_core::relay::{self, Control, Copy, Seen};
use switchboard_core::{MembershipChange, NodeId};
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::Shared;
use crate::subjects::Subjects;

/// How long a membership operation waits for its subscription before it
/// returns anyway (the connection is down; the client subscribes on reconnect).
const SETTLE: Duration = Duration::from_secs(5);
/// A fence not back after this is sent again.
const FENCE_RETRY: Duration = Duration::from_secs(1);

/// Most messages taken from the subscriptions at once, to be put back in
/// their senders' order.
const DRAIN: usize = 1024;

/// Which user and group subjects the node wants, as reported and not yet
/// applied.
#[derive(Default)]
pub(crate) struct Interest {
    /// subject → wanted, the latest report per subject.
    pending: Mutex<HashMap<String, bool>>,
    wake: Notify,
    /// Reports made.
    reported: AtomicU64,
    /// Reports in effect at the server.
    applied: watch::Sender<u64>,
}

impl Interest {
    /// Records a local membership change: a first connection of a user or
    /// member of a group wants its subject, a last one no longer does.
    pub(crate) fn report(&self, subjects: &Subjects, change: &MembershipChange) {
        let (subject, want) = match change {
            MembershipChange::Bound {
                user, first: true, ..
            } => (subjects.user(user.as_str()), true),
            MembershipChange::Unbound {
                user, last: true, ..
            } => (subjects.user(user.as_str()), false),
            MembershipChange::Joined {
                group, first: true, ..
            } => (subjects.group(group.as_str()), true),
            MembershipChange::Left {
                group, last: true, ..
            } => (subjects.group(group.as_str()), false),
            _ => return,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(subject, want);
        self.reported.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Asks for a fence with no change: [`Interest::settle`] then also waits
    /// for the subscriptions made before (the node's own, at join).
    pub(crate) fn fence(&self) {
        self.reported.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Resolves once every change reported before the call is in effect at
    /// the server, or after [`SETTLE`].
    pub(crate) async fn settle(&self) {
        let target = self.reported.load(Ordering::Acquire);
        let mut rx = self.applied.subscribe();
        let _ = tokio::time::timeout(SETTLE, rx.wait_for(|a| *a >= target)).await;
    }

    /// Whether every reported change is in effect.
    pub(crate) fn synced(&self) -> bool {
        *self.applied.borrow() >= self.reported.load(Ordering::Acquire)
    }
}

/// A subscription that ends when its token is cancelled (dropping it
/// unsubscribes).
struct Sub {
    inner: Subscriber,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for Sub {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        self.inner.poll_next_unpin(cx)
    }
}

/// The subscriptions, read together: only those with a message are polled.
struct Subscriptions {
    active: HashMap<String, CancellationToken>,
    reading: FuturesUnordered<StreamFuture<Sub>>,
}

impl Subscriptions {
    async fn add(&mut self, shared: &Shared, subject: String) {
        if self.active.contains_key(&subject) {
            return;
        }
        match shared.client.subscribe(subject.clone()).await {
            Ok(inner) => {
                let token = CancellationToken::new();
                let sub = Sub {
                    inner,
                    cancelled: Box::pin(token.clone().cancelled_owned()),
                };
                self.reading.push(sub.into_future());
                self.active.insert(subject, token);
            }
            Err(e) => tracing::warn!(error = %e, %subject, "could not subscribe"),
        }
    }

    fn remove(&mut self, subject: &str) -> bool {
        match self.active.remove(subject) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// Runs the subscriptions until `stop`. Without `inbound` (JetStream, where
/// envelopes come through the consumer) only liveness messages are read.
pub(crate) async fn run(shared: Arc<Shared>, inbound: Option<Inbound>, stop: CancellationToken) {
    let mut subs = Subscriptions {
        active: HashMap::new(),
        reading: FuturesUnordered::new(),
    };
    // Subscribed before join returns: the node's own subject and the
    // broadcast (the client resubscribes both after any reconnect).
    let mine = shared.subjects.node(shared.node.as_str());
    subs.add(&shared, mine).await;
    subs.add(&shared, shared.subjects.broadcast()).await;
    let interest = &shared.interest;
    // The fence out: the reports it covers, and when it was sent.
    let mut fence: Option<(u64, tokio::time::Instant)> = None;
    let mut dirty = false;
    let mut ready: Vec<Message> = Vec::with_capacity(DRAIN);
    loop {
        let retry_at = fence.map(|(_, at)| at + FENCE_RETRY);
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                // Lost with a broken link: sent again once the link is back.
                fence = None;
                dirty = true;
            }
            () = interest.wake.notified() => {
                let changes = std::mem::take(
                    &mut *interest.pending.lock().unwrap_or_else(|p| p.into_inner()),
                );
                for (subject, want) in changes {
                    if want {
                        subs.add(&shared, subject).await;
                    } else if subs.remove(&subject) {
                        // A later subscription starts the stream afresh.
                        shared
                            .tracker
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .forget_stream(shared.subjects.stream(&subject));
                    }
                }
                dirty = true;
            }
            Some((message, sub)) = subs.reading.next() => {
                let Some(message) = message else {
                    continue; // unsubscribed, or the client closed
                };
                subs.reading.push(sub.into_future());
                // Everything that reached the socket before this message sits
                // in its subscription's queue already: take it all, and put
                // each sender's messages back in the order it published them
                // (orders of different senders are unrelated, and their
                // relative order does not matter).
                ready.push(message);
                // Unconstrained: past tokio's cooperative budget a channel
                // answers "not ready" although it holds messages, which would
                // leave earlier ones behind.
                tokio::task::unconstrained(async {
                    while ready.len() < DRAIN {
                        match subs.reading.next().now_or_never() {
                            Some(Some((Some(m), sub))) => {
                                subs.reading.push(sub.into_future());
                                ready.push(m);
                            }
                            Some(Some((None, _))) => {}
                            Some(None) | None => break,
                        }
                    }
                })
                .await;
                if ready.len() > 1 {
                    ready.sort_by_key(|m| crate::subjects::order_of(&m.payload));
                }
                for message in ready.drain(..) {
                    if !handle(&shared, message, inbound.as_ref()).await {
                        return;
                    }
                }
            }
        }
        if let Some((covered, _)) = fence
            && *interest.applied.borrow() >= covered
        {
            fence = None;
        }
        if dirty && fence.is_none() {
            // Subscriptions changed: a fence through our own subject proves
            // the server has them when it comes back (the server reads a
            // connection in order), which is when they count as applied.
            dirty = false;
            let covered = interest.reported.load(Ordering::Acquire);
            if interest
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                let mine = shared.subjects.node(shared.node.as_str());
                shared
                    .send_control(&mine, &Control::Fence(shared.node.clone(), covered))
                    .await;
                fence = Some((covered, tokio::time::Instant::now()));
            } else {
                interest.wake.notify_one();
            }
        }
    }
}

/// Handles one message; false when the node is gone.
async fn handle(shared: &Shared, m: Message, inbound: Option<&Inbound>) -> bool {
    let subject = m.subject.as_str();
    let Some(message) = crate::subjects::unframed(m.payload).and_then(|(_, b)| relay::decode(b))
    else {
        tracing::warn!(%subject, "malformed message dropped");
        return true;
    };
    let inbound = match (message, inbound) {
        (relay::Message::Control(Control::Hello(n)), _) if m.reply.is_some() => {
            // A node starting under an id asks whether it is taken
            // (`id_taken`): this one answers for its own.
            if n == shared.node
                && let Some(reply) = &m.reply
            {
                let here = Control::Welcome(shared.node.clone(), Vec::new());
                shared.send_control(reply.as_str(), &here).await;
            }
            return true;
        }
        (relay::Message::Control(c), _) => {
            control(shared, c, subject).await;
            return true;
        }
        (m, Some(inbound)) => (m, inbound),
        (_, None) => return true,
    };
    let (message, inbound) = inbound;
    match message {
        relay::Message::Envelope {
            epoch,
            seq,
            copy,
            envelope,
        } => {
            let one = std::iter::once(envelope);
            deliver(shared, subject, epoch, seq, copy, one, inbound).await
        }
        relay::Message::Bundle {
            epoch,
            first,
            envelopes,
        } => {
            let all = envelopes.into_iter();
            deliver(shared, subject, epoch, first, Copy::Only, all, inbound).await
        }
        relay::Message::Control(_) => true,
    }
}

async fn deliver(
    shared: &Shared,
    subject: &str,
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
        tracing::warn!(%subject, "malformed envelope dropped");
        return true;
    };
    if origin == shared.node.as_str() {
        // Our own broadcast, or a push to a user we also hold: delivered
        // locally already.
        shared.heard_self();
        return true;
    }
    let stats = &shared.stats;
    {
        let mut t = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let stream = shared.subjects.stream(subject);
        match t.record_range(origin, stream, epoch, first, first + count - 1) {
            Seen::Again => {
                stats.duplicates.fetch_add(count, Ordering::Relaxed);
                return true;
            }
            Seen::New { missed } if missed > 0 => {
                tracing::warn!(%origin, %subject, missed, "envelopes lost on the way");
                stats.receive_dropped.fetch_add(missed, Ordering::Relaxed);
            }
            Seen::New { .. } => {}
        }
        if t.repeated_copy(origin, copy, id) {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    if !shared.hand_over(envelopes, inbound).await {
        return false;
    }
    shared.heard_self();
    true
}

async fn control(shared: &Shared, c: Control, subject: &str) {
    let me = &shared.node;
    match c {
        Control::Heartbeat(n) | Control::Hello(n) if &n == me => shared.heard_self(),
        Control::Heartbeat(n) => {
            shared.peers.alive(&n);
            shared.recent.alive(&n);
        }
        Control::Hello(n) => {
            shared.peers.alive(&n);
            shared.recent.alive(&n);
            let welcome = Control::Welcome(me.clone(), shared.peers.live(Some(me)));
            shared
                .send_control(&shared.subjects.node(n.as_str()), &welcome)
                .await;
        }
        Control::Welcome(n, live) if shared.subjects.is_node(subject) => {
            shared.peers.welcome(&n, &live, me);
        }
        Control::Welcome(n, _) => shared.peers.alive(&n),
        Control::Bye(n) if &n != me => {
            shared.peers.left(&n);
            shared.recent.left(&n);
            forget(shared, &n);
        }
        Control::Fence(n, covered) if &n == me => {
            shared.heard_self();
            shared.interest.applied.send_if_modified(|a| {
                let moved = covered > *a;
                *a = (*a).max(covered);
                moved
            });
        }
        Control::Bye(_) | Control::Fence(..) => {}
    }
}

/// Forgets what was tracked of a node that left.
pub(crate) fn forget(shared: &Shared, node: &NodeId) {
    shared
        .tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .forget_origin(node.as_str());
}
