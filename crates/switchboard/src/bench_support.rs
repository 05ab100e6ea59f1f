//! Fixtures for the crate's micro-benchmarks (`benches/`): the registry and
//! outboxes without sockets. Not part of the public API.

use std::sync::Arc;

use switchboard_core::{Frame, NodeId, Query, Session, Standalone, Target};

use crate::config::SlowConsumer;
use crate::outbox::{Batch, Caps, Outbox};
use crate::registry::Registry;

/// `n` registered connections, all in one group, with outboxes nobody writes.
pub struct Fanout {
    registry: Registry,
    outboxes: Vec<Arc<Outbox>>,
    spare: Batch,
    group: Target,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fanout({})", self.outboxes.len())
    }
}

impl Fanout {
    /// Registers `n` connections of distinct users in group `g`.
    pub fn new(n: usize) -> Self {
        let mut registry = Registry::new(NodeId::new("bench").expect("valid id"), usize::MAX);
        let mut outboxes = Vec::with_capacity(n);
        for i in 0..n {
            let o = Arc::new(Outbox::new(Caps {
                frames: 1 << 20,
                bytes: usize::MAX,
                policy: SlowConsumer::Close,
                idle_ms: 0,
            }));
            registry.insert(
                i as u64,
                o.clone(),
                Some(format!("u{i}").into()),
                vec!["g".into()],
                Session::new(),
                &Standalone,
            );
            outboxes.push(o);
        }
        Self {
            registry,
            outboxes,
            spare: Batch::default(),
            group: Target::group("g"),
        }
    }

    /// Queues `frame` to every member of the group; returns how many got it.
    pub fn push_group(&self, frame: &Frame) -> u32 {
        self.registry.deliver(&self.group, frame).queued
    }

    /// Empties every outbox, as the connections' writers would.
    pub fn drain(&mut self) {
        for o in &self.outboxes {
            loop {
                o.take(&mut self.spare);
                if self.spare.is_empty() {
                    break;
                }
                self.spare.consume(usize::MAX);
            }
        }
    }

    /// Answers a group count query from the registry.
    pub fn group_count(&self) -> switchboard_core::LocalAnswer {
        self.registry.answer(&Query::GroupCount("g".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fan_out_allocates_nothing_per_recipient() {
        let mut fanout = Fanout::new(1000);
        let frame = Frame::text("to the whole group");
        // Warm-up: the frame's payload becomes shared on its first clone.
        fanout.push_group(&frame);
        fanout.drain();
        let paced = crate::alloc_count::allocations(|| {
            for _ in 0..10 {
                assert_eq!(fanout.push_group(&frame), 1000);
                fanout.drain();
            }
        });
        assert_eq!(paced, 0, "one message at a time to 1,000 connections");
        // A burst spills each queue into a buffer once; later bursts reuse it.
        let burst = |f: &mut Fanout| {
            for _ in 0..40 {
                f.push_group(&frame);
            }
            f.drain();
        };
        burst(&mut fanout);
        let bursts = crate::alloc_count::allocations(|| (0..5).for_each(|_| burst(&mut fanout)));
        assert_eq!(bursts, 0, "bursts of 40 messages to 1,000 connections");
    }
}
