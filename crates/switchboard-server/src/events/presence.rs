//! User presence across the cluster: `online` when a user's first connection
//! appears on any node, `offline` when its last one goes from every node,
//! each told once, by one node.
//!
//! Every node keeps which nodes hold each online user. It learns its own
//! changes from the hub's membership reports (a [`Tap`] on the backplane,
//! which sees "first connection of this user here" and "last one gone"),
//! and the other nodes' from their broadcasts. The node that tells a user's
//! transitions is the user's *emitter*: the live node with the highest
//! rendezvous score for the uid. It tells a transition when its own map
//! makes it, so a user connecting on two nodes at once is still told online
//! once. A node that leaves the cluster, or dies, is taken out of every
//! user when the backplane stops counting it alive: the users it held alone
//! go offline then, told by their emitters among the survivors.
//!
//! What this does not promise: while nodes disagree on who is alive (a node
//! joining or dying, for up to the backplane's liveness window), a
//! transition may be told twice or not at all. Lost broadcasts are mended by
//! a full exchange every [`RESYNC`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchboard::Hub;
use switchboard::core::backplane::{
    Backplane, BackplaneStats, Dest, Handoff, JoinContext, JoinError, QueryOutcome, Status,
};
use switchboard::core::{ConnId, MembershipChange, NodeId, Query, UserId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Events;

/// How often a node compares its peers with the backplane's live set.
pub const TICK: Duration = Duration::from_secs(1);
/// How often nodes exchange their whole user lists, mending lost broadcasts.
pub const RESYNC: Duration = Duration::from_secs(30);
/// Changes waiting for the tracker; beyond this it rebuilds from the hub.
const QUEUE: usize = 64 * 1024;

enum Input {
    Local(UserId, bool),
    Peer(NodeId, Bytes),
}

/// What nodes tell each other.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Message {
    /// Users whose first connection on the sender just appeared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    up: Vec<String>,
    /// Users whose last connection on the sender just went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    down: Vec<String>,
    /// Every user the sender holds now, replacing what it said before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sync: Option<Vec<String>>,
    /// The sender lost track: answer with a `sync`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    want_sync: bool,
}

struct Shared {
    tx: mpsc::Sender<Input>,
    /// Inputs were dropped: rebuild, and ask the peers for their lists.
    lost: AtomicBool,
    /// The user each closing connection was bound to, between the
    /// registry's report and the application's close handler.
    closing: Mutex<HashMap<ConnId, UserId>>,
}

/// The presence tracker's handle, for the application.
#[derive(Clone)]
pub struct Presence {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence")
    }
}

/// The tracker, until [`Tracker::spawn`].
pub struct Tracker {
    rx: mpsc::Receiver<Input>,
    shared: Arc<Shared>,
    events: Events,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracker")
    }
}

/// Wraps a backplane to watch the node's own membership changes.
pub struct Tap {
    inner: Arc<dyn Backplane>,
    shared: Arc<Shared>,
}

impl Presence {
    /// A tracker telling `events`, and the tap to build the hub's backplane with.
    pub fn new(events: Events, backplane: Arc<dyn Backplane>) -> (Self, Tracker, Arc<Tap>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            tx,
            lost: AtomicBool::new(false),
            closing: Mutex::new(HashMap::new()),
        });
        let tap = Arc::new(Tap {
            inner: backplane,
            shared: shared.clone(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            Tracker { rx, shared, events },
            tap,
        )
    }

    /// A message from another node's tracker.
    pub fn peer_message(&self, from: &NodeId, data: Bytes) {
        self.shared.send(Input::Peer(from.clone(), data));
    }

    /// The user `conn` was bound to when it closed, once.
    pub fn closed_user(&self, conn: &ConnId) -> Option<UserId> {
        lock(&self.shared.closing).remove(conn)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn send(&self, input: Input) {
        if self.tx.try_send(input).is_err() {
            self.lost.store(true, Ordering::Release);
        }
    }
}

#[async_trait]
impl Backplane for Tap {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        self.inner.join(ctx).await
    }
    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff {
        self.inner.publish(dest, envelope)
    }
    fn peers(&self) -> Vec<NodeId> {
        self.inner.peers()
    }
    fn is_standalone(&self) -> bool {
        self.inner.is_standalone()
    }
    fn membership(&self, change: &MembershipChange) {
        // Called under the registry's lock: only cheap, non-blocking work.
        match change {
            MembershipChange::Bound {
                user, first: true, ..
            } => self.shared.send(Input::Local(user.clone(), true)),
            MembershipChange::Unbound {
                user, last: true, ..
            } => self.shared.send(Input::Local(user.clone(), false)),
            MembershipChange::Closed {
                conn,
                user: Some(user),
            } => {
                lock(&self.shared.closing).insert(conn.clone(), user.clone());
            }
            _ => {}
        }
        self.inner.membership(change);
    }
    async fn settle(&self) {
        self.inner.settle().await;
    }
    async fn query(&self, query: &Query, timeout: Duration) -> Option<QueryOutcome> {
        self.inner.query(query, timeout).await
    }
    fn status(&self) -> Status {
        self.inner.status()
    }
    fn stats(&self) -> BackplaneStats {
        self.inner.stats()
    }
    async fn leave(&self) {
        self.inner.leave().await;
    }
}

/// The rendezvous score of `node` for `uid`: every node computes the same.
fn score(node: &NodeId, uid: &str) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(node.as_str().as_bytes());
    h.update(&[0xff]);
    h.update(uid.as_bytes());
    h.finalize()
}

/// Which nodes hold which users, and who tells whose transitions.
#[derive(Debug)]
struct Map {
    me: NodeId,
    /// Peers believed alive, this node excluded.
    live: BTreeSet<NodeId>,
    users: HashMap<UserId, Vec<NodeId>>,
    /// Peers whose whole list this node has had: a later list's additions
    /// are missed `up`s, where a first list's are not news.
    synced: HashSet<NodeId>,
}

/// A transition to tell: the user, and whether it came online.
type Told = (UserId, bool);

impl Map {
    fn new(me: NodeId) -> Self {
        Self {
            me,
            live: BTreeSet::new(),
            users: HashMap::new(),
            synced: HashSet::new(),
        }
    }

    fn emits(&self, uid: &UserId) -> bool {
        let mine = score(&self.me, uid.as_str());
        self.live.iter().all(|n| {
            let theirs = score(n, uid.as_str());
            theirs < mine || (theirs == mine && *n < self.me)
        })
    }

    fn add(&mut self, node: &NodeId, uid: &UserId, tell: bool, out: &mut Vec<Told>) {
        let nodes = self.users.entry(uid.clone()).or_default();
        if nodes.contains(node) {
            return;
        }
        nodes.push(node.clone());
        if nodes.len() == 1 && tell && self.emits(uid) {
            out.push((uid.clone(), true));
        }
    }

    fn remove(&mut self, node: &NodeId, uid: &UserId, out: &mut Vec<Told>) {
        let Some(nodes) = self.users.get_mut(uid) else {
            return;
        };
        let before = nodes.len();
        nodes.retain(|n| n != node);
        if nodes.is_empty() {
            self.users.remove(uid);
            if before > 0 && self.emits(uid) {
                out.push((uid.clone(), false));
            }
        }
    }

    /// A node's whole list replaces what the map had of it.
    fn replace(&mut self, node: &NodeId, list: &HashSet<UserId>, out: &mut Vec<Told>) {
        let gone: Vec<UserId> = self
            .users
            .iter()
            .filter(|(u, nodes)| nodes.contains(node) && !list.contains(*u))
            .map(|(u, _)| u.clone())
            .collect();
        for u in &gone {
            self.remove(node, u, out);
        }
        let tell = self.synced.contains(node) || *node == self.me;
        for u in list {
            self.add(node, u, tell, out);
        }
    }

    /// Takes nodes that left out of every user; returns who joined.
    fn peers_now(&mut self, peers: BTreeSet<NodeId>, out: &mut Vec<Told>) -> Vec<NodeId> {
        let joined: Vec<NodeId> = peers.difference(&self.live).cloned().collect();
        let left: Vec<NodeId> = self.live.difference(&peers).cloned().collect();
        // The emitters among the survivors tell what the leavers took away.
        self.live = peers;
        for node in &left {
            self.synced.remove(node);
            let held: Vec<UserId> = self
                .users
                .iter()
                .filter(|(_, nodes)| nodes.contains(node))
                .map(|(u, _)| u.clone())
                .collect();
            for u in &held {
                self.remove(node, u, out);
            }
        }
        joined
    }

    fn mine(&self) -> Vec<String> {
        self.users
            .iter()
            .filter(|(_, nodes)| nodes.contains(&self.me))
            .map(|(u, _)| u.as_str().to_owned())
            .collect()
    }
}

impl Tracker {
    /// Runs the tracker for `hub` until `stop` is cancelled.
    pub fn spawn(self, hub: Hub, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(hub, stop))
    }

    async fn run(mut self, hub: Hub, stop: CancellationToken) {
        let mut map = Map::new(hub.node_id().clone());
        let mut tick = tokio::time::interval(TICK);
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        let mut inputs = Vec::with_capacity(256);
        let mut told = Vec::new();
        loop {
            let mut out = Message::default();
            tokio::select! {
                () = stop.cancelled() => return,
                n = self.rx.recv_many(&mut inputs, 256) => {
                    if n == 0 {
                        return;
                    }
                    for input in inputs.drain(..) {
                        self.input(&hub, &mut map, input, &mut out, &mut told);
                    }
                }
                _ = tick.tick() => {
                    let peers: BTreeSet<NodeId> = hub.peers().into_iter().collect();
                    let joined = map.peers_now(peers, &mut told);
                    if !joined.is_empty() {
                        let sync = sync_message(&map);
                        for node in &joined {
                            hub.send_to_node(node, sync.clone());
                        }
                    }
                    if self.shared.lost.swap(false, Ordering::AcqRel) {
                        tracing::warn!("presence changes were dropped: rebuilding");
                        let local = local_users(&hub);
                        let me = map.me.clone();
                        map.replace(&me, &local, &mut told);
                        out.want_sync = true;
                        out.sync = Some(map.mine());
                    }
                }
                _ = resync.tick() => {
                    out.sync = Some(map.mine());
                }
            }
            for (uid, online) in told.drain(..) {
                self.events.presence(uid.as_str(), online);
            }
            if out != Message::default() {
                hub.send_to_peers(encode(&out));
            }
        }
    }

    fn input(
        &self,
        hub: &Hub,
        map: &mut Map,
        input: Input,
        out: &mut Message,
        told: &mut Vec<Told>,
    ) {
        let me = map.me.clone();
        match input {
            Input::Local(uid, true) => {
                map.add(&me, &uid, true, told);
                out.down.retain(|u| u != uid.as_str());
                out.up.push(uid.as_str().to_owned());
            }
            Input::Local(uid, false) => {
                map.remove(&me, &uid, told);
                out.up.retain(|u| u != uid.as_str());
                out.down.push(uid.as_str().to_owned());
            }
            Input::Peer(from, data) => {
                let Ok(m) = serde_json::from_slice::<Message>(&data) else {
                    tracing::warn!(%from, "an undecodable presence message dropped");
                    return;
                };
                for u in names(m.up) {
                    map.add(&from, &u, true, told);
                }
                for u in names(m.down) {
                    map.remove(&from, &u, told);
                }
                if let Some(list) = m.sync {
                    let list: HashSet<UserId> = names(list).collect();
                    map.replace(&from, &list, told);
                    map.synced.insert(from.clone());
                }
                if m.want_sync {
                    hub.send_to_node(&from, sync_message(map));
                }
            }
        }
    }
}

fn names(list: Vec<String>) -> impl Iterator<Item = UserId> {
    list.into_iter().map(UserId::from)
}

fn encode(m: &Message) -> Bytes {
    Bytes::from(serde_json::to_vec(m).unwrap_or_default())
}

fn sync_message(map: &Map) -> Bytes {
    encode(&Message {
        sync: Some(map.mine()),
        ..Message::default()
    })
}

/// The users this node holds now, from the hub's own registry.
fn local_users(hub: &Hub) -> HashSet<UserId> {
    let mut users = HashSet::new();
    hub.for_each_local(&mut |change| {
        if let MembershipChange::Bound { user, .. } = change {
            users.insert(user);
        }
    });
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).expect("node id")
    }

    fn user(s: &str) -> UserId {
        UserId::from(s)
    }

    /// A three-node cluster as each node sees it.
    fn maps() -> Vec<Map> {
        let ids = [node("a"), node("b"), node("c")];
        ids.iter()
            .map(|me| {
                let mut m = Map::new(me.clone());
                m.live = ids.iter().filter(|n| *n != me).cloned().collect();
                m
            })
            .collect()
    }

    #[test]
    fn one_node_tells_each_transition_however_the_nodes_interleave() {
        for uid in ["alice", "bob", "carol", "dave", "erin"] {
            let u = user(uid);
            let mut maps = maps();
            let (a, b) = (node("a"), node("b"));
            let mut told: Vec<Vec<Told>> = vec![Vec::new(); 3];
            // alice connects on a and on b at once: each applies its own
            // change first, then hears the other's.
            maps[0].add(&a, &u, true, &mut told[0]);
            maps[1].add(&b, &u, true, &mut told[1]);
            maps[0].add(&b, &u, true, &mut told[0]);
            maps[1].add(&a, &u, true, &mut told[1]);
            maps[2].add(&b, &u, true, &mut told[2]);
            maps[2].add(&a, &u, true, &mut told[2]);
            // Then both go at once.
            maps[0].remove(&a, &u, &mut told[0]);
            maps[1].remove(&b, &u, &mut told[1]);
            maps[0].remove(&b, &u, &mut told[0]);
            maps[1].remove(&a, &u, &mut told[1]);
            maps[2].remove(&a, &u, &mut told[2]);
            maps[2].remove(&b, &u, &mut told[2]);
            let all: Vec<&Told> = told.iter().flatten().collect();
            assert_eq!(
                all,
                vec![&(u.clone(), true), &(u.clone(), false)],
                "{uid}: {told:?}"
            );
            let tellers: Vec<usize> = (0..3).filter(|i| !told[*i].is_empty()).collect();
            assert_eq!(tellers.len(), 1, "{uid}: told by {tellers:?}");
        }
    }

    #[test]
    fn a_dead_nodes_users_go_offline_once_among_the_survivors() {
        let mut maps = maps();
        let c = node("c");
        let users: Vec<UserId> = (0..20).map(|i| user(&format!("u{i}"))).collect();
        let mut ignore = Vec::new();
        for m in &mut maps {
            for u in &users {
                m.add(&c, u, true, &mut ignore);
            }
        }
        let mut told = Vec::new();
        for m in maps.iter_mut().take(2) {
            let survivors: BTreeSet<NodeId> = m.live.iter().filter(|n| **n != c).cloned().collect();
            m.peers_now(survivors, &mut told);
        }
        told.sort();
        let mut want: Vec<Told> = users.iter().map(|u| (u.clone(), false)).collect();
        want.sort();
        assert_eq!(told, want);
    }

    #[test]
    fn a_first_list_is_not_news_but_a_later_one_mends_missed_changes() {
        let mut m = maps().remove(0);
        let b = node("b");
        // Make a the emitter of every uid used here by leaving it alone.
        m.live.clear();
        let mut told = Vec::new();
        let list: HashSet<UserId> = [user("x"), user("y")].into_iter().collect();
        m.replace(&b, &list, &mut told);
        assert!(told.is_empty(), "a first list told {told:?}");
        m.synced.insert(b.clone());
        // b's next list lost y and gained z: a missed down and a missed up.
        let list: HashSet<UserId> = [user("x"), user("z")].into_iter().collect();
        m.replace(&b, &list, &mut told);
        told.sort();
        assert_eq!(told, vec![(user("y"), false), (user("z"), true)]);
    }
}
