//! Sending envelopes: a task takes them from a bounded queue in batches, picks
//! each one's subjects, numbers it on each subject's stream, and publishes one
//! message per subject (a run of envelopes for the same subject shares one
//! message, a bundle). Core NATS confirms nothing: what is published while the
//! client is not connected is dropped and counted here; what the servers or
//! the link lose on the way is counted by the receiver from the gap in the
//! stream's numbers.

use std::sync::Arc;

use bytes::Bytes;
use switchboard_core::NodeId;
use switchboard_core::backplane::{Outgoing, Route, StatCounters};
use switchboard_core::bundle::Bundle;
use switchboard_core::relay::{self, Copy, Sequences};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::subjects::Subjects;
use crate::{Mode, Shared, jetstream};

/// Envelopes waiting to be sent. Beyond this, publishing drops and counts.
pub(crate) const QUEUE: usize = 64 * 1024;
const BATCH: usize = 256;
/// Streams numbered at once before the numbering starts a new epoch.
const STREAMS: usize = 100_000;

/// The subjects an envelope goes to: a node's, the broadcast subject, or one
/// per user, group and node of a connection the target names (a node holding
/// several of them gets several copies and delivers one).
pub(crate) fn subjects(s: &Subjects, route: &Route, me: &NodeId) -> Vec<String> {
    match route {
        Route::Node(n) => vec![s.node(n.as_str())],
        Route::All => vec![s.broadcast()],
        Route::Interested(t) if t.is_all() => vec![s.broadcast()],
        Route::Interested(t) => {
            let mut out: Vec<String> = Vec::new();
            let mut add = |k: String| {
                if !out.contains(&k) {
                    out.push(k);
                }
            };
            for c in t.conns().iter().filter(|c| c.node() != me) {
                add(s.node(c.node().as_str()));
            }
            for u in t.included_users() {
                add(s.user(u.as_str()));
            }
            for g in t.included_groups() {
                add(s.group(g.as_str()));
            }
            out
        }
    }
}

/// Consecutive envelopes of a batch for one subject, each the only copy.
struct Open {
    subject: String,
    bundle: Bundle,
    /// The first envelope: a bundle of one goes out as a plain envelope.
    first: Bytes,
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut out = Publisher {
        seqs: Sequences::new(shared.epoch, STREAMS),
        shared,
        order: 0,
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            () = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, BATCH) => n,
        };
        if n == 0 {
            return;
        }
        match out.shared.cfg.mode {
            Mode::Core => out.batch(&mut batch).await,
            Mode::JetStream => out.batch_queued(&mut batch).await,
        }
    }
}

/// JetStream: the queue subjects of every node heard from lately (`recent`),
/// and of the live peers, which include those named in welcomes and not
/// heard yet: where envelopes not for one node go. Read once per batch.
fn everyone(shared: &Shared) -> Vec<String> {
    let me = &shared.node;
    let mut nodes = shared.peers.live(Some(me));
    nodes.extend(shared.recent.live(Some(me)));
    nodes.sort_unstable();
    nodes.dedup();
    nodes
        .iter()
        .map(|n| jetstream::queue_subject(&shared.cfg.prefix, n.as_str()))
        .collect()
}

/// JetStream: the queue subjects of the nodes an envelope is for; anything
/// not for one node or a few connections' goes to `everyone`.
fn queue_subjects(shared: &Shared, route: &Route, everyone: &[String]) -> Vec<String> {
    let me = &shared.node;
    let one = |n: &NodeId| jetstream::queue_subject(&shared.cfg.prefix, n.as_str());
    match route {
        Route::Node(n) => vec![one(n)],
        Route::Interested(t) if t.conn_nodes().is_some() => {
            let mut nodes: Vec<&NodeId> = t.conn_nodes().unwrap_or_default();
            nodes.retain(|n| *n != me);
            nodes.sort_unstable();
            nodes.dedup();
            nodes.into_iter().map(one).collect()
        }
        Route::All | Route::Interested(_) => everyone.to_vec(),
    }
}

struct Publisher {
    shared: Arc<Shared>,
    seqs: Sequences,
    /// Messages published on core subjects, for the receivers' ordering.
    order: u64,
}

impl Publisher {
    /// Publishes a batch in order; runs for one subject travel as a bundle.
    async fn batch(&mut self, batch: &mut Vec<Outgoing>) {
        let mut open: Option<Open> = None;
        for o in batch.drain(..) {
            let mut subjects = subjects(&self.shared.subjects, &o.route, &self.shared.node);
            if subjects.len() == 1 {
                let subject = subjects.remove(0);
                match &mut open {
                    Some(b) if b.subject == subject && b.bundle.fits(o.envelope.len()) => {
                        b.bundle.push(&o.envelope);
                    }
                    _ => {
                        if let Some(b) = open.take() {
                            self.flush(b).await;
                        }
                        let mut bundle = relay::bundle();
                        bundle.push(&o.envelope);
                        open = Some(Open {
                            subject,
                            bundle,
                            first: o.envelope,
                        });
                    }
                }
            } else {
                if let Some(b) = open.take() {
                    self.flush(b).await;
                }
                self.copies(subjects, &o.envelope).await;
            }
        }
        if let Some(b) = open.take() {
            self.flush(b).await;
        }
    }

    /// JetStream: each node's envelopes of the batch, in order, bundled per
    /// node; one node's subject never waits for another's.
    async fn batch_queued(&mut self, batch: &mut Vec<Outgoing>) {
        let mut open: Vec<Open> = Vec::new();
        let everyone = everyone(&self.shared);
        for o in batch.drain(..) {
            for subject in queue_subjects(&self.shared, &o.route, &everyone) {
                let i = match open.iter().position(|b| b.subject == subject) {
                    Some(i) if open[i].bundle.fits(o.envelope.len()) => i,
                    found => {
                        if let Some(i) = found {
                            let full = open.swap_remove(i);
                            self.flush(full).await;
                        }
                        open.push(Open {
                            subject,
                            bundle: relay::bundle(),
                            first: o.envelope.clone(),
                        });
                        open.len() - 1
                    }
                };
                open[i].bundle.push(&o.envelope);
            }
        }
        for b in open {
            self.flush(b).await;
        }
    }

    async fn flush(&mut self, open: Open) {
        let count = open.bundle.count();
        let stream = self.shared.subjects.stream(&open.subject);
        let (epoch, first) = self.seqs.take(stream, count);
        let body = if count == 1 {
            relay::envelope_message(epoch, first, Copy::Only, &open.first)
        } else {
            relay::bundle_message(open.bundle, epoch, first)
        };
        self.publish(open.subject, body, count).await;
    }

    /// One copy per subject, back to back, the first marked as such.
    async fn copies(&mut self, subjects: Vec<String>, envelope: &Bytes) {
        for (i, subject) in subjects.into_iter().enumerate() {
            let copy = if i == 0 { Copy::First } else { Copy::Later };
            let (epoch, seq) = self.seqs.next(self.shared.subjects.stream(&subject));
            let body = relay::envelope_message(epoch, seq, copy, envelope);
            self.publish(subject, body, 1).await;
        }
    }

    async fn publish(&mut self, subject: String, body: Vec<u8>, count: u64) {
        if self.shared.cfg.mode == Mode::JetStream {
            return jetstream::publish(&self.shared, subject, Bytes::from(body), count).await;
        }
        let stats = &self.shared.stats;
        if !self.shared.link.is_connected() {
            // Queued in the client until it reconnects, it would arrive late
            // and out of step with what peers saw meanwhile: at-most-once
            // drops it now, and counts it.
            StatCounters::add(&stats.publish_dropped, count);
            return;
        }
        self.order += 1;
        let framed = crate::subjects::framed(self.order, &body);
        match self.shared.client.publish(subject, framed).await {
            Ok(()) => StatCounters::add(&stats.published, count),
            Err(e) => {
                tracing::debug!(error = %e, "publish failed");
                StatCounters::add(&stats.publish_dropped, count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::{ConnId, Target};

    #[test]
    fn an_envelope_goes_to_the_subjects_of_its_recipients() {
        let s = Subjects::new("p");
        let me = NodeId::new("me").unwrap();
        let other = NodeId::new("b").unwrap();
        assert_eq!(
            subjects(&s, &Route::Node(other.clone()), &me),
            vec!["p.n.b"]
        );
        assert_eq!(subjects(&s, &Route::All, &me), vec!["p.b"]);
        assert_eq!(
            subjects(&s, &Route::Interested(Target::all()), &me),
            vec!["p.b"]
        );
        let t = Target::users(["alice", "bob"]);
        assert_eq!(
            subjects(&s, &Route::Interested(t), &me),
            vec!["p.u.alice", "p.u.bob"]
        );
        let conns = Target::none().and_conns([
            ConnId::new(other.clone(), 1),
            ConnId::new(other, 2),
            ConnId::new(me.clone(), 3),
        ]);
        assert_eq!(
            subjects(&s, &Route::Interested(conns), &me),
            vec!["p.n.b"],
            "one copy per node, none to this node"
        );
    }
}
