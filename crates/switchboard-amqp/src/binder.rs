//! Routing mode: keeping the node queue's bindings equal to what the node holds.
//!
//! The node's first connection of a user binds the user's key, its last one
//! unbinds it; the same for groups. Changes are reported under the hub's
//! registry lock, so they only go on a bounded queue here; one task applies
//! them in order, a batch at a time: per key only the last change of the batch
//! counts, and only if it changes what is bound. Every bind but the last of a
//! batch goes out without waiting for its reply; the last one's reply means
//! the broker applied them all (it handles a channel's methods in order), and
//! only then does [`Binder::settle`] let a waiting connection be welcomed.
//!
//! After removing bindings the binder sends the node a fence through its own
//! queue: once the consumer reaches it, nothing routed by the removed
//! bindings can still arrive, and the sequence tracking of those keys starts
//! afresh (a later binding of the same key is a new stream, not a gap).
//!
//! On a new session (a fresh queue) and whenever a change had to be dropped
//! for lack of room, the binder rebuilds the bindings from the node's state
//! ([`LocalView::replay`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::types::FieldTable;
use switchboard_core::backplane::LocalView;
use switchboard_core::{MembershipChange, NodeId};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::link::{Link, Names, Session};
use crate::wire::{self, Control};

/// Changes waiting to be applied. Beyond this the bindings are rebuilt instead.
const QUEUE: usize = 64 * 1024;
/// Changes applied per round trip.
const BATCH: usize = 1024;

/// Bind or unbind a routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Bound,
    Unbound,
}

pub(crate) struct Binder {
    tx: mpsc::Sender<(u64, String, Want)>,
    rx: Mutex<Option<mpsc::Receiver<(u64, String, Want)>>>,
    /// Number of the last change reported.
    reported: AtomicU64,
    /// Number up to which changes are applied on the broker.
    applied: watch::Sender<u64>,
    /// A change was dropped: rebuild.
    dirty: AtomicBool,
    /// Generation of the session the bindings were last rebuilt on.
    pub(crate) synced: AtomicU64,
    wake: Notify,
    /// Keys unbound, per fence not yet reached by the consumer.
    fences: Mutex<BTreeMap<u64, Vec<String>>>,
}

/// The key a membership change binds or unbinds, if any.
fn key_of(change: &MembershipChange) -> Option<(String, Want)> {
    Some(match change {
        MembershipChange::Bound {
            user, first: true, ..
        } => (wire::user_key(user.as_str()), Want::Bound),
        MembershipChange::Unbound {
            user, last: true, ..
        } => (wire::user_key(user.as_str()), Want::Unbound),
        MembershipChange::Joined {
            group, first: true, ..
        } => (wire::group_key(group.as_str()), Want::Bound),
        MembershipChange::Left {
            group, last: true, ..
        } => (wire::group_key(group.as_str()), Want::Unbound),
        _ => return None,
    })
}

/// The keys a replayed state binds.
fn replayed_keys(local: &dyn LocalView) -> HashSet<String> {
    let mut keys = HashSet::new();
    local.replay(&mut |c| match &c {
        MembershipChange::Bound { user, .. } => {
            keys.insert(wire::user_key(user.as_str()));
        }
        MembershipChange::Joined { group, .. } => {
            keys.insert(wire::group_key(group.as_str()));
        }
        _ => {}
    });
    keys
}

impl Binder {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            reported: AtomicU64::new(0),
            applied: watch::channel(0).0,
            dirty: AtomicBool::new(false),
            synced: AtomicU64::new(0),
            wake: Notify::new(),
            fences: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a change. Never blocks: a full queue marks the bindings for a rebuild.
    pub(crate) fn report(&self, change: &MembershipChange) {
        let Some((key, want)) = key_of(change) else {
            return;
        };
        let seq = self.reported.fetch_add(1, Ordering::AcqRel) + 1;
        if self.tx.try_send((seq, key, want)).is_err() {
            self.dirty.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Waits until every change reported so far is applied on the broker.
    pub(crate) async fn settle(&self) {
        let target = self.reported.load(Ordering::Acquire);
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|a| *a >= target).await;
    }

    /// The consumer reached fence `n`: the keys unbound before it are done.
    pub(crate) fn fence_reached(&self, n: u64) -> Vec<String> {
        let mut fences = self.fences.lock().unwrap_or_else(|p| p.into_inner());
        let later = fences.split_off(&(n + 1));
        std::mem::replace(&mut *fences, later)
            .into_values()
            .flatten()
            .collect()
    }

    /// Keys unbound whose fence will never arrive (their queue is gone).
    fn drain_fences(&self) -> Vec<String> {
        std::mem::take(&mut *self.fences.lock().unwrap_or_else(|p| p.into_inner()))
            .into_values()
            .flatten()
            .collect()
    }

    /// Applies reported changes until `stop`. `forget` is called with keys
    /// whose sequence tracking must start afresh; `keep` after a rebuild with
    /// the keys now bound (tracking of every other user or group key goes).
    pub(crate) async fn run(
        &self,
        link: &Link,
        node: NodeId,
        local: std::sync::Arc<dyn LocalView>,
        tracker: &Mutex<wire::Tracker>,
        stop: CancellationToken,
    ) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut link_rx = link.subscribe();
        let mut batch = Vec::with_capacity(BATCH);
        let mut bound: HashSet<String> = HashSet::new();
        let mut skip_until = 0u64;
        let mut next_fence = 0u64;
        let names = link.names().clone();
        loop {
            let Some(session) = link.ready(&stop).await else {
                return;
            };
            let generation = session.generation;
            let fresh = self.synced.load(Ordering::Acquire) != generation;
            if fresh || self.dirty.swap(false, Ordering::AcqRel) {
                // Read before the replay: every change reported up to here is in it.
                let covered = self.reported.load(Ordering::Acquire);
                let desired = replayed_keys(&*local);
                if fresh {
                    // A new queue has none of the old bindings, and nothing
                    // routed by the old ones can still arrive.
                    bound.clear();
                    let gone = self.drain_fences();
                    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                    for k in gone {
                        t.forget_stream(&k);
                    }
                    t.retain_streams(|k| {
                        desired.contains(k) || !(k.starts_with("u.") || k.starts_with("g."))
                    });
                }
                let mut changes: Vec<(String, Want)> = desired
                    .iter()
                    .filter(|k| !bound.contains(*k))
                    .map(|k| (k.clone(), Want::Bound))
                    .collect();
                changes.extend(
                    bound
                        .iter()
                        .filter(|k| !desired.contains(*k))
                        .map(|k| (k.clone(), Want::Unbound)),
                );
                match self
                    .apply(&session, &names, &node, &changes, &mut next_fence)
                    .await
                {
                    Ok(()) => {
                        bound = desired;
                        skip_until = covered;
                        self.synced.store(generation, Ordering::Release);
                        self.applied.send_if_modified(|a| {
                            let changed = covered > *a;
                            *a = (*a).max(covered);
                            changed
                        });
                        tracing::info!(%node, generation, keys = bound.len(), "routing keys bound");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rebinding routing keys failed");
                        link.failed(generation, &e);
                        continue;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                // A new session means a rebuild: go round the loop.
                _ = link_rx.changed() => continue,
                () = self.wake.notified() => continue,
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            }
            let last = batch.last().map_or(0, |(s, _, _)| *s);
            // Per key, the last change of the batch is what must hold.
            let mut wanted: HashMap<String, Want> = HashMap::with_capacity(batch.len());
            for (seq, key, want) in batch.drain(..) {
                if seq > skip_until {
                    wanted.insert(key, want);
                }
            }
            let changes: Vec<(String, Want)> = wanted
                .into_iter()
                .filter(|(k, w)| (*w == Want::Bound) != bound.contains(k))
                .collect();
            match self
                .apply(&session, &names, &node, &changes, &mut next_fence)
                .await
            {
                Ok(()) => {
                    for (k, w) in changes {
                        match w {
                            Want::Bound => bound.insert(k),
                            Want::Unbound => bound.remove(&k),
                        };
                    }
                    self.applied.send_modify(|a| *a = (*a).max(last));
                }
                Err(e) => {
                    // The session is replaced, and the bindings rebuilt on the next.
                    tracing::warn!(error = %e, "binding routing keys failed");
                    link.failed(generation, &e);
                }
            }
        }
    }

    /// Applies `changes` on the broker and returns once it confirmed them all;
    /// sends a fence after unbinds.
    async fn apply(
        &self,
        session: &Session,
        names: &Names,
        node: &NodeId,
        changes: &[(String, Want)],
        next_fence: &mut u64,
    ) -> Result<(), lapin::Error> {
        let Some(last) = changes.len().checked_sub(1) else {
            return Ok(());
        };
        let ch = &session.control;
        let mut ops: Vec<crate::BoxedOp<'_, ()>> = Vec::with_capacity(changes.len());
        for (i, (key, want)) in changes.iter().enumerate() {
            // Binds but the last go out without waiting for their reply
            // (unbinds always have one).
            let nowait = i < last;
            ops.push(match want {
                Want::Bound => Box::pin(ch.queue_bind(
                    names.queue.clone(),
                    names.exchange.clone(),
                    key.as_str().into(),
                    QueueBindOptions { nowait },
                    FieldTable::default(),
                )),
                Want::Unbound => Box::pin(ch.queue_unbind(
                    names.queue.clone(),
                    names.exchange.clone(),
                    key.as_str().into(),
                    FieldTable::default(),
                )),
            });
        }
        for r in crate::in_order(ops).await {
            r?;
        }
        let unbound: Vec<String> = changes
            .iter()
            .filter(|(_, w)| *w == Want::Unbound)
            .map(|(k, _)| k.clone())
            .collect();
        if !unbound.is_empty() {
            *next_fence += 1;
            self.fences
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*next_fence, unbound);
            // Published on the channel the unbinds went through, after their
            // replies: the broker routes it after they took effect.
            let fence = Control::Fence(node.clone(), *next_fence).encode();
            ch.basic_publish(
                names.exchange.clone(),
                names.node_key.clone(),
                BasicPublishOptions::default(),
                &fence,
                BasicProperties::default(),
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::{ConnId, GroupId, UserId};

    fn conn() -> ConnId {
        ConnId::new(NodeId::new("a").unwrap(), 1)
    }

    #[test]
    fn only_the_first_and_last_local_members_change_bindings() {
        let bound = |first| MembershipChange::Bound {
            conn: conn(),
            user: UserId::from("u"),
            first,
            count: 1,
        };
        let left = |last| MembershipChange::Left {
            conn: conn(),
            group: GroupId::from("g"),
            last,
            count: 0,
        };
        assert_eq!(key_of(&bound(true)), Some(("u.u".into(), Want::Bound)));
        assert_eq!(key_of(&bound(false)), None);
        assert_eq!(key_of(&left(true)), Some(("g.g".into(), Want::Unbound)));
        assert_eq!(key_of(&left(false)), None);
        assert_eq!(key_of(&MembershipChange::Opened { conn: conn() }), None);
    }

    #[tokio::test]
    async fn changes_are_numbered_and_settle_waits_for_them() {
        let b = Binder::new();
        b.report(&MembershipChange::Joined {
            conn: conn(),
            group: GroupId::from("g"),
            first: true,
            count: 1,
        });
        b.report(&MembershipChange::Opened { conn: conn() });
        assert_eq!(
            b.reported.load(Ordering::Acquire),
            1,
            "only binding changes count"
        );
        let settled = tokio::time::timeout(std::time::Duration::from_millis(50), b.settle());
        assert!(settled.await.is_err(), "not applied yet");
        b.applied.send_replace(1);
        b.settle().await;
    }

    #[test]
    fn a_fence_releases_the_keys_unbound_before_it() {
        let b = Binder::new();
        {
            let mut f = b.fences.lock().unwrap();
            f.insert(1, vec!["u.a".into()]);
            f.insert(2, vec!["g.b".into(), "u.c".into()]);
            f.insert(3, vec!["u.d".into()]);
        }
        assert_eq!(b.fence_reached(2), ["u.a", "g.b", "u.c"]);
        assert!(b.fence_reached(2).is_empty(), "released once");
        assert_eq!(b.drain_fences(), ["u.d"]);
    }
}
