//! Configuring and starting a [`Hub`].

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use switchboard_core::{Backplane, FrameKind, History, JoinContext, NodeId, Standalone};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Hub, Inner, View, dispatch, epoch_micros};
use crate::config::Limits;
use crate::error::BuildError;
use crate::handler::{Handler, NoopHandler};
use crate::outbox::Caps;
use crate::registry::Registry;
use crate::stats::Counters;

/// Envelopes from peers waiting to be dispatched. Beyond this the backplane
/// drops and counts (the in-memory bus) or waits (Redis, which then buffers).
/// Sized for a burst of 1,000 senders × 100 pushes between two nodes (about
/// 8 MB of envelopes at most): 8,192 was seen to overflow under such a burst.
pub(crate) const INBOUND_CAPACITY: usize = 64 * 1024;

/// Builds a [`Hub`]: configure everything, then [`HubBuilder::start`].
#[must_use]
pub struct HubBuilder {
    node: Option<NodeId>,
    default_kind: FrameKind,
    limits: Limits,
    query_timeout: Duration,
    shutdown_timeout: Duration,
    backplane: Arc<dyn Backplane>,
    handler: Arc<dyn Handler>,
    first_conn_seq: Option<u64>,
    history: Option<Arc<dyn History>>,
    record: Vec<String>,
}

impl std::fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubBuilder")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl HubBuilder {
    pub(super) fn new() -> Self {
        Self {
            node: None,
            default_kind: FrameKind::Text,
            limits: Limits::default(),
            query_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(10),
            backplane: Arc::new(Standalone),
            handler: Arc::new(NoopHandler),
            first_conn_seq: None,
            history: None,
            record: Vec::new(),
        }
    }

    /// This node's id (default: random).
    pub fn node_id(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// The frame kind of payloads pushed without one (default: text).
    pub fn default_kind(mut self, kind: FrameKind) -> Self {
        self.default_kind = kind;
        self
    }

    /// Connection limits and timeouts.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a cluster query or remote operation waits for peers (default 2 s).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// How long shutdown waits for connections to close (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How this node reaches its cluster (default: standalone, no peers).
    pub fn backplane(mut self, backplane: impl Backplane) -> Self {
        self.backplane = Arc::new(backplane);
        self
    }

    /// A shared backplane.
    pub fn backplane_arc(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = backplane;
        self
    }

    /// The application.
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Arc::new(handler);
        self
    }

    /// A shared application.
    pub fn handler_arc(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handler = handler;
        self
    }

    /// The sequence number of the first accepted connection (default: the
    /// start time in microseconds, so a restarted node does not reuse ids).
    /// Gateways start at 1, like GatewayWorker, whose connection ids are
    /// 32-bit.
    pub fn first_conn_seq(mut self, seq: u64) -> Self {
        self.first_conn_seq = Some(seq);
        self
    }

    /// Where recorded pushes are kept (default: nowhere, and
    /// [`Hub::push_recorded`] fails). Nodes of one cluster must share one
    /// store: a [`switchboard_core::MemoryHistory`] for the nodes of one
    /// process, Redis for the others.
    pub fn history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }

    /// Streams whose pushes the application records without being asked
    /// (see [`Hub::records`]): patterns such as `user:*` or `group:news-*`,
    /// where `*` matches any run of characters and `\*` a star.
    pub fn record<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.record = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Joins the cluster and starts the hub's background tasks. Must be called
    /// inside a tokio runtime.
    pub async fn start(self) -> Result<Hub, BuildError> {
        let node = self.node.unwrap_or_else(NodeId::random);
        let (tx, rx) = mpsc::channel(INBOUND_CAPACITY);
        let (handled, handled_rx) = tokio::sync::watch::channel(0u64);
        let start = epoch_micros();
        let hub = Hub {
            inner: Arc::new_cyclic(|weak| Inner {
                handled,
                view: Arc::new(View(weak.clone())),
                registry: RwLock::new(Registry::new(node.clone(), self.limits.max_groups_per_conn)),
                node,
                default_kind: self.default_kind,
                caps: [
                    outbox_caps(&self.limits, self.limits.ws_idle_timeout),
                    outbox_caps(&self.limits, self.limits.tcp_idle_timeout),
                ],
                limits: self.limits,
                query_timeout: self.query_timeout,
                shutdown_timeout: self.shutdown_timeout,
                backplane: self.backplane,
                handler: self.handler,
                pending: Mutex::new(HashMap::new()),
                next_envelope: AtomicU64::new(start),
                next_seq: AtomicU64::new(self.first_conn_seq.unwrap_or(start)),
                counters: Counters::default(),
                conns: TaskTracker::new(),
                tasks: TaskTracker::new(),
                closing: CancellationToken::new(),
                stop: CancellationToken::new(),
                epoch: tokio::time::Instant::now(),
                history: self.history,
                record: self.record,
                gaps: Arc::new(tokio::sync::Notify::new()),
                record_order: (0..super::history::ORDER_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
            }),
        };
        let ctx = JoinContext::new(
            hub.inner.node.clone(),
            tx,
            handled_rx,
            hub.inner.view.clone(),
        );
        hub.inner.backplane.join(ctx).await?;
        hub.inner.tasks.spawn(dispatch(
            Arc::downgrade(&hub.inner),
            hub.inner.stop.clone(),
            rx,
        ));
        hub.inner.tasks.spawn(super::keepalive(
            Arc::downgrade(&hub.inner),
            hub.inner.stop.clone(),
            hub.inner.limits.heartbeat,
        ));
        hub.inner.tasks.spawn(super::history::fill_gaps(
            Arc::downgrade(&hub.inner),
            hub.inner.stop.clone(),
            hub.inner.gaps.clone(),
        ));
        tracing::info!(node = %hub.inner.node, "hub started");
        Ok(hub)
    }
}

fn outbox_caps(l: &Limits, idle: Option<Duration>) -> Arc<Caps> {
    Arc::new(Caps {
        frames: l.outbox_frames,
        bytes: l.outbox_bytes,
        policy: l.slow_consumer,
        idle_ms: idle.map_or(0, |d| d.as_millis().max(1) as u64),
    })
}
