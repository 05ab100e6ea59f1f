//! The cluster-wide directory: users, groups, connections and sessions, as
//! written by the nodes that hold them.
//!
//! A node reports every local membership change; a writer task applies them
//! in order, in pipelined batches, as absolute (idempotent) writes. Whenever
//! the Redis connection is re-established, and whenever a change had to be
//! dropped, the writer rebuilds the node's entries: it removes those its
//! current state no longer has, then replays that state. Re-applying a change
//! the replay already reflects is harmless, because every write states a
//! final value.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::link::Conn;
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
            MembershipChange::Closed { conn, .. } => {
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

    /// Brings the node's entries in line with its current state. Returns the
    /// sequence number the state covers at least.
    ///
    /// Prune, then write, never clear-then-write: an entry the node still
    /// holds is never missing, not even for a round trip. A clear would leave
    /// every user and group of the node without a holder until the rewrite
    /// reached it, and a push routed in that window would go nowhere. Only
    /// this node writes its entries (peers remove them only once it is dead),
    /// so reading them in several round trips sees no one else's changes.
    async fn rebuild(
        &self,
        conn: &mut Conn,
        node: &NodeId,
        local: &dyn LocalView,
    ) -> Result<u64, RedisError> {
        // Read before the replay: everything reported up to here is in it.
        let covered = self.reported.load(Ordering::Acquire);
        let mut state = Vec::new();
        local.replay(&mut |c| state.push(c));
        let holding = Holding::from_replay(&state);
        let written = self.written(conn, node).await?;
        let stale = stale(&written, &holding);
        in_batches(conn, &stale, |pipe, s| self.remove(pipe, node, s)).await?;
        in_batches(conn, &state, |pipe, c| self.add(pipe, node, c)).await?;
        tracing::info!(node = %node, conns = holding.conns.len(), pruned = stale.len(), "directory entries rebuilt");
        Ok(covered)
    }

    /// The node's connections as Redis holds them.
    async fn written(&self, conn: &mut Conn, node: &NodeId) -> Result<Vec<Written>, RedisError> {
        let k = &self.keys;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(k.node_conns(node))
            .query_async(conn)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for c in chunk {
                pipe.hget(k.conn(c), "user")
                    .smembers(k.conn_groups(c))
                    .exists(k.session(c));
            }
            let replies: Vec<(Option<String>, Vec<String>, bool)> = pipe.query_async(conn).await?;
            out.extend(
                chunk
                    .iter()
                    .zip(replies)
                    .map(|(c, (user, groups, session))| Written {
                        conn: c.clone(),
                        user,
                        groups,
                        session,
                    }),
            );
        }
        Ok(out)
    }

    fn remove(&self, pipe: &mut Pipeline, node: &NodeId, stale: &Stale) {
        let k = &self.keys;
        match stale {
            Stale::Conn(c) => {
                pipe.del(&[k.conn(c), k.conn_groups(c), k.session(c)])
                    .ignore();
                pipe.srem(k.node_conns(node), c).ignore();
            }
            Stale::UserMember { user, conn } => {
                pipe.srem(k.user(user), conn).ignore();
                pipe.hdel(k.conn(conn), "user").ignore();
            }
            Stale::UserHolder(user) => {
                pipe.hdel(k.user_nodes(user), node.as_str()).ignore();
            }
            Stale::GroupMember { group, conn } => {
                pipe.srem(k.group(group), conn).ignore();
                pipe.srem(k.conn_groups(conn), group).ignore();
            }
            Stale::GroupHolder(group) => {
                pipe.hdel(k.group_nodes(group), node.as_str()).ignore();
            }
            Stale::Session(c) => {
                pipe.del(k.session(c)).ignore();
            }
        }
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
                let rebuilt = match self.rebuild(&mut conn, &node, &*local).await {
                    // Routes other nodes kept may predate the rebuild.
                    Ok(covered) => redis::cmd(self.keys.publish_command())
                        .arg(self.keys.routes())
                        .arg(crate::routes::encode_reset(node.as_str()))
                        .query_async::<()>(&mut conn)
                        .await
                        .map(|()| covered),
                    Err(e) => Err(e),
                };
                match rebuilt {
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
            // Atomic, so a batch cut off by a lost connection is in Redis
            // entirely or not at all: the entries stay consistent with each
            // other, which is what a rebuild's pruning reads them by.
            let mut pipe = redis::pipe();
            pipe.atomic();
            // In the same transaction: a node that hears a change reads
            // the directory with it applied (see `routes`).
            let mut changed_routes = Vec::new();
            for (seq, change) in batch.drain(..) {
                if seq > skip_until {
                    self.add(&mut pipe, &node, &change);
                    route_change(&mut changed_routes, node.as_str(), &change);
                }
            }
            if !changed_routes.is_empty() {
                pipe.cmd(self.keys.publish_command())
                    .arg(self.keys.routes())
                    .arg(changed_routes)
                    .ignore();
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

/// The routes change `change` makes, if any: the node became a holder of a
/// user or group (its first connection of it) or stopped being one.
fn route_change(out: &mut Vec<u8>, node: &str, change: &MembershipChange) {
    use crate::routes::{Kind, encode_change};
    match change {
        MembershipChange::Bound { user, count, .. } if *count == 1 => {
            encode_change(out, Kind::User, true, node, user.as_str());
        }
        MembershipChange::Unbound { user, count, .. } if *count == 0 => {
            encode_change(out, Kind::User, false, node, user.as_str());
        }
        MembershipChange::Joined { group, count, .. } if *count == 1 => {
            encode_change(out, Kind::Group, true, node, group.as_str());
        }
        MembershipChange::Left { group, count, .. } if *count == 0 => {
            encode_change(out, Kind::Group, false, node, group.as_str());
        }
        _ => {}
    }
}

/// Writes `items` in atomic pipelines of [`BATCH`], each built by `each`.
async fn in_batches<T>(
    conn: &mut Conn,
    items: &[T],
    mut each: impl FnMut(&mut Pipeline, &T),
) -> Result<(), RedisError> {
    for chunk in items.chunks(BATCH) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for item in chunk {
            each(&mut pipe, item);
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Removes every directory entry of `node`.
pub(crate) async fn clear_node(
    conn: &mut Conn,
    keys: &Keys,
    node: &str,
) -> Result<u64, RedisError> {
    scripts::CLEAR_NODE
        .key(keys.nodes())
        .arg(&keys.prefix)
        .arg(node)
        .invoke_async(conn)
        .await
}

/// One connection's entries as Redis holds them.
#[derive(Debug)]
struct Written {
    conn: String,
    user: Option<String>,
    groups: Vec<String>,
    session: bool,
}

/// One connection as the node holds it now.
#[derive(Debug, Default)]
struct Held {
    user: Option<String>,
    groups: HashSet<String>,
    session: bool,
}

/// What the node holds now, from its replay.
#[derive(Debug, Default)]
struct Holding {
    conns: HashMap<String, Held>,
    users: HashSet<String>,
    groups: HashSet<String>,
}

impl Holding {
    fn from_replay(changes: &[MembershipChange]) -> Self {
        let mut h = Holding::default();
        for change in changes {
            match change {
                MembershipChange::Opened { conn } => {
                    h.conns.entry(conn.to_string()).or_default();
                }
                MembershipChange::Bound { conn, user, .. } => {
                    h.conns.entry(conn.to_string()).or_default().user = Some(user.to_string());
                    h.users.insert(user.to_string());
                }
                MembershipChange::Joined { conn, group, .. } => {
                    h.conns
                        .entry(conn.to_string())
                        .or_default()
                        .groups
                        .insert(group.to_string());
                    h.groups.insert(group.to_string());
                }
                MembershipChange::Session { conn, session } => {
                    h.conns.entry(conn.to_string()).or_default().session = !session.is_empty();
                }
                // A replay states what is; it has no removals.
                _ => {}
            }
        }
        h
    }
}

/// An entry of the node's that its current state no longer has.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stale {
    /// The connection is gone: its hash, group set, session and index entry.
    Conn(String),
    /// The connection is no longer the user's.
    UserMember { user: String, conn: String },
    /// The node holds no connection of the user any more.
    UserHolder(String),
    /// The connection is no longer in the group.
    GroupMember { group: String, conn: String },
    /// The node holds no member of the group any more.
    GroupHolder(String),
    /// The connection's session is empty now.
    Session(String),
}

/// What must be removed from `written` so that, once `now` is written over
/// it, Redis holds exactly `now`. Never names an entry `now` still has.
fn stale(written: &[Written], now: &Holding) -> Vec<Stale> {
    let mut out = BTreeSet::new();
    for w in written {
        let held = now.conns.get(&w.conn);
        if let Some(user) = &w.user
            && held.and_then(|h| h.user.as_ref()) != Some(user)
        {
            out.insert(Stale::UserMember {
                user: user.clone(),
                conn: w.conn.clone(),
            });
            if !now.users.contains(user) {
                out.insert(Stale::UserHolder(user.clone()));
            }
        }
        for group in &w.groups {
            if !held.is_some_and(|h| h.groups.contains(group)) {
                out.insert(Stale::GroupMember {
                    group: group.clone(),
                    conn: w.conn.clone(),
                });
                if !now.groups.contains(group) {
                    out.insert(Stale::GroupHolder(group.clone()));
                }
            }
        }
        match held {
            None => {
                out.insert(Stale::Conn(w.conn.clone()));
            }
            Some(h) if w.session && !h.session => {
                out.insert(Stale::Session(w.conn.clone()));
            }
            Some(_) => {}
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn written(conn: &str, user: Option<&str>, groups: &[&str], session: bool) -> Written {
        Written {
            conn: conn.into(),
            user: user.map(Into::into),
            groups: groups.iter().map(|g| (*g).into()).collect(),
            session,
        }
    }

    fn holding(conns: &[(&str, Option<&str>, &[&str], bool)]) -> Holding {
        let mut h = Holding::default();
        for (conn, user, groups, session) in conns {
            let held = Held {
                user: user.map(Into::into),
                groups: groups.iter().map(|g| (*g).into()).collect(),
                session: *session,
            };
            h.users.extend(held.user.clone());
            h.groups.extend(held.groups.iter().cloned());
            h.conns.insert((*conn).into(), held);
        }
        h
    }

    fn s(v: &str) -> String {
        v.into()
    }

    #[test]
    fn an_unchanged_state_prunes_nothing() {
        let w = [written("n.1", Some("u"), &["g", "h"], true)];
        let now = holding(&[("n.1", Some("u"), &["g", "h"], true)]);
        assert_eq!(stale(&w, &now), vec![]);
    }

    #[test]
    fn a_gone_connection_takes_its_memberships_and_only_unheld_holders() {
        let w = [
            written("n.1", Some("u"), &["g", "h"], true),
            written("n.2", Some("u"), &["g"], false),
        ];
        // n.2 still holds user u and group g: their holder entries stay.
        let now = holding(&[("n.2", Some("u"), &["g"], false)]);
        assert_eq!(
            stale(&w, &now),
            vec![
                Stale::Conn(s("n.1")),
                Stale::UserMember {
                    user: s("u"),
                    conn: s("n.1")
                },
                Stale::GroupMember {
                    group: s("g"),
                    conn: s("n.1")
                },
                Stale::GroupMember {
                    group: s("h"),
                    conn: s("n.1")
                },
                Stale::GroupHolder(s("h")),
            ]
        );
    }

    #[test]
    fn a_changed_connection_loses_only_what_changed() {
        let w = [written("n.1", Some("old"), &["kept", "left"], true)];
        let now = holding(&[("n.1", Some("new"), &["kept", "joined"], false)]);
        assert_eq!(
            stale(&w, &now),
            vec![
                Stale::UserMember {
                    user: s("old"),
                    conn: s("n.1")
                },
                Stale::UserHolder(s("old")),
                Stale::GroupMember {
                    group: s("left"),
                    conn: s("n.1")
                },
                Stale::GroupHolder(s("left")),
                Stale::Session(s("n.1")),
            ]
        );
    }

    #[test]
    fn a_holder_entry_stays_while_another_connection_holds_it() {
        // n.1 moved from u to nobody, but n.2 is u's too.
        let w = [
            written("n.1", Some("u"), &[], false),
            written("n.2", Some("u"), &[], false),
        ];
        let now = holding(&[("n.1", None, &[], false), ("n.2", Some("u"), &[], false)]);
        assert_eq!(
            stale(&w, &now),
            vec![Stale::UserMember {
                user: s("u"),
                conn: s("n.1")
            }]
        );
    }

    #[test]
    fn the_state_is_read_from_a_replay() {
        use switchboard_core::{ConnId, GroupId, UserId};
        let conn: ConnId = "n.1".parse().unwrap();
        let replay = [
            MembershipChange::Opened { conn: conn.clone() },
            MembershipChange::Bound {
                conn: conn.clone(),
                user: UserId::from("u"),
                first: true,
                count: 1,
            },
            MembershipChange::Joined {
                conn: conn.clone(),
                group: GroupId::from("g"),
                first: true,
                count: 1,
            },
            MembershipChange::Opened {
                conn: "n.2".parse().unwrap(),
            },
        ];
        let h = Holding::from_replay(&replay);
        assert_eq!(h.conns.len(), 2);
        assert_eq!(h.conns["n.1"].user.as_deref(), Some("u"));
        assert!(h.conns["n.1"].groups.contains("g"));
        assert!(h.conns["n.2"].user.is_none());
        assert!(h.users.contains("u") && h.groups.contains("g"));
    }
}
