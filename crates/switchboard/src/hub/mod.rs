//! The [`Hub`]: the one handle application code uses, the same in every mode.
//!
//! A hub owns this node's connections (the registry) and its attachment to the
//! cluster (the backplane). Pushes are delivered to local recipients directly
//! and handed to the backplane once for the other nodes; operations on a
//! connection of another node travel as a request envelope to that node;
//! cluster-wide queries are answered by a directory when the backplane has one,
//! and otherwise by asking every live peer and folding the replies.

mod builder;
mod history;
mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use switchboard_core::backplane::{Handoff, Status};
use switchboard_core::{
    Backplane, Body, ConnId, Dest, Envelope, FrameKind, GroupId, NodeId, OpResult, Payload, Target,
    UserId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builder::HubBuilder;
pub use history::{RecordedPush, recorded_frame, recovered_frame};

use crate::config::Limits;
use crate::error::PushError;
use crate::handler::{Accept, CloseReason, Handler, Transport};
use crate::outbox::{Caps, Outbox};
use crate::registry::Registry;
use crate::stats::{Counters, HubStats};

/// What a push did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushReport {
    /// Local connections the frame was queued to.
    pub local: u32,
    /// Local connections that did not get it because their queue was full
    /// (drop policy), or that are being closed as slow consumers.
    pub local_dropped: u32,
    /// Handed to the cluster for other nodes (and what could not be handed over).
    pub remote: Handoff,
}

/// What a close did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Local connections asked to close.
    pub local: u32,
    /// Handed to the cluster for other nodes.
    pub remote: Handoff,
}

/// A cheap, cloneable handle to this node of a switchboard cluster.
///
/// Every method works for any connection, user or group of the cluster,
/// whichever node holds it.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node", &self.inner.node)
            .finish()
    }
}

type Pending = Mutex<HashMap<u64, mpsc::Sender<(NodeId, OpResult)>>>;

pub(crate) struct Inner {
    node: NodeId,
    default_kind: FrameKind,
    limits: Limits,
    /// Outbox limits for WebSocket and for TCP connections, shared by all.
    caps: [Arc<Caps>; 2],
    query_timeout: Duration,
    shutdown_timeout: Duration,
    registry: RwLock<Registry>,
    backplane: Arc<dyn Backplane>,
    handler: Arc<dyn Handler>,
    pending: Pending,
    next_envelope: AtomicU64,
    next_seq: AtomicU64,
    pub(crate) counters: Counters,
    /// Connection tasks: waited for (bounded) at shutdown.
    conns: TaskTracker,
    /// Background tasks (the inbound dispatcher).
    tasks: TaskTracker,
    /// Cancelled when shutdown begins: listeners stop, new connections are refused.
    closing: CancellationToken,
    /// Cancelled after connections are gone: background tasks stop.
    stop: CancellationToken,
    /// The start of [`Hub::clock_ms`].
    epoch: tokio::time::Instant,
    /// Envelopes from the backplane fully handled so far.
    handled: tokio::sync::watch::Sender<u64>,
    /// This node's connections, for backplane replays.
    view: Arc<View>,
    /// Where recorded pushes are kept, if anywhere.
    history: Option<Arc<dyn switchboard_core::History>>,
    /// Keeps one node's recorded pushes to a stream in position order.
    record_order: Box<[tokio::sync::Mutex<()>]>,
    /// Patterns of the streams recorded by configuration.
    record: Vec<String>,
    /// Wakes the task that fills gaps in recorded streams.
    gaps: Arc<tokio::sync::Notify>,
}

/// The node's connections as a backplane sees them, for replays.
struct View(Weak<Inner>);

impl switchboard_core::LocalView for View {
    fn replay(&self, f: &mut dyn FnMut(switchboard_core::MembershipChange)) {
        if let Some(inner) = self.0.upgrade() {
            // The read lock keeps live changes (reported under the write lock)
            // from interleaving with the replay.
            let reg = inner.registry.read().unwrap_or_else(|p| p.into_inner());
            reg.replay(f);
        }
    }
}

/// A start value for node-local counters: microseconds since the epoch, so a
/// node restarted under the same id does not reuse connection or envelope ids.
fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

impl Hub {
    /// Starts building a hub. Without further settings: a random node id, the
    /// standalone (single-node) backplane, a handler that accepts everyone.
    pub fn builder() -> HubBuilder {
        HubBuilder::new()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node
    }

    /// The frame kind used for payloads pushed without one.
    pub fn default_kind(&self) -> FrameKind {
        self.inner.default_kind
    }

    /// Connection limits and timeouts.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The backplane's state, for readiness checks.
    pub fn cluster_status(&self) -> Status {
        self.inner.backplane.status()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HubStats {
        let open = self.registry().len() as u64;
        self.inner
            .counters
            .snapshot(open, self.inner.backplane.stats())
    }

    /// Pushes to every connection `target` selects, on any node. Returns once the
    /// frame is queued locally and handed to the cluster; never waits on peers.
    pub fn push(
        &self,
        target: &Target,
        payload: impl Into<Payload>,
    ) -> Result<PushReport, PushError> {
        let frame = payload.into().into_frame(self.inner.default_kind)?;
        self.inner.counters.pushed(target);
        let d = self.registry().deliver(target, &frame);
        self.inner.counters.delivered(&d);
        let mut report = PushReport {
            local: d.queued,
            local_dropped: d.dropped + d.overflowed,
            remote: Handoff::default(),
        };
        if self.needs_cluster(target) {
            let env = self.envelope(Body::Push {
                target: target.clone(),
                frame,
            });
            report.remote = self.inner.backplane.publish(Dest::Interested(target), env);
        }
        Ok(report)
    }

    /// Pushes to one connection.
    pub fn to_conn(
        &self,
        conn: &ConnId,
        payload: impl Into<Payload>,
    ) -> Result<PushReport, PushError> {
        self.push(&Target::conn(conn.clone()), payload)
    }

    /// Pushes to every connection of a user.
    pub fn to_user(
        &self,
        user: impl Into<UserId>,
        payload: impl Into<Payload>,
    ) -> Result<PushReport, PushError> {
        self.push(&Target::user(user), payload)
    }

    /// Pushes to every member of a group.
    pub fn to_group(
        &self,
        group: impl Into<GroupId>,
        payload: impl Into<Payload>,
    ) -> Result<PushReport, PushError> {
        self.push(&Target::group(group), payload)
    }

    /// Pushes to every connection of the cluster.
    pub fn to_all(&self, payload: impl Into<Payload>) -> Result<PushReport, PushError> {
        self.push(&Target::all(), payload)
    }

    /// The nodes of the cluster believed alive now, this one excluded.
    pub fn peers(&self) -> Vec<NodeId> {
        self.inner.backplane.peers()
    }

    /// Whether this hub can never have peers (the standalone backplane): then
    /// every connection there is, is this node's.
    pub fn is_standalone(&self) -> bool {
        self.inner.backplane.is_standalone()
    }

    /// Sends `data` to the application of every other node
    /// ([`Handler::on_peer_message`]), with the delivery of the cluster mode's
    /// pushes.
    pub fn send_to_peers(&self, data: Bytes) -> Handoff {
        if self.inner.backplane.is_standalone() {
            return Handoff::default();
        }
        let env = self.envelope(Body::App { data });
        self.inner
            .backplane
            .publish(Dest::Interested(&Target::all()), env)
    }

    /// Sends `data` to the application of one other node.
    pub fn send_to_node(&self, node: &NodeId, data: Bytes) -> Handoff {
        let env = self.envelope(Body::App { data });
        self.inner.backplane.publish(Dest::Node(node), env)
    }

    /// Closes every connection `target` selects, on any node, after flushing
    /// what is already queued to them.
    pub fn close(&self, target: &Target, reason: impl Into<String>) -> CloseReport {
        let reason = reason.into();
        let local = self
            .registry()
            .close(target, &CloseReason::Kicked(reason.clone()));
        let mut report = CloseReport {
            local,
            remote: Handoff::default(),
        };
        if self.needs_cluster(target) {
            let env = self.envelope(Body::Close {
                target: target.clone(),
                reason,
            });
            report.remote = self.inner.backplane.publish(Dest::Interested(target), env);
        }
        report
    }

    /// Whether a push or close to `target` may concern another node.
    fn needs_cluster(&self, target: &Target) -> bool {
        if self.inner.backplane.is_standalone() {
            return false;
        }
        !target.only_on(&self.inner.node)
    }

    fn envelope(&self, body: Body) -> Bytes {
        Envelope {
            origin: self.inner.node.clone(),
            id: self.inner.next_envelope.fetch_add(1, Ordering::Relaxed),
            body,
        }
        .encode()
    }

    pub(crate) fn registry(&self) -> RwLockReadGuard<'_, Registry> {
        // Registry methods never panic midway through a mutation that would
        // leave it inconsistent, so a poisoned lock is still usable.
        self.inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn registry_mut(&self) -> RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn handler(&self) -> &Arc<dyn Handler> {
        &self.inner.handler
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The id the next accepted connection gets.
    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId::new(
            self.inner.node.clone(),
            self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Registers an accepted connection. Its greeting is queued before it is
    /// visible to any push, so it is always the connection's first frame.
    pub(crate) fn open(
        &self,
        conn: &ConnId,
        mut accept: Accept,
        transport: Transport,
    ) -> Arc<Outbox> {
        let caps = &self.inner.caps[usize::from(transport == Transport::Tcp)];
        let outbox = Arc::new(Outbox::new(caps.clone()));
        outbox.heard(self.clock_ms());
        for f in &accept.greeting {
            outbox.push(f);
        }
        let recover = std::mem::take(&mut accept.recover);
        if !recover.is_empty() {
            // Before the connection is visible: its first live frame must
            // wait behind the replay, and the stream's entries after the
            // client's position reach it in order.
            outbox.begin_recovery(recover.iter().map(|(s, _)| s.as_str().into()));
            let reg = self.registry();
            for (stream, pos) in &recover {
                reg.recovering(stream, *pos);
            }
        }
        self.registry_mut().insert(
            conn.seq(),
            outbox.clone(),
            accept.user,
            accept.groups,
            accept.session,
            &*self.inner.backplane,
        );
        self.inner.counters.opened(transport);
        if self.inner.closing.is_cancelled() {
            // Shutdown began while this connection was being accepted.
            outbox.close(CloseReason::Shutdown);
        }
        if !recover.is_empty() {
            self.spawn_recovery(outbox.clone(), recover);
        }
        outbox
    }

    /// Waits until membership changes made so far are visible cluster-wide,
    /// at most the query timeout.
    pub(crate) async fn settle(&self) {
        if tokio::time::timeout(self.inner.query_timeout, self.inner.backplane.settle())
            .await
            .is_err()
        {
            tracing::warn!(node = %self.inner.node, "cluster did not confirm a membership change in time");
        }
    }

    /// Unregisters a closed connection.
    pub(crate) fn forget(&self, conn: &ConnId, reason: &CloseReason, transport: Transport) {
        let removed = self
            .registry_mut()
            .remove(conn.seq(), &*self.inner.backplane)
            .is_some();
        if removed {
            self.inner.counters.closed(transport, reason);
        }
    }

    /// Milliseconds since the hub started: the clock of connections'
    /// keep-alive.
    pub(crate) fn clock_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// A token cancelled when the hub starts shutting down.
    pub fn closing(&self) -> CancellationToken {
        self.inner.closing.clone()
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.inner.closing.is_cancelled()
    }

    /// Runs a connection task under the hub's ownership, so shutdown waits for it.
    pub(crate) fn spawn_conn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.conns.spawn(fut);
    }

    /// Walks this node's own connections: an `Opened` change for each, then
    /// its `Bound`, `Joined` and `Session` changes. A gateway answers
    /// GatewayWorker's listing queries (`CMD_SELECT`, group lists) from it.
    pub fn for_each_local(&self, f: &mut dyn FnMut(switchboard_core::MembershipChange)) {
        self.registry().replay(f);
    }

    /// Runs the application's [`Handler::on_connect`] for a connection held
    /// elsewhere: a gateway worker receives its clients' events this way and
    /// turns the decision into commands for the gateway.
    pub async fn handle_connect(&self, info: &crate::ConnectInfo) -> crate::Decision {
        self.inner.handler.on_connect(self, info).await
    }

    /// Runs [`Handler::on_message`] for a connection held elsewhere.
    pub async fn handle_message(&self, conn: &ConnId, frame: switchboard_core::Frame) {
        self.inner.handler.on_message(self, conn, frame).await;
    }

    /// Runs [`Handler::on_close`] for a connection held elsewhere.
    pub async fn handle_close(&self, conn: &ConnId, reason: &CloseReason) {
        self.inner.handler.on_close(self, conn, reason).await;
    }

    /// Shuts the node down: refuses new connections, closes every connection
    /// with "going away" (1001) after flushing what is queued, waits for them at
    /// most the shutdown timeout, then leaves the cluster.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.closing.cancel();
        self.registry().close_all(&CloseReason::Shutdown);
        inner.conns.close();
        if tokio::time::timeout(inner.shutdown_timeout, inner.conns.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                node = %inner.node,
                left = inner.conns.len(),
                "connections still open after the shutdown timeout"
            );
        }
        inner.backplane.leave().await;
        inner.stop.cancel();
        inner.tasks.close();
        inner.tasks.wait().await;
    }
}

/// Heartbeats are spread over this many slices of the period: each tick
/// visits one slice of the connections, so pings do not all leave at once.
const KEEPALIVE_SLICES: u64 = 8;

/// The keep-alive of every connection of the hub: once per heartbeat period
/// each connection is asked to ping its client, or closed if its client has
/// been silent past its idle limit. One task for all rather than a timer in
/// each connection (a timer costs every idle connection about 150 bytes).
/// Holds the hub weakly, like [`dispatch`].
async fn keepalive(hub: Weak<Inner>, stop: CancellationToken, period: Duration) {
    let mut tick =
        tokio::time::interval((period / KEEPALIVE_SLICES as u32).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: skip it, a new connection needs no ping.
    tick.tick().await;
    let mut slice = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = hub.upgrade() else { return };
        let hub = Hub { inner };
        let now = hub.clock_ms();
        for (seq, outbox) in hub.registry().outboxes() {
            if seq % KEEPALIVE_SLICES == slice {
                outbox.keepalive(now);
            }
        }
        slice = (slice + 1) % KEEPALIVE_SLICES;
    }
}

/// Dispatches envelopes from the cluster to this node until the hub stops.
///
/// Holds the hub weakly: a hub dropped without [`Hub::shutdown`] still frees
/// itself, and this task ends with it.
async fn dispatch(hub: Weak<Inner>, stop: CancellationToken, mut inbound: mpsc::Receiver<Bytes>) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(256);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            n = inbound.recv_many(&mut batch, 256) => {
                let Some(inner) = hub.upgrade() else { break };
                if n == 0 {
                    break;
                }
                let hub = Hub { inner };
                let mut after_settle = Vec::new();
                for bytes in batch.drain(..) {
                    if let Some(reply) = hub.handle_envelope(&bytes) {
                        after_settle.push(reply);
                    }
                }
                hub.inner.handled.send_modify(|h| *h += n as u64);
                if !after_settle.is_empty() {
                    hub.reply_after_settle(after_settle);
                }
            }
        }
    }
}

impl Hub {
    /// Handles one envelope from the cluster. A reply that must wait until
    /// the change it reports is visible cluster-wide is returned instead of sent.
    fn handle_envelope(&self, bytes: &[u8]) -> Option<(NodeId, Bytes)> {
        let env = match Envelope::decode(bytes) {
            Ok(env) => env,
            Err(error) => {
                Counters::add(&self.inner.counters.bad_envelopes, 1);
                tracing::warn!(node = %self.inner.node, %error, "undecodable envelope dropped");
                return None;
            }
        };
        // Broadcast channels echo a node's own envelopes back to it; it already
        // acted on them locally.
        if env.origin == self.inner.node {
            return None;
        }
        match env.body {
            Body::Push { target, frame } => {
                // A peer's push: its frames are counted, not the push (the
                // node it was made on counted that).
                let d = self.registry().deliver(&target, &frame);
                self.inner.counters.delivered(&d);
            }
            Body::Recorded {
                target,
                stream,
                pos,
                frame,
            } => {
                self.deliver_recorded(&target, &stream, pos, &frame);
            }
            Body::Close { target, reason } => {
                self.registry().close(&target, &CloseReason::Kicked(reason));
            }
            Body::Request { op } => {
                let mutates = ops::mutates(&op);
                let result = self.execute(op);
                let reply = Envelope {
                    origin: self.inner.node.clone(),
                    id: env.id,
                    body: Body::Reply { result },
                }
                .encode();
                if mutates {
                    // As for a local operation: "done" means visible
                    // cluster-wide (routes bound, directory written).
                    return Some((env.origin, reply));
                }
                self.inner.backplane.publish(Dest::Node(&env.origin), reply);
            }
            Body::Reply { result } => {
                let pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = pending.get(&env.id) {
                    // Capacity covers every node asked, so this never fails for a
                    // live request; a late reply to a finished one is dropped.
                    let _ = tx.try_send((env.origin, result));
                }
            }
            Body::App { data } => {
                self.inner.handler.on_peer_message(self, &env.origin, data);
            }
            _ => {
                Counters::add(&self.inner.counters.bad_envelopes, 1);
            }
        }
        None
    }

    /// Sends replies to operations once the changes they made are visible
    /// cluster-wide: one task per dispatched batch, bounded by the query timeout.
    fn reply_after_settle(&self, replies: Vec<(NodeId, Bytes)>) {
        let hub = self.clone();
        self.inner.tasks.spawn(async move {
            hub.settle().await;
            for (to, reply) in replies {
                hub.inner.backplane.publish(Dest::Node(&to), reply);
            }
        });
    }
}
