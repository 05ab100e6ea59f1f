//! The cluster-wide directory: users, groups, connections and sessions, as
//! written by the nodes that hold them.
//!
//! A node reports every local membership change; a writer task applies them
//! in order, in pipelined batches, as absolute (idempotent) writes. Whenever
//! the Redis connection is re-established, and whenever a change had to be
//! dropped, the writer rebuilds the node's entries from scratch: clear them,
//! then replay the node's current state. Re-applying a change the replay
//! already reflects is harmless, because every write states a final value.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redis::aio::MultiplexedConnection;
use redis::{Pipeline, RedisError};
use switchboard_core::backplane::LocalView;
use switchboard_core::{MembershipChange, NodeId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::link::Link;
use crate::scripts;

/// Changes waiting to be written. Beyond this the directory is rebuilt instead.
const QUEUE: usize = 64 * 1024;
/// Changes written per pipeline.
const BATCH: usize = 512;

pub(crate) struct Directory {
    keys: Keys,
    tx: mpsc::Sender<(u64, MembershipChange)>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<(u64, MembershipChange)>>>,
    /// Sequence number of the last change reported.
    reported: AtomicU64,
    /// Sequence number up to which changes are in Redis.
    applied: watch::Sender<u64>,
    /// A change was dropped: the entries must be rebuilt.
    dirty: AtomicBool,
    /// Generation of the link the entries were last rebuilt on.
    pub(crate) synced: AtomicU64,
    /// Wakes the writer for a rebuild that no change or reconnect announces.
    wake: tokio::sync::Notify,
}

impl Directory {
    pub(crate) fn new(keys: Keys) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            keys,
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            reported: AtomicU64::new(0),
            applied: watch::channel(0).0,
            dirty: AtomicBool::new(false),
            synced: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Rebuilds the node's entries at the writer's next turn.
    pub(crate) fn force_rebuild(&self) {
        self.dirty.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Records a change. Never blocks: a full queue marks the directory for a rebuild.
    pub(crate) fn report(&self, change: &MembershipChange) {
        let seq = self.reported.fetch_add(1, Ordering::AcqRel) + 1;
        if self.tx.try_send((seq, change.clone())).is_err() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Waits until every change reported so far is in Redis.
    pub(crate) async fn settle(&self) {
        let target = self.reported.load(Ordering::Acquire);
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|a| *a >= target).await;
    }

    fn add(&self, pipe: &mut Pipeline, node: &NodeId, change: &MembershipChange) {
        let k = &self.keys;
        match change {
            MembershipChange::Opened { conn } => {
                pipe.hset(k.conn(conn), "node", node.as_str()).ignore();
                pipe.sadd(k.node_conns(node), conn.to_string()).ignore();
            }
            MembershipChange::Closed { conn } => {
                pipe.del(&[k.conn(conn), k.conn_groups(conn), k.session(conn)])
                    .ignore();
                pipe.srem(k.node_conns(node), conn.to_string()).ignore();
            }
            MembershipChange::Bound {
                conn, user, count, ..
            } => {
                pipe.hset(k.conn(conn), "user", user.as_str()).ignore();
                pipe.sadd(k.user(user), conn.to_string()).ignore();
                pipe.hset(k.user_nodes(user), node.as_str(), *count)
                    .ignore();
            }
            MembershipChange::Unbound {
                conn, user, count, ..
            } => {
                pipe.hdel(k.conn(conn), "user").ignore();
                pipe.srem(k.user(user), conn.to_string()).ignore();
                if *count == 0 {
                    pipe.hdel(k.user_nodes(user), node.as_str()).ignore();
                } else {
                    pipe.hset(k.user_nodes(user), node.as_str(), *count)
                        .ignore();
                }
            }
            MembershipChange::Joined {
                conn, group, count, ..
            } => {
                pipe.sadd(k.conn_groups(conn), group.as_str()).ignore();
                pipe.sadd(k.group(group), conn.to_string()).ignore();
                pipe.hset(k.group_nodes(group), node.as_str(), *count)
                    .ignore();
            }
            MembershipChange::Left {
                conn, group, count, ..
            } => {
                pipe.srem(k.conn_groups(conn), group.as_str()).ignore();
                pipe.srem(k.group(group), conn.to_string()).ignore();
                if *count == 0 {
                    pipe.hdel(k.group_nodes(group), node.as_str()).ignore();
                } else {
                    pipe.hset(k.group_nodes(group), node.as_str(), *count)
                        .ignore();
                }
            }
            MembershipChange::Session { conn, session } => {
                pipe.del(k.session(conn)).ignore();
                if !session.is_empty() {
                    let pairs: Vec<(&String, &String)> = session.iter().collect();
                    pipe.hset_multiple(k.session(conn), &pairs).ignore();
                }
            }
            _ => {}
        }
    }

    /// Clears the node's entries and writes its current state. Returns the
    /// sequence number the state covers at least.
    async fn rebuild(
        &self,
        conn: &mut MultiplexedConnection,
        node: &NodeId,
        local: &dyn LocalView,
    ) -> Result<u64, RedisError> {
        // Read before the replay: everything reported up to here is in it.
        let covered = self.reported.load(Ordering::Acquire);
        let mut state = Vec::new();
        local.replay(&mut |c| state.push(c));
        clear_node(conn, &self.keys, node.as_str()).await?;
        for chunk in state.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for c in chunk {
                self.add(&mut pipe, node, c);
            }
            pipe.query_async::<()>(conn).await?;
        }
        tracing::info!(node = %node, conns = state.iter().filter(|c| matches!(c, MembershipChange::Opened { .. })).count(), "directory entries rebuilt");
        Ok(covered)
    }

    /// Applies reported changes until `stop`. `ttl` is the node's liveness
    /// TTL, renewed with every rebuild (a restarted Redis forgot it too).
    pub(crate) async fn run(
        &self,
        link: Arc<Link>,
        node: NodeId,
        local: Arc<dyn LocalView>,
        ttl: std::time::Duration,
        stop: CancellationToken,
    ) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut link_rx = link.subscribe();
        let mut batch = Vec::with_capacity(BATCH);
        let mut skip_until = 0u64;
        loop {
            let Some((mut conn, generation)) = link.ready(&stop).await else {
                return;
            };
            if self.synced.load(Ordering::Acquire) != generation
                || self.dirty.swap(false, Ordering::AcqRel)
            {
                if let Err(e) =
                    crate::liveness::beat(&mut conn, &self.keys, node.as_str(), ttl).await
                {
                    link.failed(generation, &e);
                    continue;
                }
                match self.rebuild(&mut conn, &node, &*local).await {
                    Ok(covered) => {
                        skip_until = covered;
                        self.synced.store(generation, Ordering::Release);
                        self.applied.send_if_modified(|a| {
                            let changed = covered > *a;
                            *a = (*a).max(covered);
                            changed
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "directory rebuild failed");
                        link.failed(generation, &e);
                        if !crate::link::is_link_error(&e) {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                // A new connection means a rebuild: go round the loop.
                _ = link_rx.changed() => continue,
                () = self.wake.notified() => continue,
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
            }
            let last = batch.last().map_or(0, |(s, _)| *s);
            let mut pipe = redis::pipe();
            for (seq, change) in batch.drain(..) {
                if seq > skip_until {
                    self.add(&mut pipe, &node, &change);
                }
            }
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    self.applied.send_modify(|a| *a = (*a).max(last));
                }
                Err(e) => {
                    // The lost batch is covered by the rebuild that follows a
                    // reconnect; a command error (a bug) forces one too.
                    tracing::warn!(error = %e, "directory write failed");
                    self.dirty.store(true, Ordering::Release);
                    link.failed(generation, &e);
                }
            }
        }
    }
}

/// Removes every directory entry of `node`.
pub(crate) async fn clear_node(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    node: &str,
) -> Result<u64, RedisError> {
    scripts::CLEAR_NODE
        .arg(&keys.prefix)
        .arg(node)
        .invoke_async(conn)
        .await
}
