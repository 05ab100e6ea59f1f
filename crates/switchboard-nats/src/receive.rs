//! Interest and receiving, in one task: it subscribes to the node's own
//! subject, the broadcast subject, and the subject of every user and group
//! the node holds a connection of (subscribed on the first, unsubscribed on
//! the last), reads all of them, and hands envelopes to the node.
//!
//! Membership changes arrive synchronously, with the node's registry lock
//! held, so they only mark the subject wanted or not ([`Interest::report`]);
//! the task applies them, then flushes the connection: once the server has
//! answered the flush it has the subscriptions, which is when
//! [`Interest::settle`] returns. The client resubscribes by itself after a
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
use futures_util::{Stream, StreamExt};
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

pub(crate) async fn run(shared: Arc<Shared>, inbound: Inbound, stop: CancellationToken) {
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
    let mut flushing: Option<(u64, Flush)> = None;
    let mut dirty = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            done = async { flushing.as_mut().expect("guarded").1.as_mut().await }, if flushing.is_some() => {
                let (covered, _) = flushing.take().expect("guarded");
                if done {
                    interest.applied.send_if_modified(|a| {
                        let moved = covered > *a;
                        *a = (*a).max(covered);
                        moved
                    });
                } else {
                    dirty = true;
                }
            }
            () = interest.wake.notified() => {
                let covered = interest.reported.load(Ordering::Acquire);
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
                if flushing.is_none() {
                    flushing = Some((covered, flush(&shared)));
                } else {
                    dirty = true;
                }
            }
            Some((message, sub)) = subs.reading.next() => {
                let Some(message) = message else {
                    continue; // unsubscribed, or the client closed
                };
                subs.reading.push(sub.into_future());
                if !handle(&shared, message, &inbound).await {
                    return;
                }
            }
        }
        if dirty && flushing.is_none() {
            // Changes applied while a flush was out (or after one failed).
            dirty = false;
            let covered = interest.reported.load(Ordering::Acquire);
            if interest
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                flushing = Some((covered, flush(&shared)));
            } else {
                interest.wake.notify_one();
            }
        }
    }
}

/// A flush under way: true once the server has processed everything sent
/// before it.
type Flush = Pin<Box<dyn Future<Output = bool> + Send>>;

fn flush(shared: &Arc<Shared>) -> Flush {
    let client = shared.client.clone();
    Box::pin(async move {
        match tokio::time::timeout(SETTLE, client.flush()).await {
            Ok(Ok(())) => true,
            _ => {
                // Down: pause before the next try, the client resubscribes
                // when it is back.
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        }
    })
}

/// Handles one message; false when the node is gone.
async fn handle(shared: &Shared, m: Message, inbound: &Inbound) -> bool {
    let subject = m.subject.as_str();
    let Some(message) = relay::decode(m.payload) else {
        tracing::warn!(%subject, "malformed message dropped");
        return true;
    };
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
        relay::Message::Control(c) => {
            control(shared, c, subject).await;
            true
        }
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
    for envelope in envelopes {
        stats.received.fetch_add(1, Ordering::Relaxed);
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

async fn control(shared: &Shared, c: Control, subject: &str) {
    let me = &shared.node;
    match c {
        Control::Heartbeat(n) | Control::Hello(n) if &n == me => shared.heard_self(),
        Control::Heartbeat(n) => shared.peers.alive(&n),
        Control::Hello(n) => {
            shared.peers.alive(&n);
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
            forget(shared, &n);
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
