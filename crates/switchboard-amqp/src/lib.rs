//! RabbitMQ backplanes for switchboard.
//!
//! Every node has one exclusive, bounded queue on the broker
//! (`PREFIX.node.NODE`), deleted by the broker with its bindings when the
//! node's connection closes or dies, and publishes to one exchange of the
//! deployment (`PREFIX.MODE` unless named). Two ways to route:
//!
//! - **fanout** ([`Mode::Fanout`]): a fanout exchange; every node receives
//!   every message and keeps what concerns its connections. Nothing to keep in
//!   step on the broker; each push costs one delivery per node.
//! - **routing** ([`Mode::Routing`]): a direct exchange; a node's queue is bound
//!   with its node key, the broadcast key, and one key per user and per group
//!   it holds a connection of (bound on the first, unbound on the last). A push
//!   is published once per user, group or node key it names and reaches only
//!   the nodes that hold a recipient. A connection is welcomed, and a join
//!   returns, only once the broker confirmed the binding.
//!
//! Both are at-most-once. Envelopes are published with publisher confirms:
//! what the broker refuses or returns, and what was in flight when the
//! connection died, is counted as `publish_dropped`; envelopes carry
//! per-stream sequence numbers, so what a node's queue lost (a broker restart,
//! a reconnect) is counted by the receiver as `receive_dropped`.
//!
//! Nodes learn who is alive from the broker alone (heartbeats, a hello
//! answered by every live node, a bye), and cluster-wide questions are asked
//! of the live nodes. A node that stops hearing its own heartbeat, or whose
//! consumer or channel fails, reconnects, declares everything again and
//! rebinds what it holds.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_amqp::{AmqpBackplane, AmqpConfig};
//! let cfg = AmqpConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?mode=routing&prefix=chat")?;
//! let backplane = AmqpBackplane::new(cfg);
//! // Hub::builder().backplane(backplane) ... joins the cluster when the hub starts.
//! # let _ = backplane;
//! # Ok(()) }
//! ```

mod binder;
mod config;
mod link;
mod publish;
mod receive;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use switchboard_core::backplane::{
    BackplaneStats, Dest, Handoff, JoinContext, JoinError, Outgoing, StatCounters, Status, enqueue,
};
use switchboard_core::{Backplane, MembershipChange, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{AmqpConfig, ConfigError, Mode};

use binder::Binder;
use link::{Link, Names, OpenError, Session};
use switchboard_core::peers::Peers;
use wire::{Control, Tracker};

/// An AMQP operation, boxed so that operations of different kinds queue together.
pub(crate) type BoxedOp<'a, T> = Pin<Box<dyn Future<Output = lapin::Result<T>> + Send + 'a>>;

/// Polls a future once. An AMQP operation queues its frames on its first
/// poll, so polling operations once each, in turn, sends them in that order.
pub(crate) async fn poll_once<F: Future + ?Sized>(mut f: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
}

/// Sends operations in order without waiting for each one's reply, then
/// waits for all of them.
pub(crate) async fn in_order<'a, T>(
    ops: impl IntoIterator<Item = BoxedOp<'a, T>>,
) -> Vec<lapin::Result<T>> {
    let mut started = Vec::new();
    for mut op in ops {
        let first = poll_once(op.as_mut()).await;
        started.push((op, first));
    }
    let mut done = Vec::with_capacity(started.len());
    for (op, first) in started {
        done.push(match first {
            Poll::Ready(r) => r,
            Poll::Pending => op.await,
        });
    }
    done
}

/// State shared by the backplane's tasks, from the moment the node joins.
pub(crate) struct Shared {
    cfg: AmqpConfig,
    node: NodeId,
    my_key: String,
    link: Link,
    out: mpsc::Sender<Outgoing>,
    peers: Peers,
    tracker: Mutex<Tracker>,
    binder: Binder,
    stats: StatCounters,
    /// A consumer is reading the node's queue.
    receiving: AtomicBool,
    /// The consumer is waiting for room in the node's inbound queue.
    blocked: AtomicBool,
    /// When the consumer last showed it hears the queue (ms since `started`):
    /// the node's own heartbeat came back, or an envelope was handed over.
    last_heard: AtomicU64,
    started: Instant,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Identifies this process's sequence numbers.
    epoch: u64,
}

impl Shared {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn my_key(&self) -> &str {
        &self.my_key
    }

    fn heartbeat_interval(&self) -> Duration {
        self.cfg.node_ttl / 3
    }

    fn heard_self(&self) {
        self.last_heard
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the consumer has shown no sign of hearing the queue.
    fn deaf_for(&self) -> Duration {
        if self.blocked.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_heard.load(Ordering::Relaxed)))
    }
}

/// Publishes a liveness or fence message on the session's control channel.
pub(crate) async fn publish_control(
    shared: &Shared,
    session: &Session,
    key: &str,
    msg: &Control,
) -> lapin::Result<()> {
    let body = msg.encode();
    session
        .control
        .basic_publish(
            shared.link.names().exchange.clone(),
            key.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await?
        .await
        .map(drop)
}

/// Announces the node every third of the TTL, drops silent peers, and fails
/// a session whose consumer stopped hearing the queue, until `stop`.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.heartbeat_interval();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = Control::Heartbeat(shared.node().clone());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A silent node's sequence tracking is kept: if it comes back (its
        // broker connection, not its process, was lost) the gap counts.
        shared.peers.expire();
        let Some(session) = shared.link.current() else {
            continue;
        };
        let silent = shared.deaf_for();
        if shared.receiving.load(Ordering::Acquire) && silent > interval * 3 {
            // Connected but deaf: the node's own heartbeats no longer come back.
            let why = format!("the node's queue delivered nothing for {silent:?}");
            shared.link.failed(session.generation, &why);
            continue;
        }
        if let Err(e) = publish_control(&shared, &session, wire::BROADCAST_KEY, &beat).await {
            shared.link.failed(session.generation, &e);
        }
    }
}

/// A node's attachment to a RabbitMQ-backed cluster. See the crate docs.
pub struct AmqpBackplane {
    cfg: AmqpConfig,
    shared: OnceLock<Arc<Shared>>,
}

impl std::fmt::Debug for AmqpBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBackplane")
            .field("mode", &self.cfg.mode)
            .field("exchange", &self.cfg.exchange_name())
            .field("node", &self.shared.get().map(|s| s.node.clone()))
            .finish()
    }
}

impl AmqpBackplane {
    /// A backplane with these options. It connects when its node joins.
    pub fn new(cfg: AmqpConfig) -> Self {
        Self {
            cfg,
            shared: OnceLock::new(),
        }
    }

    /// The options in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.cfg
    }
}

/// How long a joining node waits for an answer to its hello before it
/// concludes it is alone.
const ALONE: Duration = Duration::from_millis(500);
/// How long a joining node waits for its routing keys to be bound.
const FIRST_BIND: Duration = Duration::from_secs(5);

#[async_trait]
impl Backplane for AmqpBackplane {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        let cfg = self.cfg.clone();
        let names = Names::new(&cfg, ctx.node.as_str());
        let (out, out_rx) = mpsc::channel(publish::QUEUE);
        let s = Arc::new(Shared {
            my_key: names.node_key.to_string(),
            link: Link::new(cfg.clone(), names),
            peers: Peers::new(cfg.node_ttl),
            cfg,
            node: ctx.node.clone(),
            out,
            tracker: Mutex::new(Tracker::default()),
            binder: Binder::new(),
            stats: StatCounters::default(),
            receiving: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
            started: Instant::now(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            epoch: rand::random(),
        });
        if self.shared.set(s.clone()).is_err() {
            return Err(JoinError::DuplicateNode(ctx.node));
        }
        s.link.start().await.map_err(|e| match e {
            OpenError::Locked => JoinError::DuplicateNode(ctx.node.clone()),
            other => JoinError::Unreachable(Box::new(other)),
        })?;
        s.peers.start_discovery();
        let stop = s.stop.clone();
        s.tasks.spawn({
            let (s, stop) = (s.clone(), stop.clone());
            async move { s.link.supervise(stop).await }
        });
        s.tasks
            .spawn(receive::consumer(s.clone(), ctx.inbound, stop.clone()));
        s.tasks.spawn(publish::run(s.clone(), out_rx, stop.clone()));
        if s.cfg.mode == Mode::Routing {
            let (s, local, stop) = (s.clone(), ctx.local.clone(), stop.clone());
            s.tasks.clone().spawn(async move {
                s.binder
                    .run(&s.link, s.node.clone(), local, &s.tracker, stop)
                    .await
            });
        }
        s.tasks.spawn(heartbeat(s.clone(), stop));
        // Learn who is alive before serving, so that the first answers count
        // every node.
        let interval = s.heartbeat_interval();
        s.peers.discovered(ALONE.min(interval), interval).await;
        if s.cfg.mode == Mode::Routing {
            let _ = tokio::time::timeout(FIRST_BIND, s.binder.settle()).await;
        }
        tracing::info!(
            node = %s.node, mode = %s.cfg.mode, exchange = %s.link.names().exchange,
            peers = s.peers.live(Some(&s.node)).len(), "joined the amqp cluster"
        );
        Ok(())
    }

    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff {
        match self.shared.get() {
            Some(s) => enqueue(&s.out, dest, envelope, &s.stats),
            None => Handoff {
                sent: 0,
                dropped: 1,
            },
        }
    }

    fn peers(&self) -> Vec<NodeId> {
        self.shared
            .get()
            .map(|s| s.peers.live(Some(&s.node)))
            .unwrap_or_default()
    }

    fn membership(&self, change: &MembershipChange) {
        if let Some(s) = self.shared.get()
            && s.cfg.mode == Mode::Routing
        {
            s.binder.report(change);
        }
    }

    async fn settle(&self) {
        if let Some(s) = self.shared.get()
            && s.cfg.mode == Mode::Routing
        {
            s.binder.settle().await;
        }
    }

    fn status(&self) -> Status {
        let Some(s) = self.shared.get() else {
            return Status::Connecting {
                reason: "not joined yet".into(),
            };
        };
        let link = s.link.state();
        let reason = if link.session.is_none() {
            Some(format!(
                "amqp broker unreachable: {}",
                link.error.unwrap_or_default()
            ))
        } else if s.cfg.mode == Mode::Routing
            && s.binder.synced.load(Ordering::Acquire) != link.generation
        {
            Some("amqp routing keys being bound".to_owned())
        } else if !s.receiving.load(Ordering::Acquire) {
            Some("amqp consumer down".to_owned())
        } else {
            None
        };
        Status::unless(reason)
    }

    fn stats(&self) -> BackplaneStats {
        self.shared.get().map_or_else(BackplaneStats::default, |s| {
            s.stats.snapshot(s.link.reconnects.load(Ordering::Relaxed))
        })
    }

    async fn leave(&self) {
        let Some(s) = self.shared.get() else {
            return;
        };
        if let Some(session) = s.link.current() {
            // Peers drop this node at once instead of after the TTL.
            let bye = Control::Bye(s.node.clone());
            let said = publish_control(s, &session, wire::BROADCAST_KEY, &bye);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), said).await {
                tracing::debug!(error = %e, "could not say goodbye");
            }
        }
        s.stop.cancel();
        s.tasks.close();
        s.tasks.wait().await;
        // The broker deletes the node's queue and bindings with the connection.
        s.link.close().await;
    }
}
