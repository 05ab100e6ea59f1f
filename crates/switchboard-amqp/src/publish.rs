//! Sending envelopes: a task takes them from a bounded queue in batches, picks
//! each one's routing keys, numbers it on its stream, and publishes one
//! message per key (a run of envelopes for the same key shares one message, a
//! bundle) on the session's confirm-mode channel. Up to [`IN_FLIGHT`] messages await
//! the broker's confirmation at once; an acknowledged message counts as
//! published, anything else (negative acknowledgement, returned as
//! unroutable, session lost before the confirmation) as dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use switchboard_core::NodeId;
use switchboard_core::backplane::{Outgoing, Route};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::wire::{self, Copy, Sequences};
use crate::{Shared, poll_once};
use switchboard_core::backplane::StatCounters;
use switchboard_core::bundle::Bundle;

/// Envelopes waiting to be sent. Beyond this, publishing drops and counts.
pub(crate) const QUEUE: usize = 64 * 1024;
const BATCH: usize = 256;
/// Messages awaiting the broker's confirmation at once.
const IN_FLIGHT: usize = 4096;
/// Streams numbered at once before the numbering starts a new epoch.
const STREAMS: usize = 100_000;

/// One message to publish: its routing key, and whether the broker must
/// return it when no queue takes it (an envelope for a node that is gone).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) key: String,
    pub(crate) mandatory: bool,
}

fn key(key: String, mandatory: bool) -> Key {
    Key { key, mandatory }
}

/// The messages an envelope becomes.
///
/// Fanout: one message whatever the destination; its routing key names the
/// node when there is one, so that the others drop it unread. Routing: a
/// node's key, the broadcast key, or one key per user, group and node of a
/// connection the target names (the node that holds several of them gets
/// several copies and delivers one).
pub(crate) fn keys(mode: Mode, route: &Route, me: &NodeId) -> Vec<Key> {
    match (mode, route) {
        (_, Route::Node(n)) => vec![key(wire::node_key(n.as_str()), mode == Mode::Routing)],
        (Mode::Fanout, Route::All) => vec![key(String::new(), false)],
        (Mode::Routing, Route::All) => vec![key(wire::BROADCAST_KEY.to_owned(), false)],
        (Mode::Fanout, Route::Interested(t)) => {
            let only = t.conn_nodes().and_then(|nodes| {
                let mut others = nodes.into_iter().filter(|n| *n != me);
                match (others.next(), others.next()) {
                    (Some(n), None) => Some(n),
                    _ => None,
                }
            });
            vec![key(
                only.map_or_else(String::new, |n| wire::node_key(n.as_str())),
                false,
            )]
        }
        (Mode::Routing, Route::Interested(t)) if t.is_all() => {
            vec![key(wire::BROADCAST_KEY.to_owned(), false)]
        }
        (Mode::Routing, Route::Interested(t)) => {
            let mut keys: Vec<String> = Vec::new();
            let mut add = |k: String| {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            };
            for c in t.conns().iter().filter(|c| c.node() != me) {
                add(wire::node_key(c.node().as_str()));
            }
            for u in t.included_users() {
                add(wire::user_key(u.as_str()));
            }
            for g in t.included_groups() {
                add(wire::group_key(g.as_str()));
            }
            keys.into_iter().map(|k| key(k, false)).collect()
        }
    }
}

/// A publication awaiting its confirmation: its session's generation and the
/// envelopes it carries.
type Pending = Pin<Box<dyn Future<Output = (u64, u64, lapin::Result<Confirmation>)> + Send>>;

/// The envelopes of a batch waiting to go out together: consecutive, for one
/// routing key, each the only copy of its envelope.
struct Open {
    key: Key,
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
        inflight: FuturesUnordered::new(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Some((generation, count, done)) = out.inflight.next(), if !out.inflight.is_empty() => {
                out.shared.confirmed(generation, count, done);
            }
            n = rx.recv_many(&mut batch, BATCH), if out.inflight.len() < IN_FLIGHT => {
                if n == 0 {
                    return;
                }
                out.batch(&mut batch).await;
            }
        }
    }
}

struct Publisher {
    shared: Arc<Shared>,
    seqs: Sequences,
    inflight: FuturesUnordered<Pending>,
}

impl Publisher {
    /// Publishes a batch in order. Runs of envelopes for the same routing key
    /// travel as one bundle: under load a burst costs the broker one message
    /// per run, not one per push; under light load a batch holds one envelope
    /// and nothing waits to fill a bundle. An envelope with several copies
    /// (routing mode, several keys) goes out alone, copies back to back, as
    /// receivers recognise repeated copies by their adjacency.
    async fn batch(&mut self, batch: &mut Vec<Outgoing>) {
        let mut open: Option<Open> = None;
        for o in batch.drain(..) {
            let mut keys = keys(self.shared.cfg.mode, &o.route, self.shared.node());
            if keys.len() == 1 {
                let key = keys.remove(0);
                match &mut open {
                    Some(b) if b.key == key && b.bundle.fits(o.envelope.len()) => {
                        b.bundle.push(&o.envelope);
                    }
                    _ => {
                        if let Some(b) = open.take() {
                            self.flush(b).await;
                        }
                        let mut bundle = wire::bundle();
                        bundle.push(&o.envelope);
                        open = Some(Open {
                            key,
                            bundle,
                            first: o.envelope,
                        });
                    }
                }
            } else {
                if let Some(b) = open.take() {
                    self.flush(b).await;
                }
                self.copies(keys, &o.envelope).await;
            }
        }
        if let Some(b) = open.take() {
            self.flush(b).await;
        }
    }

    async fn flush(&mut self, open: Open) {
        let count = open.bundle.count();
        let (epoch, first) = self
            .seqs
            .take(wire::stream(self.shared.cfg.mode, &open.key.key), count);
        let body = if count == 1 {
            wire::envelope_message(epoch, first, Copy::Only, &open.first)
        } else {
            wire::bundle_message(open.bundle, epoch, first)
        };
        self.publish(open.key, body, count).await;
    }

    /// The copies of an envelope with several routing keys, back to back.
    async fn copies(&mut self, keys: Vec<Key>, envelope: &Bytes) {
        let copies = keys.len();
        for (i, key) in keys.into_iter().enumerate() {
            let copy = match (copies, i) {
                (1, _) => Copy::Only,
                (_, 0) => Copy::First,
                _ => Copy::Later,
            };
            let (epoch, seq) = self.seqs.next(wire::stream(self.shared.cfg.mode, &key.key));
            let body = wire::envelope_message(epoch, seq, copy, envelope);
            self.publish(key, body, 1).await;
        }
    }

    /// Publishes one message carrying `count` envelopes.
    async fn publish(&mut self, Key { key, mandatory }: Key, body: Vec<u8>, count: u64) {
        let shared = &self.shared;
        let Some(session) = shared.link.current() else {
            // At-most-once: nothing waits for the broker to come back. The
            // numbers stay taken: receivers count the gap.
            StatCounters::add(&shared.stats.publish_dropped, count);
            return;
        };
        let channel = session.publish.clone();
        let exchange = shared.link.names().exchange.clone();
        let generation = session.generation;
        let mut fut: Pending = Box::pin(async move {
            let opts = BasicPublishOptions {
                mandatory,
                immediate: false,
            };
            let sent = channel
                .basic_publish(
                    exchange,
                    key.into(),
                    opts,
                    &body,
                    BasicProperties::default(),
                )
                .await;
            let confirmed = match sent {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            (generation, count, confirmed)
        });
        // Polled once here so that its frames are queued before the next
        // message's: the numbers of a stream reach the broker in order.
        match poll_once(fut.as_mut()).await {
            Poll::Ready((generation, count, done)) => shared.confirmed(generation, count, done),
            Poll::Pending => self.inflight.push(fut),
        }
    }
}

impl Shared {
    /// Counts a publication's outcome; a failed session is handed to the supervisor.
    pub(crate) fn confirmed(&self, generation: u64, count: u64, done: lapin::Result<Confirmation>) {
        let stats = &self.stats;
        match done {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                stats.published.fetch_add(count, Ordering::Relaxed);
            }
            Ok(Confirmation::Ack(Some(returned))) => {
                tracing::debug!(key = %returned.delivery.routing_key, "unroutable envelope returned");
                stats.publish_dropped.fetch_add(count, Ordering::Relaxed);
            }
            Ok(Confirmation::Nack(_)) => {
                // A node's queue is full (or the broker could not take it).
                stats.publish_dropped.fetch_add(count, Ordering::Relaxed);
            }
            Err(e) => {
                stats.publish_dropped.fetch_add(count, Ordering::Relaxed);
                self.link.failed(generation, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::{ConnId, Target};

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn names(mode: Mode, route: &Route) -> Vec<(String, bool)> {
        keys(mode, route, &n("me"))
            .into_iter()
            .map(|k| (k.key, k.mandatory))
            .collect()
    }

    #[test]
    fn routing_mode_sends_one_message_per_key() {
        let r = Mode::Routing;
        assert_eq!(names(r, &Route::Node(n("b"))), [("n.b".into(), true)]);
        assert_eq!(names(r, &Route::All), [("b".into(), false)]);
        assert_eq!(
            names(r, &Route::Interested(Target::all().except_user("x"))),
            [("b".into(), false)]
        );
        let t = Target::users(["a", "b", "a"])
            .and_group("g")
            .and_conn(ConnId::new(n("me"), 1))
            .and_conn(ConnId::new(n("c"), 2))
            .and_conn(ConnId::new(n("c"), 3));
        let got: Vec<String> = names(r, &Route::Interested(t))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, ["n.c", "u.a", "u.b", "g.g"]);
    }

    #[test]
    fn fanout_mode_sends_one_message_and_names_a_single_node() {
        let f = Mode::Fanout;
        assert_eq!(names(f, &Route::All), [(String::new(), false)]);
        assert_eq!(names(f, &Route::Node(n("b"))), [("n.b".into(), false)]);
        assert_eq!(
            names(f, &Route::Interested(Target::user("u").and_group("g"))),
            [(String::new(), false)]
        );
        let t = Target::conn(ConnId::new(n("c"), 2)).and_conn(ConnId::new(n("me"), 1));
        assert_eq!(names(f, &Route::Interested(t)), [("n.c".into(), false)]);
        let t = Target::conn(ConnId::new(n("c"), 2)).and_conn(ConnId::new(n("d"), 1));
        assert_eq!(names(f, &Route::Interested(t)), [(String::new(), false)]);
    }
}
