//! Sending envelopes: a task takes them from a bounded queue in batches,
//! resolves which nodes need each one (one pipelined round trip of directory
//! lookups for the whole batch), and sends them in a second pipeline: in
//! pub/sub mode one `PUBLISH` per interested node carrying all of the batch's
//! envelopes for it (see `bundle`), in queue mode one stream entry per
//! envelope and interested node.
//!
//! Pub/sub: a failed send is dropped and counted (at-most-once). Queue: the
//! batch is retried after reconnecting, so nothing accepted is lost while the
//! queue has room; receivers drop the duplicates a partial retry can cause.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use redis::Pipeline;
use switchboard_core::backplane::{Outgoing, Route, StatCounters};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use switchboard_core::bundle::Bundle;

use crate::Shared;
use crate::config::Mode;
use crate::routes::{Holders, Kind};

/// Envelopes waiting to be sent. Beyond this, publishing drops and counts.
pub(crate) const QUEUE: usize = 64 * 1024;
const BATCH: usize = 256;
/// A bundle stops growing at this size, so one message never approaches
/// Redis's per-client output limits.
const MAX_BUNDLE: usize = 256 * 1024;

/// Destinations of one envelope.
enum Dests<'a> {
    Broadcast,
    /// Sorted, without repeats.
    Nodes(&'a [&'a str]),
}

/// Per-channel sequence numbers of this process's pub/sub messages.
pub(crate) type Sequences = HashMap<String, u64>;

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut seqs = Sequences::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
        }
        loop {
            match send(&shared, &batch, &mut seqs, &stop).await {
                Ok(sent) => {
                    shared.stats.published.fetch_add(sent, Ordering::Relaxed);
                    break;
                }
                Err(lost) if shared.cfg.mode == Mode::PubSub => {
                    shared
                        .stats
                        .publish_dropped
                        .fetch_add(lost, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    // Queue mode: wait for Redis and send the same batch again.
                    if shared.link.ready(&stop).await.is_none() {
                        return;
                    }
                }
            }
        }
        batch.clear();
    }
}

/// Sends one batch; returns the number of messages sent, or on failure the
/// number that were to be sent.
async fn send<'a>(
    shared: &Shared,
    batch: &'a [Outgoing],
    seqs: &mut Sequences,
    stop: &CancellationToken,
) -> Result<u64, u64> {
    let Some((mut conn, generation)) = shared.link.current() else {
        // Down: in queue mode wait; in pub/sub mode this batch is lost.
        if shared.cfg.mode == Mode::Queue {
            shared.link.ready(stop).await;
        }
        return Err(batch.len() as u64);
    };
    let keys = &shared.keys;
    let me = shared.node().as_str();

    // Right after a reconnect the directory may be incomplete: a Redis that
    // restarted without persistence is empty until every holder has rebuilt
    // its entries. So for one TTL a push to users or groups also goes to
    // every node that may hold them, each on its own channel or stream, where
    // sequence numbers still reveal losses (a node that holds none of them
    // delivers nothing): every node known alive and, in pub/sub mode,
    // - every node subscribed right now, as Redis reports it: a node this
    //   one has not heard of (it joined since the last heartbeat, and the
    //   restart took its liveness entry too) still gets it;
    // - every node this process has published to before: one that is away,
    //   even unknown, counts the push from the gap once it is back. A node
    //   never sent anything could not: its first message opens its count.
    // Not the broadcast channel instead: a node that never got a broadcast
    // from this one has no count there to find a gap in.
    // A durable Redis needs none of this: a rebuild never removes an entry
    // its node still holds.
    let unsure = shared.link.recently_reconnected(shared.cfg.node_ttl);

    // Which nodes hold the users and groups of the batch: what this node
    // knows (see `routes`), unless unsure; the rest is asked in round trip 1.
    // Round trip 1 also gives, for a broadcast in queue mode, which nodes
    // exist right now (a node that joined since the last heartbeat must not
    // miss it), and in the window above, in pub/sub mode, which nodes are
    // subscribed.
    let mut holders: HashMap<(Kind, &str), Holders> = HashMap::new();
    let mut lookups: Vec<(Kind, &str)> = Vec::new();
    let mut broadcast = false;
    let version = {
        let known = shared.routes.known();
        let mut wanted = |kind: Kind, name: &'a str| {
            if holders.contains_key(&(kind, name)) {
                return;
            }
            match known.get(kind, name).filter(|_| !unsure) {
                Some(h) => {
                    holders.insert((kind, name), h.clone());
                }
                None => lookups.push((kind, name)),
            }
        };
        for o in batch {
            match &o.route {
                Route::Interested(t) if !t.is_all() => {
                    for u in t.included_users() {
                        wanted(Kind::User, u.as_str());
                    }
                    for g in t.included_groups() {
                        wanted(Kind::Group, g.as_str());
                    }
                }
                Route::Node(_) => {}
                _ => broadcast = true,
            }
        }
        known.version().filter(|_| !unsure)
    };
    lookups.sort_unstable();
    lookups.dedup();
    let fresh_nodes = broadcast && shared.cfg.mode == Mode::Queue;
    let discover = unsure && shared.cfg.mode == Mode::PubSub && !lookups.is_empty();
    let mut fresh: Option<crate::liveness::Liveness> = None;
    let mut subscribed: Vec<String> = Vec::new();
    if !lookups.is_empty() || fresh_nodes {
        let mut call = crate::scripts::ROUTE_LOOKUP.prepare_invoke();
        for &(kind, name) in &lookups {
            call.key(match kind {
                Kind::User => keys.user_nodes(name),
                Kind::Group => keys.group_nodes(name),
            });
        }
        call.key(keys.nodes());
        call.arg(if fresh_nodes { "1" } else { "0" })
            .arg(keys.nodes())
            .arg(if discover && !keys.is_cluster() {
                keys.channel_pattern()
            } else {
                String::new()
            });
        let reply: Vec<redis::Value> = match call.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                shared.link.failed(generation, &e);
                return Err(batch.len() as u64);
            }
        };
        let mut reply = reply.into_iter();
        let Some(found) = reply
            .next()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
        else {
            tracing::warn!("unexpected reply to the routing lookup; batch not sent");
            return Err(batch.len() as u64);
        };
        let time: Option<(u64, u64)> = reply.next().and_then(|v| redis::from_redis_value(v).ok());
        let list: Option<Vec<(String, f64)>> =
            reply.next().and_then(|v| redis::from_redis_value(v).ok());
        if let Some(channels) = reply
            .next()
            .and_then(|v| redis::from_redis_value::<Vec<String>>(v).ok())
        {
            subscribed = channels
                .iter()
                .filter_map(|c| keys.channel_node(c))
                .map(str::to_owned)
                .collect();
        }
        for (&(kind, name), nodes) in lookups.iter().zip(found.split(' ')) {
            let nodes: Holders = nodes
                .split(',')
                .filter(|n| !n.is_empty())
                .map(Box::<str>::from)
                .collect();
            holders.insert((kind, name), nodes);
        }
        if let Some(version) = version {
            shared.routes.fill(
                version,
                lookups.iter().filter_map(|&(kind, name)| {
                    Some((kind, name, holders.get(&(kind, name))?.clone()))
                }),
            );
        }
        if let (Some((secs, micros)), Some(list)) = (time, list) {
            fresh = Some(crate::liveness::Liveness::from_read(
                secs * 1000 + micros / 1000,
                list,
            ));
        }
    }

    // Round trip 2: every envelope to every interested node, bundled per
    // channel (pub/sub) or one entry each, with one expiry renewal per stream
    // (queue).
    // How long past its liveness deadline a holder still gets envelopes:
    // in pub/sub, until its entries are collected (one TTL), so that a node
    // whose heartbeat was merely late loses nothing, and one that was cut off
    // counts the gap when it is back; in queue mode, as long as its stream
    // keeps them.
    let keep = match shared.cfg.mode {
        Mode::PubSub => shared.cfg.node_ttl,
        Mode::Queue => shared.cfg.queue_age,
    };
    let mut out = Out::default();
    {
        let cached = shared.live.read().unwrap_or_else(|p| p.into_inner());
        // A view read before the last reconnect (no heartbeat has read the
        // node set on the new connection yet, or none could: the directory's
        // shard may still be down) says nothing about who died: extrapolated
        // across the outage, every peer's deadline looks long past, and
        // judging by it would drop pushes to peers that kept renewing all
        // along. Until a heartbeat reads the set again, nobody is judged dead.
        let judge = fresh.is_some() || !cached.read_before(shared.link.since_reconnect());
        let live = fresh.as_ref().unwrap_or(&cached);
        // The nodes that may hold a user or group while unsure (see above).
        let mut maybe_holders: BTreeSet<String> = BTreeSet::new();
        if unsure && !lookups.is_empty() {
            maybe_holders.extend(live.live().map(str::to_owned));
            maybe_holders.extend(subscribed);
            maybe_holders.extend(
                seqs.keys()
                    .filter_map(|c| keys.channel_node(c))
                    .map(str::to_owned),
            );
        }
        // One list, reused: a push costs no allocation for its destinations.
        let mut nodes: Vec<&str> = Vec::new();
        for o in batch {
            let broadcast = match &o.route {
                Route::Node(n) => {
                    nodes.clear();
                    nodes.push(n.as_str());
                    false
                }
                Route::All => true,
                Route::Interested(t) if t.is_all() => true,
                Route::Interested(t) => {
                    nodes.clear();
                    nodes.extend(t.conns().iter().map(|c| c.node().as_str()));
                    if unsure && (!t.included_users().is_empty() || !t.included_groups().is_empty())
                    {
                        nodes.extend(maybe_holders.iter().map(String::as_str));
                    }
                    let held = t
                        .included_users()
                        .iter()
                        .map(|u| (Kind::User, u.as_str()))
                        .chain(
                            t.included_groups()
                                .iter()
                                .map(|g| (Kind::Group, g.as_str())),
                        );
                    for key in held {
                        nodes.extend(
                            holders
                                .get(&key)
                                .into_iter()
                                .flat_map(|h| h.iter())
                                .map(|n| &**n),
                        );
                    }
                    nodes.sort_unstable();
                    nodes.dedup();
                    false
                }
            };
            let dests = if broadcast {
                Dests::Broadcast
            } else {
                Dests::Nodes(&nodes)
            };
            out.add(shared, seqs, live, judge, keep, me, dests, &o.envelope);
        }
    }
    let messages = out.messages;
    if messages == 0 {
        return Ok(0);
    }
    let pipe = out.finish(shared, seqs);
    match crate::link::exec(&mut conn, &pipe).await {
        Ok(()) => Ok(messages),
        Err(e) => {
            tracing::warn!(error = %e, "publishing to redis failed");
            shared.link.failed(generation, &e);
            Err(messages)
        }
    }
}

/// The second round trip of a batch, being built.
#[derive(Default)]
struct Out {
    pipe: Pipeline,
    /// Pub/sub: the bundle being filled for each destination node (`None`:
    /// the broadcast channel), with its channel, in first-use order.
    bundles: Vec<(Option<String>, String, Bundle)>,
    /// Queue: the streams written, each to be renewed once.
    streams: BTreeSet<String>,
    /// Envelope deliveries to nodes (an envelope sent to two nodes counts 2).
    messages: u64,
}

impl Out {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        shared: &Shared,
        seqs: &mut Sequences,
        live: &crate::liveness::Liveness,
        // Whether `live` may judge a holder dead (see `send`).
        judge: bool,
        keep: std::time::Duration,
        me: &str,
        dests: Dests<'_>,
        env: &Bytes,
    ) {
        match (shared.cfg.mode, dests) {
            (Mode::PubSub, Dests::Broadcast) => {
                self.publish(shared, seqs, None, env);
            }
            (Mode::Queue, Dests::Broadcast) => {
                for node in live.live().filter(|n| *n != me) {
                    self.xadd(shared, node, env);
                }
            }
            (mode, Dests::Nodes(nodes)) => {
                for &node in nodes.iter().filter(|n| **n != me) {
                    if judge && !live.routable(node, keep) {
                        // A holder dead past its grace: not sent, but not
                        // silently either.
                        StatCounters::add(&shared.stats.publish_dropped, 1);
                        continue;
                    }
                    match mode {
                        Mode::PubSub => self.publish(shared, seqs, Some(node), env),
                        Mode::Queue => self.xadd(shared, node, env),
                    }
                }
            }
        }
    }

    /// Adds the envelope to the bundle for `node` (`None`: every node); a full
    /// bundle goes into the pipeline first. The channel's name is built once
    /// per bundle, not per envelope.
    ///
    /// A node reads its own channel and the broadcast channel on one
    /// subscription, in the order they were published: so that an envelope
    /// to one never overtakes an earlier one to the other, switching between
    /// the broadcast and nodes' channels first publishes the bundles open on
    /// the other side. Bundles for different nodes stay open together.
    fn publish(&mut self, shared: &Shared, seqs: &mut Sequences, node: Option<&str>, env: &Bytes) {
        self.messages += 1;
        let broadcast = node.is_none();
        if self.bundles.iter().any(|(n, ..)| n.is_none() != broadcast) {
            let (other, same): (Vec<_>, Vec<_>) = std::mem::take(&mut self.bundles)
                .into_iter()
                .partition(|(n, ..)| n.is_none() != broadcast);
            for (_, channel, bundle) in other {
                publish(&mut self.pipe, shared, seqs, channel, bundle);
            }
            self.bundles = same;
        }
        let at = match self.bundles.iter().position(|(n, ..)| n.as_deref() == node) {
            Some(at) => at,
            None => {
                let channel = match node {
                    Some(n) => shared.keys.channel(n),
                    None => shared.keys.broadcast(),
                };
                let header = Bundle::new(crate::receive::HEADER, MAX_BUNDLE);
                self.bundles
                    .push((node.map(str::to_owned), channel, header));
                self.bundles.len() - 1
            }
        };
        let (_, channel, bundle) = &mut self.bundles[at];
        if !bundle.fits(env.len()) {
            let full = std::mem::replace(bundle, Bundle::new(crate::receive::HEADER, MAX_BUNDLE));
            publish(&mut self.pipe, shared, seqs, channel.clone(), full);
        }
        bundle.push(env);
    }

    fn xadd(&mut self, shared: &Shared, node: &str, env: &Bytes) {
        self.messages += 1;
        let queue = shared.keys.queue(node);
        self.pipe
            .cmd("XADD")
            .arg(&queue)
            .arg("MAXLEN")
            .arg("~")
            .arg(shared.cfg.queue_cap)
            .arg("*")
            .arg("e")
            .arg(env.as_ref())
            .ignore();
        self.streams.insert(queue);
    }

    /// The pipeline, with the open bundles and the streams' renewals.
    fn finish(mut self, shared: &Shared, seqs: &mut Sequences) -> Pipeline {
        for (_, channel, bundle) in self.bundles {
            publish(&mut self.pipe, shared, seqs, channel, bundle);
        }
        // A stream whose node never shows up again must not live forever: it
        // expires unless its owner, renewing it every heartbeat, is alive.
        let expiry = crate::queue_expiry(&shared.cfg).as_millis() as u64;
        for queue in &self.streams {
            self.pipe
                .cmd("PEXPIRE")
                .arg(queue)
                .arg(expiry)
                .arg("NX")
                .ignore();
        }
        self.pipe
    }
}

/// PUBLISH of a bundle with the sequenced header (see `receive::BUNDLED`):
/// its envelopes take the channel's next numbers. They are used even if the
/// pipeline later fails: the receiver then sees the gap.
fn publish(
    pipe: &mut Pipeline,
    shared: &Shared,
    seqs: &mut Sequences,
    channel: String,
    mut bundle: Bundle,
) {
    let seq = seqs.entry(channel.clone()).or_insert(0);
    let first = *seq + 1;
    *seq += bundle.count();
    let header = bundle.header_mut();
    header[0] = crate::receive::BUNDLED;
    header[1..9].copy_from_slice(&shared.epoch.to_be_bytes());
    header[9..17].copy_from_slice(&first.to_be_bytes());
    pipe.cmd(shared.keys.publish_command())
        .arg(channel)
        .arg(bundle.into_bytes())
        .ignore();
}
