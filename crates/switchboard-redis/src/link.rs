//! The shared Redis connection and its supervisor.
//!
//! Commands go through one multiplexed connection. A task whose command fails
//! with a connection error reports it; the supervisor reconnects with
//! exponential backoff and bumps a generation number, which is how the other
//! tasks learn that Redis may have lost their state (a restart) and that they
//! must resubscribe or rewrite it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Commands that take longer than this are treated as a dead connection.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where the backplane connects: one Redis, or a Redis Cluster.
// One per node, made once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Target {
    Single(Client),
    Cluster {
        client: ClusterClient,
        /// The nodes it starts from, for the subscribers' own clients.
        seeds: Vec<String>,
    },
}

/// Messages of a subscription, from either kind of target.
pub(crate) type Messages = std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg> + Send>>;

/// Messages a cluster subscriber's client may hold for it. Past them the
/// oldest are lost; the channels' sequence numbers count them.
const PUSH_BUFFER: usize = 64 * 1024;

impl Target {
    pub(crate) fn from_config(cfg: &crate::RedisConfig) -> Result<Self, RedisError> {
        if cfg.cluster.is_empty() {
            return Client::open(cfg.url.as_str()).map(Target::Single);
        }
        let client = ClusterClient::builder(cfg.cluster.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()?;
        Ok(Target::Cluster {
            client,
            seeds: cfg.cluster.clone(),
        })
    }

    /// A dedicated subscription to `channels` (`keys` says which kind). On a
    /// cluster: sharded channels, through a client of its own that
    /// resubscribes them wherever their slots move.
    pub(crate) async fn subscribe(
        &self,
        keys: &crate::keys::Keys,
        channels: &[String],
    ) -> Result<Messages, RedisError> {
        match self {
            Target::Single(c) => {
                let mut ps = c.get_async_pubsub().await?;
                for ch in channels {
                    ps.subscribe(ch).await?;
                }
                Ok(Box::pin(ps.into_on_message()))
            }
            Target::Cluster { seeds, .. } => {
                debug_assert!(keys.is_cluster());
                // Bounded: a cluster client that cannot reach the nodes it
                // learned of retries on its own, and a subscriber waiting on
                // it across a partition would stay deaf after the heal.
                let made = Self::subscribe_cluster(seeds, channels);
                tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, made)
                    .await
                    .map_err(|_| {
                        RedisError::from((
                            redis::ErrorKind::Io,
                            "redis cluster subscription timed out",
                        ))
                    })?
            }
        }
    }

    async fn subscribe_cluster(
        seeds: &[String],
        channels: &[String],
    ) -> Result<Messages, RedisError> {
        let (tx, rx) = tokio::sync::broadcast::channel(PUSH_BUFFER);
        let client = ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        let mut conn = client.get_async_connection().await?;
        for ch in channels {
            conn.ssubscribe(ch).await?;
        }
        // The connection lives as long as the stream: dropping it
        // ends the subscription.
        Ok(Box::pin(futures_util::stream::unfold(
            (rx, conn),
            |(mut rx, conn)| async move {
                loop {
                    match rx.recv().await {
                        Ok(push) => {
                            if let Some(m) = redis::Msg::from_push_info(push) {
                                return Some((m, (rx, conn)));
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(lost = n, "redis cluster subscriber fell behind");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return None;
                        }
                    }
                }
            },
        )))
    }

    /// A new connection: multiplexed, or a cluster connection that follows
    /// `MOVED`/`ASK` redirects and refreshes its slot map on failover.
    pub(crate) async fn connect(&self) -> Result<Conn, RedisError> {
        match self {
            Target::Single(c) => c
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
                .map(Conn::Single),
            Target::Cluster { client, .. } => {
                client.get_async_connection().await.map(Conn::Cluster)
            }
        }
    }
}

/// A connection to one Redis or to a Redis Cluster. A pipeline sent through
/// [`ConnectionLike`] must stay within one hash slot on a cluster; [`exec`]
/// splits one that does not.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The hash slot of a key: CRC16 of its hash tag (the part between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % 16384
}

/// Runs a pipeline whose replies are all ignored. On a cluster its commands
/// are grouped by the slot of their first key (each group keeps its order)
/// and the groups run concurrently; a transaction must stay in one slot.
pub(crate) async fn exec(conn: &mut Conn, pipe: &Pipeline) -> Result<(), RedisError> {
    let Conn::Cluster(cluster) = conn else {
        return pipe.query_async::<()>(conn).await;
    };
    let mut groups: Vec<(u16, Pipeline)> = Vec::new();
    for cmd in pipe.cmd_iter() {
        let key = cmd.args_iter().nth(1).and_then(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        });
        let slot = key.map_or(0, slot);
        let i = match groups.iter().position(|(s, _)| *s == slot) {
            Some(i) => i,
            None => {
                groups.push((slot, redis::pipe()));
                groups.len() - 1
            }
        };
        groups[i].1.add_command(cmd.clone()).ignore();
    }
    if groups.len() == 1 {
        return pipe.query_async::<()>(conn).await;
    }
    let runs = groups.iter().map(|(_, p)| {
        let mut c = cluster.clone();
        async move { p.query_async::<()>(&mut c).await }
    });
    for r in futures_util::future::join_all(runs).await {
        r?;
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) struct LinkState {
    pub(crate) conn: Option<Conn>,
    pub(crate) generation: u64,
    pub(crate) error: Option<String>,
}

pub(crate) struct Link {
    pub(crate) target: Target,
    state: watch::Sender<LinkState>,
    pub(crate) reconnects: AtomicU64,
    /// When the connection was last re-established (ms since the epoch, 0 never).
    reconnected_at: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether an error means the connection is gone (as opposed to a bad command).
pub(crate) fn is_link_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

pub(crate) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// Waits `wait` (with jitter), then doubles it up to the maximum.
pub(crate) async fn backoff(wait: &mut Duration) {
    switchboard_core::backplane::backoff(wait, BACKOFF_MAX).await;
}

impl Link {
    /// Connects once; fails if Redis cannot be reached now.
    pub(crate) async fn connect(target: Target) -> Result<Self, RedisError> {
        let conn = target.connect().await?;
        let (state, _) = watch::channel(LinkState {
            conn: Some(conn),
            generation: 1,
            error: None,
        });
        Ok(Self {
            target,
            state,
            reconnects: AtomicU64::new(0),
            reconnected_at: AtomicU64::new(0),
        })
    }

    /// Whether the connection was re-established less than `window` ago: Redis
    /// may have restarted empty, and peers may not have rebuilt their
    /// directory entries yet.
    pub(crate) fn recently_reconnected(&self, window: Duration) -> bool {
        let at = self.reconnected_at.load(Ordering::Relaxed);
        at != 0 && now_ms().saturating_sub(at) < window.as_millis() as u64
    }

    /// How long ago the connection was last re-established (`None`: never).
    pub(crate) fn since_reconnect(&self) -> Option<Duration> {
        let at = self.reconnected_at.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_millis(now_ms().saturating_sub(at)))
    }

    /// The connection, if up, with its generation.
    pub(crate) fn current(&self) -> Option<(Conn, u64)> {
        let s = self.state.borrow();
        s.conn.clone().map(|c| (c, s.generation))
    }

    pub(crate) fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Waits for a connection (or `stop`).
    pub(crate) async fn ready(&self, stop: &CancellationToken) -> Option<(Conn, u64)> {
        let mut rx = self.state.subscribe();
        tokio::select! {
            () = stop.cancelled() => None,
            r = rx.wait_for(|s| s.conn.is_some()) => {
                let s = r.ok()?;
                s.conn.clone().map(|c| (c, s.generation))
            }
        }
    }

    /// Reports that a command on generation `generation` failed. Connection
    /// errors hand the link to the supervisor; other errors are the caller's.
    pub(crate) fn failed(&self, generation: u64, e: &RedisError) {
        if !is_link_error(e) {
            return;
        }
        self.state.send_if_modified(|s| {
            if s.generation == generation && s.conn.is_some() {
                tracing::warn!(error = %e, "redis connection lost");
                s.conn = None;
                s.error = Some(e.to_string());
                true
            } else {
                false
            }
        });
    }

    /// Reconnects whenever the connection is reported lost, until `stop`.
    pub(crate) async fn supervise(&self, stop: CancellationToken) {
        let mut rx = self.state.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = rx.wait_for(|s| s.conn.is_none()) => if r.is_err() { return },
            }
            let mut wait = BACKOFF_MIN;
            loop {
                if stop.is_cancelled() {
                    return;
                }
                match self.target.connect().await {
                    Ok(conn) => {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.reconnected_at.store(now_ms(), Ordering::Relaxed);
                        self.state.send_modify(|s| {
                            s.conn = Some(conn);
                            s.generation += 1;
                            s.error = None;
                        });
                        tracing::info!("redis connection re-established");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "redis reconnect failed");
                        self.state.send_modify(|s| s.error = Some(e.to_string()));
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = backoff(&mut wait) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn a_key_hashes_to_its_tag_s_slot() {
        // The specification's check value: CRC16/XMODEM("123456789") = 0x31C3.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{app}:user:a"), slot(b"app"));
        assert_eq!(slot(b"app:ch:{n1}"), slot(b"n1"));
        // An empty tag does not count: the whole key hashes.
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }
}
