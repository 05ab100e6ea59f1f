//! Redis backplanes for switchboard.
//!
//! Two ways to move envelopes, one directory:
//!
//! - **pub/sub** ([`Mode::PubSub`]): every node subscribes to its own channel
//!   and a broadcast channel. A push to users or groups is published once to
//!   each node that holds them (a route the node keeps, learned from the
//!   directory and kept current by the holders' changes), a push to one
//!   connection only to its node, a push to everyone once on the broadcast
//!   channel. At-most-once: while a node is disconnected it misses what is
//!   published; publishes that fail are counted as dropped, and receivers
//!   count gaps in each sender's sequence numbers. For one TTL after a
//!   reconnect, since the directory may be incomplete until every node has
//!   rebuilt its entries, pushes to users and groups also go to every node
//!   known alive, subscribed (as Redis reports) or published to before.
//! - **queue** ([`Mode::Queue`]): a Redis Stream per node, read through a
//!   consumer group and acknowledged after local delivery. At-least-once, with
//!   duplicates dropped by envelope id. Sends that fail are retried until Redis
//!   is back (bounded by the publish queue); a node restarted under the same id
//!   gets what arrived while it was down (within `queue_cap` and `queue_age`).
//!   Durability across a Redis restart is Redis's: run it with AOF.
//!
//! The **directory** (users, groups, connections, sessions, node liveness) is
//! written by each node for its own connections and read by everyone. Answers
//! count only nodes whose liveness deadline (Redis clock) has not passed, so a
//! node that dies disappears from every answer within `node_ttl`; its entries
//! are collected one TTL later (pub/sub) or after `queue_age` (queue).
//!
//! **History** ([`RedisHistory`]): recorded pushes per user and group stream,
//! kept in Redis Streams so that a client reconnecting to any node can
//! recover what it missed.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_redis::{RedisBackplane, RedisConfig};
//! let cfg = RedisConfig::from_url("redis://127.0.0.1:6379?mode=queue&prefix=chat")?;
//! let backplane = RedisBackplane::connect(cfg).await?;
//! # let _ = backplane;
//! # Ok(()) }
//! ```

mod config;
mod directory;
mod history;
mod keys;
mod link;
mod liveness;
mod publish;
mod receive;
mod routes;
mod scripts;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::RedisError;
use switchboard_core::backplane::{
    BackplaneStats, Dest, Handoff, JoinContext, JoinError, Outgoing, QueryOutcome, StatCounters,
    Status, enqueue,
};
use switchboard_core::{Backplane, ConnId, LocalAnswer, MembershipChange, NodeId, Query, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, Mode, RedisConfig};
pub use history::RedisHistory;

use directory::Directory;
use keys::Keys;
use link::Link;
use liveness::Liveness;

/// State shared by the backplane's tasks.
pub(crate) struct Shared {
    cfg: RedisConfig,
    keys: Keys,
    link: Arc<Link>,
    node: OnceLock<NodeId>,
    dir: Directory,
    out: mpsc::Sender<Outgoing>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    live: RwLock<Liveness>,
    /// Which nodes hold which users and groups, as far as this node knows.
    routes: routes::Routes,
    stats: StatCounters,
    /// The subscription (pub/sub) or the stream consumer (queue) is up.
    receiving: AtomicBool,
    /// When the node last heard its own probe on its channel (ms, local clock).
    last_probe: AtomicU64,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Identifies this process's sequence numbers on pub/sub channels.
    epoch: u64,
}

impl Shared {
    fn node(&self) -> &NodeId {
        // Invariant: tasks that call this start after `join` set the node.
        self.node.get().expect("node id set at join")
    }

    fn heartbeat_interval(&self) -> Duration {
        self.cfg.node_ttl / 3
    }

    /// Pub/sub: how long the node's own probes (every heartbeat) have not
    /// come back, once past two heartbeats: the subscription is deaf.
    fn probe_silence(&self) -> Option<Duration> {
        if self.cfg.mode != Mode::PubSub {
            return None;
        }
        let last = self.last_probe.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let silent = Duration::from_millis(now.saturating_sub(last));
        (last != 0 && silent > self.heartbeat_interval() * 2).then_some(silent)
    }

    fn redis_now_ms(&self) -> u64 {
        self.live.read().unwrap_or_else(|p| p.into_inner()).now_ms()
    }
}

/// How long a node's stream outlives the last sign of its owner.
pub(crate) fn queue_expiry(cfg: &RedisConfig) -> Duration {
    (cfg.queue_age + cfg.node_ttl) * 2
}

/// A node's attachment to a Redis-backed cluster. See the crate docs.
pub struct RedisBackplane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("mode", &self.shared.cfg.mode)
            .field("prefix", &self.shared.cfg.prefix)
            .field("node", &self.shared.node.get())
            .finish()
    }
}

fn unreachable(e: RedisError) -> JoinError {
    JoinError::Unreachable(Box::new(e))
}

impl RedisBackplane {
    /// Connects to Redis. Fails if Redis cannot be reached now; once joined,
    /// the backplane reconnects by itself.
    pub async fn connect(cfg: RedisConfig) -> Result<Self, JoinError> {
        let target = link::Target::from_config(&cfg).map_err(unreachable)?;
        let link = Link::connect(target).await.map_err(unreachable)?;
        let (out, out_rx) = mpsc::channel(publish::QUEUE);
        let keys = if cfg.cluster.is_empty() {
            Keys::new(&cfg.prefix)
        } else {
            Keys::for_cluster(&cfg.prefix)
        };
        Ok(Self {
            shared: Arc::new(Shared {
                dir: Directory::new(keys.clone()),
                keys,
                cfg,
                link: Arc::new(link),
                node: OnceLock::new(),
                out,
                out_rx: Mutex::new(Some(out_rx)),
                live: RwLock::new(Liveness::default()),
                routes: routes::Routes::default(),
                stats: StatCounters::default(),
                receiving: AtomicBool::new(false),
                last_probe: AtomicU64::new(0),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                epoch: rand::random(),
            }),
        })
    }

    /// The options in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.cfg
    }
}

/// Renews liveness, refreshes the view of live nodes, collects dead nodes,
/// probes the node's own subscription, until `stop`.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.heartbeat_interval();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = shared.node().to_string();
    // No collecting of dead peers until then: after an outage of the
    // directory nobody could renew, and a peer's lapsed deadline says nothing
    // about the peer.
    let mut collect_after = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some((mut conn, generation)) = shared.link.current() else {
            continue;
        };
        let cfg = &shared.cfg;
        match liveness::beat(&mut conn, &shared.keys, &me, cfg.node_ttl).await {
            Ok(beat) => {
                if beat.was_dead {
                    // Peers may have collected this node's entries while it
                    // could not renew its deadline: rebuild them.
                    tracing::warn!(node = %me, "liveness had lapsed; rebuilding directory entries");
                    shared.dir.force_rebuild();
                    collect_after = tokio::time::Instant::now() + cfg.node_ttl;
                }
                shared
                    .live
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .merge_newer(beat.liveness);
            }
            Err(e) => {
                shared.link.failed(generation, &e);
                collect_after = tokio::time::Instant::now() + cfg.node_ttl;
                continue;
            }
        }
        let mut pipe = redis::pipe();
        // Proof of life for every node's routes listener (see `routes`).
        let publish = shared.keys.publish_command();
        pipe.cmd(publish)
            .arg(shared.keys.routes())
            .arg([routes::wire::PROBE].as_slice())
            .ignore();
        match cfg.mode {
            Mode::PubSub => {
                pipe.cmd(publish)
                    .arg(shared.keys.channel(&me))
                    .arg([receive::PROBE].as_slice())
                    .ignore();
            }
            Mode::Queue => {
                pipe.pexpire(shared.keys.queue(&me), queue_expiry(cfg).as_millis() as i64)
                    .ignore();
            }
        }
        // Bounded by the interval: on a Redis Cluster the probe goes to the
        // node's channel's shard, and a dead shard must not hold up the next
        // renewal of liveness on the directory's shard.
        match tokio::time::timeout(interval, link::exec(&mut conn, &pipe)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.link.failed(generation, &e);
                continue;
            }
            Err(_) => {
                tracing::debug!("redis probes timed out");
                continue;
            }
        }
        if tokio::time::Instant::now() < collect_after {
            continue;
        }
        let live = shared
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let collected = liveness::collect_dead(
            &mut conn,
            &shared.keys,
            &me,
            &live,
            cfg.mode,
            cfg.node_ttl,
            cfg.queue_age,
        );
        if let Err(e) = collected.await {
            shared.link.failed(generation, &e);
        }
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        let s = &self.shared;
        if s.node.set(ctx.node.clone()).is_err() {
            return Err(JoinError::DuplicateNode(ctx.node));
        }
        let me = ctx.node.to_string();
        // Announce liveness before anything else, so peers route to us.
        let (mut conn, _) = s.link.current().ok_or_else(|| {
            unreachable(RedisError::from((
                redis::ErrorKind::Io,
                "redis connection lost",
            )))
        })?;
        let beat = liveness::beat(&mut conn, &s.keys, &me, s.cfg.node_ttl)
            .await
            .map_err(unreachable)?;
        *s.live.write().unwrap_or_else(|p| p.into_inner()) = beat.liveness;

        let stop = s.stop.clone();
        s.tasks.spawn({
            let link = s.link.clone();
            let stop = stop.clone();
            async move { link.supervise(stop).await }
        });
        s.tasks.spawn({
            let shared = s.clone();
            let (node, local, stop) = (ctx.node.clone(), ctx.local.clone(), stop.clone());
            async move {
                let ttl = shared.cfg.node_ttl;
                shared
                    .dir
                    .run(shared.link.clone(), node, local, ttl, stop)
                    .await
            }
        });
        s.tasks.spawn(routes::listen(s.clone(), stop.clone()));
        if let Some(rx) = s.out_rx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            s.tasks.spawn(publish::run(s.clone(), rx, stop.clone()));
        }
        match s.cfg.mode {
            Mode::PubSub => {
                // Subscribed before join returns: nothing sent to us after this is missed.
                let stream = receive::subscribe(s).await.map_err(unreachable)?;
                s.receiving.store(true, Ordering::Release);
                s.tasks.spawn(receive::subscriber(
                    s.clone(),
                    stream,
                    ctx.inbound,
                    stop.clone(),
                ));
            }
            Mode::Queue => {
                let backlog = receive::prepare_queue(s).await.map_err(unreachable)?;
                s.receiving.store(true, Ordering::Release);
                s.tasks.spawn(receive::consumer(
                    s.clone(),
                    ctx.inbound,
                    ctx.handled,
                    backlog,
                    stop.clone(),
                ));
            }
        }
        s.tasks.spawn(heartbeat(s.clone(), stop));
        tracing::info!(node = %me, mode = %s.cfg.mode, prefix = %s.cfg.prefix, "joined the redis cluster");
        Ok(())
    }

    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff {
        enqueue(&self.shared.out, dest, envelope, &self.shared.stats)
    }

    fn peers(&self) -> Vec<NodeId> {
        let me = self.shared.node.get();
        let live = self.shared.live.read().unwrap_or_else(|p| p.into_inner());
        live.live()
            .filter_map(|n| NodeId::new(n).ok())
            .filter(|n| Some(n) != me)
            .collect()
    }

    fn membership(&self, change: &MembershipChange) {
        self.shared.dir.report(change);
    }

    async fn settle(&self) {
        self.shared.dir.settle().await;
    }

    async fn query(&self, query: &Query, timeout: Duration) -> Option<QueryOutcome> {
        let (kind, arg) = match query {
            Query::UserOnline(u) => ("online", u.to_string()),
            Query::UserConns(u) => ("user_conns", u.to_string()),
            Query::GroupMembers(g) => ("group_members", g.to_string()),
            Query::GroupCount(g) => ("group_count", g.to_string()),
            Query::ConnExists(c) => ("conn_exists", c.to_string()),
            Query::ConnUser(c) => ("conn_user", c.to_string()),
            // Totals need distinct users across nodes: asked of the nodes.
            _ => return None,
        };
        let (mut conn, generation) = match self.shared.link.current() {
            Some(c) => c,
            None => return Some(QueryOutcome::Unavailable),
        };
        let mut call = scripts::QUERY.prepare_invoke();
        call.key(self.shared.keys.nodes());
        call.arg(&self.shared.keys.prefix).arg(kind).arg(&arg);
        let run = async {
            Ok::<_, RedisError>(match kind {
                "online" | "conn_exists" => {
                    LocalAnswer::Bool(call.invoke_async::<i64>(&mut conn).await? == 1)
                }
                "group_count" => LocalAnswer::Count(call.invoke_async::<u64>(&mut conn).await?),
                "conn_user" => {
                    let u: Vec<String> = call.invoke_async(&mut conn).await?;
                    LocalAnswer::User(u.into_iter().next().map(UserId::from))
                }
                _ => {
                    let ids: Vec<String> = call.invoke_async(&mut conn).await?;
                    LocalAnswer::Conns(
                        ids.iter()
                            .filter_map(|s| s.parse::<ConnId>().ok())
                            .collect(),
                    )
                }
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(answer)) => Some(QueryOutcome::Answer(answer)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "directory query failed");
                self.shared.link.failed(generation, &e);
                Some(QueryOutcome::Unavailable)
            }
            Err(_) => Some(QueryOutcome::Unavailable),
        }
    }

    fn status(&self) -> Status {
        let s = &self.shared;
        let link = s.link.state();
        let reason = if link.conn.is_none() {
            Some(format!(
                "redis unreachable: {}",
                link.error.unwrap_or_default()
            ))
        } else if s.dir.synced.load(Ordering::Acquire) != link.generation {
            Some("rebuilding directory entries".to_owned())
        } else if !s.receiving.load(Ordering::Acquire) {
            Some(match s.cfg.mode {
                Mode::PubSub => "redis subscription down".to_owned(),
                Mode::Queue => "redis stream consumer down".to_owned(),
            })
        } else {
            s.probe_silence()
                .map(|t| format!("redis subscription heard nothing of this node for {t:?}"))
        };
        Status::unless(reason)
    }

    fn stats(&self) -> BackplaneStats {
        let reconnects = self.shared.link.reconnects.load(Ordering::Relaxed);
        self.shared.stats.snapshot(reconnects)
    }

    async fn leave(&self) {
        let s = &self.shared;
        if let (Some(node), Some((mut conn, _))) = (s.node.get(), s.link.current()) {
            // A clean stop removes the node at once instead of after its TTL.
            let mut pipe = redis::pipe();
            pipe.zrem(s.keys.nodes(), node.as_str()).ignore();
            let removed = pipe.query_async::<()>(&mut conn).await;
            let cleared = directory::clear_node(&mut conn, &s.keys, node.as_str()).await;
            if let Err(e) = removed.and(cleared.map(drop)) {
                tracing::warn!(error = %e, "could not remove this node from redis on leave");
            }
        }
        s.stop.cancel();
        s.tasks.close();
        s.tasks.wait().await;
    }
}
