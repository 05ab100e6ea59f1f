//! Who is alive, learned from the broker alone, for backplanes that keep no
//! directory (RabbitMQ, NATS core).
//!
//! Every node broadcasts a heartbeat every third of the TTL and hears
//! everyone's, its own included (its own proves that its queue still gets
//! messages). A node not heard from for a TTL is dead. A node that joins
//! broadcasts a hello; every live node answers it directly with a welcome
//! naming the live nodes it knows, so the newcomer knows the cluster before it
//! serves, instead of a heartbeat period later. A node that leaves says bye.
//! Times are this node's own clock: no clocks are compared across nodes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::NodeId;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The live nodes, as last heard.
pub struct Peers {
    ttl: Duration,
    heard: Mutex<HashMap<NodeId, Instant>>,
    /// Welcomes received since the last hello: who answered, and whom they named.
    discovery: Mutex<Discovery>,
    welcomed: Notify,
}

#[derive(Default)]
struct Discovery {
    answered: HashSet<NodeId>,
    named: HashSet<NodeId>,
}

impl Peers {
    /// No node heard yet; a node silent for `ttl` is dead.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            heard: Mutex::new(HashMap::new()),
            discovery: Mutex::new(Discovery::default()),
            welcomed: Notify::new(),
        }
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `node` is alive now.
    pub fn alive(&self, node: &NodeId) {
        let now = Instant::now();
        let mut heard = self.heard();
        match heard.get_mut(node) {
            Some(t) => *t = now,
            None => {
                tracing::info!(peer = %node, "node joined");
                heard.insert(node.clone(), now);
            }
        }
    }

    /// `node` said goodbye.
    pub fn left(&self, node: &NodeId) {
        if self.heard().remove(node).is_some() {
            tracing::info!(peer = %node, "node left");
        }
    }

    /// The nodes heard from within the TTL, `me` excluded.
    pub fn live(&self, me: Option<&NodeId>) -> Vec<NodeId> {
        let ttl = self.ttl;
        self.heard()
            .iter()
            .filter(|(n, t)| Some(*n) != me && t.elapsed() < ttl)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Forgets the nodes silent for a TTL; returns them.
    pub fn expire(&self) -> Vec<NodeId> {
        let ttl = self.ttl;
        let mut dead = Vec::new();
        self.heard().retain(|n, t| {
            let alive = t.elapsed() < ttl;
            if !alive {
                dead.push(n.clone());
            }
            alive
        });
        for n in &dead {
            tracing::warn!(peer = %n, "node silent for the TTL: counted as dead");
        }
        dead
    }

    /// Starts a discovery round (before sending a hello).
    pub fn start_discovery(&self) {
        *self.discovery.lock().unwrap_or_else(|p| p.into_inner()) = Discovery::default();
    }

    /// A welcome from `from`, naming the nodes it knows alive.
    pub fn welcome(&self, from: &NodeId, live: &[NodeId], me: &NodeId) {
        self.alive(from);
        for n in live.iter().filter(|n| *n != me) {
            // Named by a live node: wait for it in answers until it is heard
            // from itself, or a TTL passes.
            self.heard().entry(n.clone()).or_insert_with(Instant::now);
        }
        {
            let mut d = self.discovery.lock().unwrap_or_else(|p| p.into_inner());
            d.answered.insert(from.clone());
            d.named.extend(live.iter().filter(|n| *n != me).cloned());
        }
        self.welcomed.notify_waiters();
    }

    /// Waits until every node named in the welcomes received has answered
    /// itself, or, if none has answered, for `alone`; never longer than `max`.
    pub async fn discovered(&self, alone: Duration, max: Duration) {
        let start = Instant::now();
        loop {
            let notified = self.welcomed.notified();
            let (any, complete) = {
                let d = self.discovery.lock().unwrap_or_else(|p| p.into_inner());
                (
                    !d.answered.is_empty(),
                    d.named.iter().all(|n| d.answered.contains(n)),
                )
            };
            if any && complete {
                return;
            }
            let until = start + if any { max } else { alone };
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_silent_for_the_ttl_are_dead() {
        let p = Peers::new(Duration::from_millis(50));
        p.alive(&n("a"));
        p.alive(&n("me"));
        assert_eq!(p.live(Some(&n("me"))), vec![n("a")]);
        p.left(&n("a"));
        assert!(p.live(Some(&n("me"))).is_empty());
        p.alive(&n("b"));
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(p.live(None).is_empty(), "silent past the TTL");
        let mut dead = p.expire();
        dead.sort();
        assert_eq!(dead, vec![n("b"), n("me")]);
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_waits_for_every_named_node() {
        let p = std::sync::Arc::new(Peers::new(Duration::from_secs(10)));
        let me = n("me");
        p.start_discovery();
        // Alone: waits the short bound only.
        let t = Instant::now();
        p.discovered(Duration::from_millis(100), Duration::from_secs(1))
            .await;
        assert_eq!(t.elapsed(), Duration::from_millis(100));

        p.start_discovery();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move {
                p.discovered(Duration::from_millis(100), Duration::from_secs(1))
                    .await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        p.welcome(&n("a"), &[n("a"), n("b"), me.clone()], &me);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "b named but not heard yet");
        let mut live = p.live(Some(&me));
        live.sort();
        assert_eq!(live, vec![n("a"), n("b")], "named nodes count as live");
        p.welcome(&n("b"), &[n("a")], &me);
        let done = waiter.await.unwrap();
        assert_eq!(done - t, Duration::from_millis(100 + 10 + 300));
    }
}
