//! Node liveness: every node renews a deadline in a sorted set (Redis clock)
//! every third of the TTL, reads everyone's deadlines back, and collects nodes
//! that stayed dead past a grace period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::link::Conn;
use redis::RedisError;

use crate::config::Mode;
use crate::keys::Keys;
use crate::scripts;

/// The last known deadlines, and Redis's clock when they were read.
#[derive(Debug, Default, Clone)]
pub(crate) struct Liveness {
    now_ms: u64,
    read_at: Option<Instant>,
    deadlines: HashMap<String, u64>,
}

impl Liveness {
    /// Redis's clock now, extrapolated from the last read.
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms + self.read_at.map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// Whether this view was read longer ago than `ago` (`None`: never).
    pub(crate) fn read_before(&self, ago: Option<Duration>) -> bool {
        match (self.read_at, ago) {
            (Some(t), Some(ago)) => t.elapsed() > ago,
            _ => false,
        }
    }

    /// Nodes whose deadline has not passed.
    pub(crate) fn live(&self) -> impl Iterator<Item = &str> {
        let now = self.now_ms();
        self.deadlines
            .iter()
            .filter(move |(_, d)| **d > now)
            .map(|(n, _)| n.as_str())
    }

    /// Whether envelopes for `node` should be sent. A node not seen yet is
    /// assumed alive (it may have joined since the last read); in queue mode a
    /// dead node's queue keeps collecting for `keep` so it gets them back if it
    /// returns in time.
    pub(crate) fn routable(&self, node: &str, keep: Duration) -> bool {
        match self.deadlines.get(node) {
            None => true,
            Some(d) => d + keep.as_millis() as u64 > self.now_ms(),
        }
    }

    /// Takes a newer read, keeping nodes it lacks until their last known
    /// deadline: a restarted, empty Redis must not make peers look dead.
    pub(crate) fn merge_newer(&mut self, newer: Liveness) {
        let old = std::mem::take(&mut self.deadlines);
        *self = newer;
        for (node, deadline) in old {
            self.deadlines.entry(node).or_insert(deadline);
        }
    }

    /// Liveness from a fresh read of the node set.
    pub(crate) fn from_read(now_ms: u64, list: Vec<(String, f64)>) -> Self {
        Liveness {
            now_ms,
            read_at: Some(Instant::now()),
            deadlines: list.into_iter().map(|(n, d)| (n, d as u64)).collect(),
        }
    }
}

/// What one heartbeat learned.
pub(crate) struct Beat {
    pub(crate) liveness: Liveness,
    /// Our deadline had passed (or we were unknown): peers may have collected
    /// our directory entries, which must then be rebuilt.
    pub(crate) was_dead: bool,
}

pub(crate) async fn beat(
    conn: &mut Conn,
    keys: &Keys,
    node: &str,
    ttl: Duration,
) -> Result<Beat, RedisError> {
    let (now, prev, list): (u64, u64, Vec<(String, f64)>) = scripts::HEARTBEAT
        .key(keys.nodes())
        .arg(&keys.prefix)
        .arg(node)
        .arg(ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    Ok(Beat {
        was_dead: prev <= now,
        liveness: Liveness::from_read(now, list),
    })
}

/// Collects nodes that have been dead longer than their grace: a TTL in
/// pub/sub mode, the queue age in queue mode (their queue and directory
/// entries are kept that long, so a node that returns finds its backlog).
pub(crate) async fn collect_dead(
    conn: &mut Conn,
    keys: &Keys,
    me: &str,
    live: &Liveness,
    mode: Mode,
    ttl: Duration,
    queue_age: Duration,
) -> Result<(), RedisError> {
    let grace = match mode {
        Mode::PubSub => ttl,
        Mode::Queue => queue_age.max(ttl),
    };
    let now = live.now_ms();
    let threshold = now.saturating_sub(grace.as_millis() as u64);
    for (node, deadline) in &live.deadlines {
        if node == me || *deadline > threshold {
            continue;
        }
        // On a cluster the queue is on its own slot: deleted apart.
        let drop_queue = mode == Mode::Queue && !keys.is_cluster();
        let collected: u64 = scripts::COLLECT_DEAD
            .key(keys.nodes())
            .arg(&keys.prefix)
            .arg(node)
            .arg(threshold)
            .arg(if drop_queue { "1" } else { "0" })
            .invoke_async(conn)
            .await?;
        if collected == 1 && mode == Mode::Queue && keys.is_cluster() {
            redis::cmd("DEL")
                .arg(keys.queue(node))
                .query_async::<()>(conn)
                .await?;
        }
        if collected == 1 {
            tracing::info!(dead = %node, "collected the entries of a dead node");
        }
    }
    Ok(())
}
