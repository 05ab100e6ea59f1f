//! Fixtures for the crate's micro-benchmarks (`benches/`): the registry and
//! outboxes without sockets. Not part of the public API.

use std::collections::VecDeque;
use std::sync::Arc;

use switchboard_core::{Frame, NodeId, Query, Session, Standalone, Target};

use crate::config::SlowConsumer;
use crate::outbox::{Caps, Outbox};
use crate::registry::Registry;

/// `n` registered connections, all in one group, with outboxes nobody writes.
pub struct Fanout {
    registry: Registry,
    outboxes: Vec<Arc<Outbox>>,
    spare: VecDeque<Frame>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fanout({})", self.outboxes.len())
    }
}

impl Fanout {
    /// Registers `n` connections of distinct users in group `g`.
    pub fn new(n: usize) -> Self {
        let mut registry = Registry::new(NodeId::new("bench").expect("valid id"));
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
            spare: VecDeque::new(),
        }
    }

    /// Queues `frame` to every member of the group; returns how many got it.
    pub fn push_group(&self, frame: &Frame) -> u32 {
        self.registry.deliver(&Target::group("g"), frame).queued
    }

    /// Empties every outbox, as the connections' writers would.
    pub fn drain(&mut self) {
        for o in &self.outboxes {
            o.take(&mut self.spare);
            self.spare.clear();
        }
    }

    /// Answers a group count query from the registry.
    pub fn group_count(&self) -> switchboard_core::LocalAnswer {
        self.registry.answer(&Query::GroupCount("g".into()))
    }
}
