//! An in-memory bus joining several nodes of one process.
//!
//! It gives tests and embedded multi-node setups a real cluster path: every
//! cross-node operation is encoded into an envelope, routed by node id, and
//! decoded on the other side, exactly as with a broker. Delivery is
//! at-most-once: an envelope for a node whose inbound queue is full is dropped
//! and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::backplane::{
    Backplane, BackplaneStats, Dest, Handoff, Inbound, JoinContext, JoinError, Status,
};
use crate::id::NodeId;

/// The shared bus. Clone it and make one [`MemoryBackplane`] per node.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    nodes: Arc<RwLock<HashMap<NodeId, Inbound>>>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backplane for one more node on this bus.
    pub fn backplane(&self) -> MemoryBackplane {
        MemoryBackplane {
            bus: self.clone(),
            me: OnceLock::new(),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

/// One node's attachment to a [`MemoryBus`].
#[derive(Debug)]
pub struct MemoryBackplane {
    bus: MemoryBus,
    me: OnceLock<NodeId>,
    published: AtomicU64,
    dropped: AtomicU64,
}

impl MemoryBackplane {
    fn send(&self, nodes: &HashMap<NodeId, Inbound>, to: &NodeId, env: &Bytes, h: &mut Handoff) {
        if Some(to) == self.me.get() {
            return;
        }
        // A node that is not on the bus holds no connections: nothing to lose.
        if let Some(tx) = nodes.get(to) {
            match tx.try_send(env.clone()) {
                Ok(()) => h.sent += 1,
                Err(_) => h.dropped += 1,
            }
        }
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        let (node, inbound) = (&ctx.node, ctx.inbound);
        let mut nodes = self.bus.nodes.write().unwrap_or_else(|p| p.into_inner());
        if nodes.contains_key(node) {
            return Err(JoinError::DuplicateNode(node.clone()));
        }
        if self.me.set(node.clone()).is_err() {
            return Err(JoinError::DuplicateNode(node.clone()));
        }
        nodes.insert(node.clone(), inbound);
        Ok(())
    }

    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff {
        let nodes = self.bus.nodes.read().unwrap_or_else(|p| p.into_inner());
        let mut h = Handoff::default();
        match dest {
            Dest::Node(n) => self.send(&nodes, n, &envelope, &mut h),
            Dest::Interested(t) => match t.conn_nodes() {
                Some(list) => {
                    for n in list {
                        self.send(&nodes, n, &envelope, &mut h);
                    }
                }
                None => {
                    for n in nodes.keys() {
                        self.send(&nodes, n, &envelope, &mut h);
                    }
                }
            },
            Dest::All => {
                for n in nodes.keys() {
                    self.send(&nodes, n, &envelope, &mut h);
                }
            }
        }
        self.published
            .fetch_add(u64::from(h.sent), Ordering::Relaxed);
        self.dropped
            .fetch_add(u64::from(h.dropped), Ordering::Relaxed);
        h
    }

    fn peers(&self) -> Vec<NodeId> {
        let nodes = self.bus.nodes.read().unwrap_or_else(|p| p.into_inner());
        nodes
            .keys()
            .filter(|n| Some(*n) != self.me.get())
            .cloned()
            .collect()
    }

    fn status(&self) -> Status {
        Status::Ready
    }

    fn stats(&self) -> BackplaneStats {
        BackplaneStats {
            published: self.published.load(Ordering::Relaxed),
            publish_dropped: self.dropped.load(Ordering::Relaxed),
            ..BackplaneStats::default()
        }
    }

    async fn leave(&self) {
        if let Some(me) = self.me.get() {
            let mut nodes = self.bus.nodes.write().unwrap_or_else(|p| p.into_inner());
            nodes.remove(me);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::NoLocalState;
    use crate::id::{ConnId, NodeId};
    use crate::target::Target;
    use tokio::sync::{mpsc, watch};

    fn ctx(n: &NodeId, tx: Inbound) -> JoinContext {
        JoinContext::new(
            n.clone(),
            tx,
            watch::channel(0).1,
            std::sync::Arc::new(NoLocalState),
        )
    }

    #[tokio::test]
    async fn routes_by_node_and_counts_drops() {
        let bus = MemoryBus::new();
        let (a, b, c) = (bus.backplane(), bus.backplane(), bus.backplane());
        let (ta, mut ra) = mpsc::channel(4);
        let (tb, mut rb) = mpsc::channel(1);
        let (tc, mut rc) = mpsc::channel(4);
        let (na, nb, nc) = (
            NodeId::new("a").unwrap(),
            NodeId::new("b").unwrap(),
            NodeId::new("c").unwrap(),
        );
        a.join(ctx(&na, ta)).await.unwrap();
        b.join(ctx(&nb, tb)).await.unwrap();
        c.join(ctx(&nc, tc)).await.unwrap();
        assert!(
            bus.backplane()
                .join(ctx(&na, mpsc::channel(1).0))
                .await
                .is_err()
        );

        let mut peers = a.peers();
        peers.sort();
        assert_eq!(peers, [nb.clone(), nc.clone()]);

        let h = a.publish(Dest::Node(&nb), Bytes::from_static(b"1"));
        assert_eq!(
            h,
            Handoff {
                sent: 1,
                dropped: 0
            }
        );
        // b's queue (capacity 1) is full now: the next one is dropped and counted.
        let t = Target::conn(ConnId::new(nb.clone(), 1));
        assert_eq!(
            a.publish(Dest::Interested(&t), Bytes::from_static(b"2")),
            Handoff {
                sent: 0,
                dropped: 1
            }
        );
        assert_eq!(
            a.publish(Dest::All, Bytes::from_static(b"3")),
            Handoff {
                sent: 1,
                dropped: 1
            }
        );
        assert_eq!((a.stats().published, a.stats().publish_dropped), (2, 2));
        assert_eq!(rb.recv().await.unwrap(), "1");
        assert_eq!(rc.recv().await.unwrap(), "3");
        assert!(
            ra.try_recv().is_err(),
            "a node never receives its own envelopes"
        );

        c.leave().await;
        assert_eq!(a.peers(), [nb]);
    }
}
