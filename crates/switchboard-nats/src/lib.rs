//! NATS backplanes for switchboard.
//!
//! - **core** ([`Mode::Core`]): interest-based subjects. A node subscribes to
//!   its own subject, the broadcast subject, and the subject of every user and
//!   group it holds a connection of (see `subjects`). A push is published once
//!   per user, group or node subject it names, and the NATS servers route it
//!   only to the nodes that subscribed, as RabbitMQ's routing mode does with
//!   bindings, but with no binding to wait for beyond a flush. At-most-once:
//!   what is published while a node's link is down is lost; the sender counts
//!   what it could not hand over (`publish_dropped`) and the receiver counts
//!   gaps in each sender's numbering per subject (`receive_dropped`).
//!
//! Nodes learn who is alive from heartbeats on the broadcast subject (the
//! same liveness protocol as the RabbitMQ backplanes), and cluster-wide
//! questions are asked of the live nodes, which report the ones that did not
//! answer as missing. A node that stops hearing its own heartbeat while the
//! client says it is connected (a half-open link) forces a reconnect; the
//! client resubscribes everything when it is back.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_nats::{NatsBackplane, NatsConfig};
//! let cfg = NatsConfig::from_url("nats://127.0.0.1:4222?mode=core&prefix=chat")?;
//! let backplane = NatsBackplane::new(cfg);
//! // Hub::builder().backplane(backplane) ... joins the cluster when the hub starts.
//! # let _ = backplane;
//! # Ok(()) }
//! ```

mod config;
mod jetstream;
mod publish;
mod receive;
mod subjects;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::Event;
use async_trait::async_trait;
use bytes::Bytes;
use switchboard_core::backplane::{
    BackplaneStats, Dest, Handoff, JoinContext, JoinError, Outgoing, StatCounters, Status, enqueue,
};
use switchboard_core::peers::Peers;
use switchboard_core::relay::{Control, Tracker};
use switchboard_core::{Backplane, MembershipChange, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, Credentials, Mode, NatsConfig};

use receive::Interest;
use subjects::Subjects;

/// The client's view of its link, kept from its events.
#[derive(Default)]
struct Link {
    connected: AtomicBool,
    /// Bumped on every (re)connection.
    generation: AtomicU64,
    /// Told of every new generation.
    changes: tokio::sync::watch::Sender<u64>,
    reconnects: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Link {
    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Wakes at every new link generation.
    fn generation_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn event(&self, event: Event) {
        match event {
            Event::Connected => {
                if self.connected.swap(true, Ordering::AcqRel) {
                    // The first connection, already counted by the join.
                    return;
                }
                let before = self.generation.fetch_add(1, Ordering::AcqRel);
                if before > 0 {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("nats connection re-established");
                }
                self.changes.send_replace(before + 1);
            }
            Event::Disconnected | Event::Closed => {
                if self.connected.swap(false, Ordering::AcqRel) {
                    tracing::warn!("nats connection lost");
                }
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(event.to_string());
            }
            Event::SlowConsumer(_) => {
                // The client dropped messages of a full subscription: the
                // gap in their numbers counts them when the next arrives.
                tracing::warn!("nats subscription overflowed: messages dropped");
            }
            other => {
                tracing::warn!(event = %other, "nats client event");
            }
        }
    }
}

/// State shared by the backplane's tasks, from the moment the node joins.
pub(crate) struct Shared {
    cfg: NatsConfig,
    node: NodeId,
    subjects: Subjects,
    client: async_nats::Client,
    /// The JetStream API over `client`.
    js: async_nats::jetstream::Context,
    link: Arc<Link>,
    out: mpsc::Sender<Outgoing>,
    peers: Peers,
    /// JetStream: the nodes heard from within `queue_age` that did not say
    /// goodbye, which envelopes for users, groups and everyone go to.
    recent: Peers,
    tracker: Mutex<Tracker>,
    interest: Interest,
    stats: StatCounters,
    /// JetStream: the node's consumer is reading.
    receiving: AtomicBool,
    /// JetStream: since when (ms since `started`, 0 none) a write has been
    /// retrying.
    publishing_since: AtomicU64,
    /// The receiving task is waiting for room in the node's inbound queue.
    blocked: AtomicBool,
    /// When the node last heard itself (ms since `started`): its own
    /// heartbeat came back, or an envelope was handed over.
    last_heard: AtomicU64,
    /// The link generation the node last heard itself on.
    heard_on: AtomicU64,
    started: Instant,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Identifies this process's sequence numbers.
    epoch: u64,
}

impl Shared {
    fn heartbeat_interval(&self) -> Duration {
        self.cfg.node_ttl / 3
    }

    fn heard_self(&self) {
        self.last_heard
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.heard_on.store(
            self.link.generation.load(Ordering::Acquire),
            Ordering::Relaxed,
        );
    }

    /// Hands envelopes to the node, counting them; while the node's inbound
    /// queue is full the receiver waits, and is not taken for deaf. False
    /// when the node is gone.
    async fn hand_over(
        &self,
        envelopes: impl IntoIterator<Item = Bytes>,
        inbound: &switchboard_core::backplane::Inbound,
    ) -> bool {
        for envelope in envelopes {
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            self.blocked.store(true, Ordering::Relaxed);
            let taken = inbound.send(envelope).await.is_ok();
            self.blocked.store(false, Ordering::Relaxed);
            if !taken {
                return false;
            }
        }
        true
    }

    /// How long JetStream writes have been retrying, once past a TTL.
    fn publishing_stuck(&self) -> Option<Duration> {
        let since = self.publishing_since.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        let stuck = Duration::from_millis(now.saturating_sub(since));
        (since != 0 && stuck > self.cfg.node_ttl).then_some(stuck)
    }

    /// How long the node has shown no sign of hearing its subscriptions.
    fn deaf_for(&self) -> Duration {
        if self.blocked.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_heard.load(Ordering::Relaxed)))
    }

    /// Publishes a liveness message; failures only log (the heartbeat
    /// notices a link that stays broken).
    async fn send_control(&self, subject: &str, msg: &Control) {
        if let Err(e) = self
            .client
            .publish(subject.to_owned(), subjects::framed(0, &msg.encode()))
            .await
        {
            tracing::debug!(error = %e, "could not publish a liveness message");
        }
    }
}

/// Announces the node every third of the TTL, drops silent peers, says hello
/// again after a reconnect, and forces a reconnect when the node stops
/// hearing itself while the client thinks it is connected, until `stop`.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.heartbeat_interval();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = Control::Heartbeat(shared.node.clone());
    let mut greeted = shared.link.generation.load(Ordering::Acquire);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A silent node's numbering is kept: if it comes back (its link,
        // not its process, was lost) the gap counts.
        shared.peers.expire();
        shared.recent.expire();
        if !shared.link.is_connected() {
            continue;
        }
        let generation = shared.link.generation.load(Ordering::Acquire);
        if generation != greeted {
            greeted = generation;
            // Silence before the reconnect says nothing of the new link.
            shared.last_heard.store(
                shared.started.elapsed().as_millis() as u64,
                Ordering::Relaxed,
            );
            let hello = Control::Hello(shared.node.clone());
            shared
                .send_control(&shared.subjects.broadcast(), &hello)
                .await;
        }
        let silent = shared.deaf_for();
        if silent > interval * 3 {
            // Connected but deaf: the node's own heartbeats no longer come
            // back. The client's pings may take longer to notice.
            tracing::warn!(?silent, "nats link delivers nothing: reconnecting");
            shared.link.connected.store(false, Ordering::Release);
            if let Err(e) = shared.client.force_reconnect().await {
                tracing::warn!(error = %e, "could not force a reconnect");
            }
            shared.heard_self();
            continue;
        }
        shared
            .send_control(&shared.subjects.broadcast(), &beat)
            .await;
    }
}

/// Whether a live node already uses `node`: a hello asked of the node's own
/// subject (before this one subscribes to it) gets an answer only from a
/// process holding that id. The servers answer "no responders" at once when
/// nobody does; a slow link counts as free after a moment.
async fn id_taken(client: &async_nats::Client, cfg: &NatsConfig, node: &NodeId) -> bool {
    let subject = Subjects::new(&cfg.prefix).node(node.as_str());
    let hello = subjects::framed(0, &Control::Hello(node.clone()).encode());
    let asked = client.request(subject, hello);
    match tokio::time::timeout(Duration::from_millis(500), asked).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "nobody answers for this node id");
            false
        }
        Err(_) => false,
    }
}

/// A node's attachment to a NATS-backed cluster. See the crate docs.
pub struct NatsBackplane {
    cfg: NatsConfig,
    shared: OnceLock<Arc<Shared>>,
}

impl std::fmt::Debug for NatsBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackplane")
            .field("cfg", &self.cfg)
            .field("node", &self.shared.get().map(|s| s.node.clone()))
            .finish()
    }
}

impl NatsBackplane {
    /// A backplane with these options. It connects when its node joins.
    pub fn new(cfg: NatsConfig) -> Self {
        Self {
            cfg,
            shared: OnceLock::new(),
        }
    }

    /// The options in use.
    pub fn config(&self) -> &NatsConfig {
        &self.cfg
    }
}

/// How long a joining node waits for an answer to its hello before it
/// concludes it is alone.
const ALONE: Duration = Duration::from_millis(500);
/// Messages one subscription holds before the client drops (and the receiver
/// counts) them: bounds a node that cannot keep up.
const SUBSCRIPTION_CAPACITY: usize = 4096;

async fn connect(
    cfg: &NatsConfig,
    node: &NodeId,
    link: Arc<Link>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("switchboard {node}"))
        .connection_timeout(Duration::from_secs(2))
        // Pings notice a dead link; the node's own heartbeat notices a deaf one.
        .ping_interval(cfg.node_ttl / 3)
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let ms = 50u64.saturating_mul(1 << attempts.min(6)).min(2000);
            Duration::from_millis(ms + rand::random::<u64>() % (ms / 4 + 1))
        })
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        // JetStream requests (a pull stream's consumer info after a
        // reconnect among them) wait this long for a leader, not 10 s.
        .request_timeout(Some(Duration::from_secs(2)))
        .require_tls(cfg.tls)
        .event_callback(move |event| {
            let link = link.clone();
            async move { link.event(event) }
        });
    opts = match &cfg.credentials {
        Credentials::None => opts,
        Credentials::Token(t) => opts.token(t.clone()),
        Credentials::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
    };
    opts.connect(cfg.servers.clone()).await
}

#[async_trait]
impl Backplane for NatsBackplane {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        let cfg = self.cfg.clone();
        let link = Arc::new(Link::default());
        let client = connect(&cfg, &ctx.node, link.clone())
            .await
            .map_err(|e| JoinError::Unreachable(Box::new(e)))?;
        // The Connected event may come after connect returns: whichever of
        // the two comes first counts the first connection.
        if link
            .generation
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            link.connected.store(true, Ordering::Release);
        }
        if id_taken(&client, &cfg, &ctx.node).await {
            return Err(JoinError::DuplicateNode(ctx.node));
        }
        let (out, out_rx) = mpsc::channel(publish::QUEUE);
        let s = Arc::new(Shared {
            subjects: Subjects::new(&cfg.prefix),
            peers: Peers::new(cfg.node_ttl),
            recent: Peers::new(cfg.queue_age.max(cfg.node_ttl)),
            cfg,
            node: ctx.node.clone(),
            js: async_nats::jetstream::new(client.clone()),
            client,
            link,
            out,
            tracker: Mutex::new(Tracker::default()),
            interest: Interest::default(),
            stats: StatCounters::default(),
            receiving: AtomicBool::new(false),
            publishing_since: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
            heard_on: AtomicU64::new(0),
            started: Instant::now(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            epoch: rand::random(),
        });
        if self.shared.set(s.clone()).is_err() {
            return Err(JoinError::DuplicateNode(ctx.node));
        }
        s.peers.start_discovery();
        let stop = s.stop.clone();
        match s.cfg.mode {
            Mode::Core => {
                s.receiving.store(true, Ordering::Release);
                s.tasks
                    .spawn(receive::run(s.clone(), Some(ctx.inbound), stop.clone()));
            }
            Mode::JetStream => {
                let consumer = jetstream::prepare(&s)
                    .await
                    .map_err(|e| JoinError::Unreachable(e.into()))?;
                s.tasks.spawn(receive::run(s.clone(), None, stop.clone()));
                s.tasks.spawn(jetstream::consume(
                    s.clone(),
                    consumer,
                    ctx.inbound,
                    ctx.handled,
                    stop.clone(),
                ));
            }
        }
        s.tasks.spawn(publish::run(s.clone(), out_rx, stop.clone()));
        // Subscribed (and the server has the subscriptions) before the hello,
        // so that every welcome reaches us.
        s.interest.fence();
        s.interest.settle().await;
        let hello = Control::Hello(s.node.clone());
        s.send_control(&s.subjects.broadcast(), &hello).await;
        s.tasks.spawn(heartbeat(s.clone(), stop));
        // Learn who is alive before serving, so that the first answers count
        // every node.
        let interval = s.heartbeat_interval();
        s.peers.discovered(ALONE.min(interval), interval).await;
        tracing::info!(
            node = %s.node, mode = %s.cfg.mode, url = %s.cfg.display_url(),
            peers = s.peers.live(Some(&s.node)).len(), "joined the nats cluster"
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
            && s.cfg.mode == Mode::Core
        {
            s.interest.report(&s.subjects, change);
        }
    }

    async fn settle(&self) {
        if let Some(s) = self.shared.get() {
            s.interest.settle().await;
        }
    }

    fn status(&self) -> Status {
        let Some(s) = self.shared.get() else {
            return Status::Connecting {
                reason: "not joined yet".into(),
            };
        };
        let generation = s.link.generation.load(Ordering::Acquire);
        let reason = if !s.link.is_connected() {
            let why = s
                .link
                .error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Some(format!("nats unreachable: {}", why.unwrap_or_default()))
        } else if s.heard_on.load(Ordering::Relaxed) != generation {
            Some("nats reconnected: waiting to hear the node's own heartbeat".to_owned())
        } else if s.deaf_for() > s.heartbeat_interval() * 2 {
            Some(format!(
                "nats delivered nothing to this node for {:?}",
                s.deaf_for()
            ))
        } else if !s.receiving.load(Ordering::Acquire) {
            Some("nats jetstream consumer down".to_owned())
        } else if let Some(stuck) = s.publishing_stuck() {
            Some(format!("nats jetstream writes failing for {stuck:?}"))
        } else if !s.interest.synced() {
            Some("nats subscriptions being made".to_owned())
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
        if s.link.is_connected() {
            // Peers drop this node at once instead of after the TTL.
            let bye = Control::Bye(s.node.clone());
            let said = async {
                s.send_control(&s.subjects.broadcast(), &bye).await;
                s.client.flush().await
            };
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), said).await {
                tracing::debug!(error = %e, "could not say goodbye");
            }
            if s.cfg.mode == Mode::JetStream {
                let retired = tokio::time::timeout(Duration::from_secs(2), jetstream::retire(s));
                if let Ok(Err(e)) = retired.await {
                    tracing::warn!(error = %e, "could not remove this node's jetstream consumer");
                }
            }
        }
        s.stop.cancel();
        s.tasks.close();
        s.tasks.wait().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), s.client.drain()).await;
    }
}
