//! The cluster seam: what a node needs from the cluster it belongs to.
//!
//! A node keeps its own connections, users and groups and delivers to them
//! itself. Everything that crosses nodes goes through a [`Backplane`]: encoded
//! envelopes out ([`Backplane::publish`]), envelopes addressed to this node in
//! (the [`Inbound`] queue handed to [`Backplane::join`]), the set of live
//! peers, and notice of local membership changes so that a backplane can keep a
//! directory (Redis) or routing bindings (RabbitMQ) in step.
//!
//! Queries and remote operations are built on top by the node: it sends a
//! request envelope to the nodes that may know and folds their replies. A
//! backplane with a directory can answer queries itself instead
//! ([`Backplane::query`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::envelope::Session;
use crate::id::{ConnId, GroupId, NodeId, UserId};
use crate::query::{LocalAnswer, Query};
use crate::target::Target;

/// The queue through which a backplane hands a node the envelopes addressed to it.
pub type Inbound = mpsc::Sender<Bytes>;

/// A read-only view of the node's own connections, for backplanes that must
/// rebuild what they published about them (a directory after a broker restart).
pub trait LocalView: Send + Sync {
    /// Calls `f` with `Opened`, `Bound`, `Joined` and `Session` changes that
    /// recreate the node's current state, atomically with respect to live
    /// changes: every change reported to [`Backplane::membership`] after this
    /// call returns happened after the replayed state.
    fn replay(&self, f: &mut dyn FnMut(MembershipChange));
}

/// What a backplane gets when its node joins the cluster.
#[non_exhaustive]
pub struct JoinContext {
    /// The joining node.
    pub node: NodeId,
    /// Where envelopes addressed to the node go.
    pub inbound: Inbound,
    /// How many envelopes taken from `inbound` the node has fully handled
    /// (delivered to its connections, or answered). Lets a queue backplane
    /// acknowledge only after local delivery.
    pub handled: watch::Receiver<u64>,
    /// The node's own connections.
    pub local: Arc<dyn LocalView>,
}

impl JoinContext {
    /// A context from its parts.
    pub fn new(
        node: NodeId,
        inbound: Inbound,
        handled: watch::Receiver<u64>,
        local: Arc<dyn LocalView>,
    ) -> Self {
        Self {
            node,
            inbound,
            handled,
            local,
        }
    }
}

impl std::fmt::Debug for JoinContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinContext")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A [`LocalView`] of a node with no connections (tests, pushers).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLocalState;

impl LocalView for NoLocalState {
    fn replay(&self, _f: &mut dyn FnMut(MembershipChange)) {}
}

/// Which nodes an envelope is for.
#[derive(Debug, Clone, Copy)]
pub enum Dest<'a> {
    /// One node (a reply, or an operation on one of its connections).
    Node(&'a NodeId),
    /// Every peer that may hold a recipient of `target`. A backplane that knows
    /// where users and groups live sends only to those nodes; otherwise to all.
    Interested(&'a Target),
    /// Every peer.
    All,
}

/// An owned [`Dest`], for backplanes that queue envelopes before sending them.
#[derive(Debug, Clone)]
pub enum Route {
    /// One node.
    Node(NodeId),
    /// Every peer that may hold a recipient of the target.
    Interested(Target),
    /// Every peer.
    All,
}

impl From<Dest<'_>> for Route {
    fn from(dest: Dest<'_>) -> Self {
        match dest {
            Dest::Node(n) => Route::Node(n.clone()),
            Dest::Interested(t) => Route::Interested(t.clone()),
            Dest::All => Route::All,
        }
    }
}

/// An envelope waiting in a backplane's publish queue.
#[derive(Debug)]
pub struct Outgoing {
    /// Where it goes.
    pub route: Route,
    /// The encoded envelope.
    pub envelope: Bytes,
}

/// Puts an envelope on a backplane's bounded publish queue, for
/// [`Backplane::publish`]: never waits; a full (or closed) queue drops the
/// envelope and counts it in `counters.publish_dropped`.
pub fn enqueue(
    queue: &mpsc::Sender<Outgoing>,
    dest: Dest<'_>,
    envelope: Bytes,
    counters: &StatCounters,
) -> Handoff {
    let outgoing = Outgoing {
        route: dest.into(),
        envelope,
    };
    match queue.try_send(outgoing) {
        Ok(()) => Handoff {
            sent: 1,
            dropped: 0,
        },
        Err(_) => {
            StatCounters::add(&counters.publish_dropped, 1);
            Handoff {
                sent: 0,
                dropped: 1,
            }
        }
    }
}

/// Waits `wait` with jitter (so that nodes which lost their broker together
/// do not retry in lockstep), then doubles it, up to `max`: the pause between
/// two reconnection attempts.
pub async fn backoff(wait: &mut Duration, max: Duration) {
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    tokio::time::sleep(wait.mul_f64(jitter)).await;
    *wait = (*wait * 2).min(max);
}

/// What happened to a published envelope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handoff {
    /// Nodes (or broker messages) the envelope was handed to.
    pub sent: u32,
    /// Nodes it was meant for but could not be handed to (full queue, broker down).
    pub dropped: u32,
}

/// A membership change of a local connection, reported to the backplane as it
/// happens. `count` is how many local connections the user or group has after
/// the change; `first`/`last` say whether the node just gained its first, or
/// lost its last, one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipChange {
    /// A connection was accepted.
    Opened {
        /// The connection.
        conn: ConnId,
    },
    /// A connection closed; the `Unbound`/`Left` changes for it come first.
    Closed {
        /// The connection.
        conn: ConnId,
        /// The user it was bound to when it closed, so that whoever reports
        /// the close can say whose it was after the `Unbound`.
        user: Option<UserId>,
    },
    /// A connection was bound to a user.
    Bound {
        /// The connection.
        conn: ConnId,
        /// The user.
        user: UserId,
        /// The node's first connection of this user.
        first: bool,
        /// Local connections of the user after the change.
        count: u32,
    },
    /// A connection was unbound from a user.
    Unbound {
        /// The connection.
        conn: ConnId,
        /// The user.
        user: UserId,
        /// The node's last connection of this user.
        last: bool,
        /// Local connections of the user after the change.
        count: u32,
    },
    /// A connection joined a group.
    Joined {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: GroupId,
        /// The node's first member of this group.
        first: bool,
        /// Local members of the group after the change.
        count: u32,
    },
    /// A connection left a group.
    Left {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: GroupId,
        /// The node's last member of this group.
        last: bool,
        /// Local members of the group after the change.
        count: u32,
    },
    /// A connection's session changed; the whole new session.
    Session {
        /// The connection.
        conn: ConnId,
        /// Its session now.
        session: Session,
    },
}

/// Whether the backplane is serving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Connected and delivering.
    Ready,
    /// Not (yet, or no longer) connected; publishing drops and counts.
    Connecting {
        /// Why, for logs and readiness checks.
        reason: String,
    },
}

impl Status {
    /// `Ready` without a reason not to be, `Connecting` with one.
    pub fn unless(reason: Option<String>) -> Self {
        match reason {
            None => Status::Ready,
            Some(reason) => Status::Connecting { reason },
        }
    }
}

/// A backplane failed to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Another live node already uses this id.
    #[error("node id {0} is already in use in this cluster")]
    DuplicateNode(NodeId),
    /// The broker could not be reached or refused.
    #[error("cannot reach the cluster backplane")]
    Unreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Counters every backplane keeps, for metrics and for honest loss reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackplaneStats {
    /// Envelopes handed to the cluster.
    pub published: u64,
    /// Envelopes that could not be handed over and were dropped.
    pub publish_dropped: u64,
    /// Envelopes delivered to this node's inbound queue.
    pub received: u64,
    /// Envelopes addressed to this node that were lost before it got them
    /// (inbound queue full, or while disconnected, where the mode can tell).
    pub receive_dropped: u64,
    /// Envelopes received twice and dropped (at-least-once modes).
    pub duplicates: u64,
    /// Envelopes that waited longer than the mode keeps them and were dropped.
    pub expired: u64,
    /// Times the backplane reconnected to its broker.
    pub reconnects: u64,
}

/// The counters behind [`BackplaneStats`], updated by a backplane's tasks.
#[derive(Debug, Default)]
pub struct StatCounters {
    /// See [`BackplaneStats::published`].
    pub published: AtomicU64,
    /// See [`BackplaneStats::publish_dropped`].
    pub publish_dropped: AtomicU64,
    /// See [`BackplaneStats::received`].
    pub received: AtomicU64,
    /// See [`BackplaneStats::receive_dropped`].
    pub receive_dropped: AtomicU64,
    /// See [`BackplaneStats::duplicates`].
    pub duplicates: AtomicU64,
    /// See [`BackplaneStats::expired`].
    pub expired: AtomicU64,
}

impl StatCounters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now, with the backplane's reconnection count.
    pub fn snapshot(&self, reconnects: u64) -> BackplaneStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BackplaneStats {
            published: g(&self.published),
            publish_dropped: g(&self.publish_dropped),
            received: g(&self.received),
            receive_dropped: g(&self.receive_dropped),
            duplicates: g(&self.duplicates),
            expired: g(&self.expired),
            reconnects,
        }
    }
}

/// How a node reaches the rest of its cluster. See the module docs.
///
/// Implementations must never block in the synchronous methods: they are called
/// on the push path and, for [`Backplane::membership`], with the node's registry
/// lock held. Queue or drop, and count what is dropped.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Joins the cluster as `ctx.node`. From then on every envelope addressed
    /// to the node is put on `ctx.inbound`. Called once, before any other method.
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError>;

    /// Hands an encoded envelope to the cluster for the nodes `dest` selects,
    /// this node excluded. Never waits on the network.
    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff;

    /// The peers believed alive now, this node excluded. Queries that the
    /// backplane does not answer itself are asked of these nodes.
    fn peers(&self) -> Vec<NodeId>;

    /// Whether this backplane can never have peers, so that nodes skip
    /// encoding envelopes nobody would receive.
    fn is_standalone(&self) -> bool {
        false
    }

    /// Records a local membership change (directory entries, routing bindings).
    fn membership(&self, change: &MembershipChange) {
        let _ = change;
    }

    /// Resolves once every membership change reported before the call is in
    /// effect cluster-wide (directory written, routes bound), or the backplane
    /// gave up on it. The node awaits it before a connection's first frame and
    /// before a membership operation returns, so that "welcomed" and "joined"
    /// mean "reachable from every node".
    async fn settle(&self) {}

    /// Answers a query for the whole cluster from a directory, if the backplane
    /// keeps one. `None` makes the node ask every peer instead.
    async fn query(&self, query: &Query, timeout: Duration) -> Option<QueryOutcome> {
        let _ = (query, timeout);
        None
    }

    /// Whether the backplane is serving.
    fn status(&self) -> Status;

    /// Counters.
    fn stats(&self) -> BackplaneStats;

    /// Leaves the cluster: peers stop counting this node as alive.
    async fn leave(&self);
}

/// A directory's answer to a whole-cluster query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// The answer, complete.
    Answer(LocalAnswer),
    /// The directory could not be read; the node falls back to asking peers.
    Unavailable,
}

/// The backplane of a single-node deployment: no peers, nothing to publish.
#[derive(Debug, Default, Clone, Copy)]
pub struct Standalone;

#[async_trait]
impl Backplane for Standalone {
    async fn join(&self, _ctx: JoinContext) -> Result<(), JoinError> {
        Ok(())
    }
    fn publish(&self, _dest: Dest<'_>, _envelope: Bytes) -> Handoff {
        Handoff::default()
    }
    fn peers(&self) -> Vec<NodeId> {
        Vec::new()
    }
    fn is_standalone(&self) -> bool {
        true
    }
    fn status(&self) -> Status {
        Status::Ready
    }
    fn stats(&self) -> BackplaneStats {
        BackplaneStats::default()
    }
    async fn leave(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_publish_queue_drops_and_counts_without_waiting() {
        let (tx, mut rx) = mpsc::channel(1);
        let counters = StatCounters::default();
        let node = NodeId::new("b").unwrap();
        let first = enqueue(&tx, Dest::Node(&node), Bytes::from_static(b"1"), &counters);
        assert_eq!(
            first,
            Handoff {
                sent: 1,
                dropped: 0
            }
        );
        let second = enqueue(&tx, Dest::All, Bytes::from_static(b"2"), &counters);
        assert_eq!(
            second,
            Handoff {
                sent: 0,
                dropped: 1
            }
        );
        assert_eq!(counters.snapshot(3).publish_dropped, 1);
        assert_eq!(counters.snapshot(3).reconnects, 3);
        let queued = rx.try_recv().unwrap();
        assert!(matches!(queued.route, Route::Node(n) if n == node));
        assert_eq!(queued.envelope, Bytes::from_static(b"1"));
        drop(rx);
        let closed = enqueue(&tx, Dest::All, Bytes::new(), &counters);
        assert_eq!(closed.dropped, 1, "a closed queue drops too");
    }

    #[test]
    fn status_from_a_reason() {
        assert_eq!(Status::unless(None), Status::Ready);
        assert_eq!(
            Status::unless(Some("down".into())),
            Status::Connecting {
                reason: "down".into()
            }
        );
    }

    #[test]
    fn a_standalone_node_has_no_peers_and_says_so() {
        assert!(Standalone.is_standalone());
        assert!(Standalone.peers().is_empty());
        assert_eq!(Standalone.status(), Status::Ready);
    }

    /// A backplane that relies on every default of the trait.
    struct Minimal;

    #[async_trait]
    impl Backplane for Minimal {
        async fn join(&self, _ctx: JoinContext) -> Result<(), JoinError> {
            Ok(())
        }
        fn publish(&self, _dest: Dest<'_>, _envelope: Bytes) -> Handoff {
            Handoff::default()
        }
        fn peers(&self) -> Vec<NodeId> {
            Vec::new()
        }
        fn status(&self) -> Status {
            Status::Ready
        }
        fn stats(&self) -> BackplaneStats {
            BackplaneStats::default()
        }
        async fn leave(&self) {}
    }

    #[tokio::test]
    async fn a_backplane_is_not_standalone_and_has_no_directory_by_default() {
        assert!(
            !Minimal.is_standalone(),
            "peers may come: envelopes are encoded"
        );
        let q = Query::Totals;
        assert_eq!(Minimal.query(&q, Duration::from_secs(1)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_about_the_pause_then_doubles_it_up_to_the_maximum() {
        let max = Duration::from_secs(1);
        let mut wait = Duration::from_millis(400);
        for expected_next in [800, 1000, 1000] {
            let before = wait;
            let started = tokio::time::Instant::now();
            backoff(&mut wait, max).await;
            let slept = started.elapsed();
            assert!(
                slept >= before.mul_f64(0.75) && slept <= before.mul_f64(1.25),
                "slept {slept:?} for a pause of {before:?}"
            );
            assert_eq!(wait, Duration::from_millis(expected_next));
        }
    }
}
