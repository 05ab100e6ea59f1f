//! Receiving envelopes: a pub/sub subscriber (pub/sub mode) or a stream
//! consumer (queue mode), each on a dedicated connection, each reconnecting
//! by itself and counting what it could not deliver.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::link::{Conn, Messages};
use bytes::Bytes;
use futures_util::StreamExt;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisError};
use switchboard_core::backplane::Inbound;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::link::{self, backoff};
use switchboard_core::bundle;

/// A pub/sub payload starting with this byte is a liveness probe.
pub(crate) const PROBE: u8 = 0;
/// A pub/sub payload starting with this byte is one sequenced envelope: the
/// sender's epoch (u64 BE), its sequence number on this channel (u64 BE), then
/// the envelope. Sent by earlier versions; still understood.
pub(crate) const SEQUENCED: u8 = 2;
/// A pub/sub payload starting with this byte is a sequenced bundle: the
/// sender's epoch (u64 BE), the sequence number of its first envelope on this
/// channel (u64 BE; the others follow on), then the envelopes (see `bundle`).
/// Receivers count the numbers they never saw as lost.
pub(crate) const BUNDLED: u8 = 3;
/// Length of the header of both.
pub(crate) const HEADER: usize = 17;

/// Counts what a subscriber missed, per sender and channel.
#[derive(Default)]
struct Gaps {
    /// (epoch, last number) per sender, on the node's channel and on the
    /// broadcast channel.
    last: [std::collections::HashMap<String, (u64, u64)>; 2],
}

impl Gaps {
    /// Records numbers `first..=last` of `epoch` from `origin`; returns how
    /// many were skipped before them.
    fn record(&mut self, origin: &str, broadcast: bool, epoch: u64, first: u64, last: u64) -> u64 {
        let senders = &mut self.last[usize::from(broadcast)];
        // Looked up by reference: a sender's name is allocated once, not
        // per message.
        if !senders.contains_key(origin) {
            senders.insert(origin.to_owned(), (epoch, first.saturating_sub(1)));
        }
        let Some(entry) = senders.get_mut(origin) else {
            return 0;
        };
        let missed = if entry.0 == epoch && first > entry.1 {
            first - entry.1 - 1
        } else {
            0
        };
        if entry.0 != epoch || last > entry.1 {
            *entry = (epoch, last);
        }
        missed
    }
}
/// Consumer group name of every node's stream.
const GROUP: &str = "switchboard";
/// How long one blocking stream read waits.
const BLOCK: Duration = Duration::from_millis(500);

/// Subscribes to the node's channel and the broadcast channel.
pub(crate) async fn subscribe(shared: &Shared) -> Result<Messages, RedisError> {
    let channels = [shared.keys.channel(shared.node()), shared.keys.broadcast()];
    shared.link.target.subscribe(&shared.keys, &channels).await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Pub/sub mode: forwards messages to the node until `stop`. A subscription
/// that stops delivering the node's own probes is treated as dead, so a
/// half-open connection cannot leave the node connected but deaf.
pub(crate) async fn subscriber(
    shared: Arc<Shared>,
    first: Messages,
    inbound: Inbound,
    stop: CancellationToken,
) {
    let mut stream = Some(first);
    let check = shared.heartbeat_interval();
    let broadcast_channel = shared.keys.broadcast();
    let mut gaps = Gaps::default();
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let mut wait = Duration::from_millis(50);
                loop {
                    if stop.is_cancelled() {
                        return;
                    }
                    match subscribe(&shared).await {
                        Ok(s) => {
                            shared.link.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("redis subscription re-established");
                            break s;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "redis resubscribe failed");
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = backoff(&mut wait) => {}
                            }
                        }
                    }
                }
            }
        };
        shared.last_probe.store(now_ms(), Ordering::Relaxed);
        shared.receiving.store(true, Ordering::Release);
        let mut ticker = tokio::time::interval(check);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = s.next() => match msg {
                    Some(m) => {
                        let payload = m.get_payload_bytes();
                        match payload.first() {
                            Some(&PROBE) => {
                                shared.last_probe.store(now_ms(), Ordering::Relaxed);
                                continue;
                            }
                            Some(&kind @ (SEQUENCED | BUNDLED)) if payload.len() > HEADER => {
                                let epoch = u64::from_be_bytes(payload[1..9].try_into().unwrap_or_default());
                                let first = u64::from_be_bytes(payload[9..17].try_into().unwrap_or_default());
                                // One copy of the whole message; the envelopes share it.
                                let body = Bytes::copy_from_slice(&payload[HEADER..]);
                                let envelopes: Vec<Bytes> = if kind == SEQUENCED {
                                    vec![body]
                                } else {
                                    let mut all = Vec::new();
                                    for e in bundle::envelopes(body) {
                                        match e {
                                            Ok(e) => all.push(e),
                                            Err(bundle::Truncated) => {
                                                tracing::warn!("truncated pub/sub bundle: its tail is dropped");
                                            }
                                        }
                                    }
                                    all
                                };
                                let Some(head) = envelopes.first() else { continue };
                                if let Some((origin, _)) = switchboard_core::envelope::peek_id(head) {
                                    let broadcast = m.get_channel_name() == broadcast_channel;
                                    let last = first + envelopes.len() as u64 - 1;
                                    let missed = gaps.record(origin, broadcast, epoch, first, last);
                                    if missed > 0 {
                                        tracing::warn!(%origin, missed, "pub/sub messages lost");
                                        shared.stats.receive_dropped.fetch_add(missed, Ordering::Relaxed);
                                    }
                                }
                                shared.stats.received.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
                                for envelope in envelopes {
                                    if inbound.send(envelope).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            _ => {
                                tracing::warn!("malformed pub/sub message dropped");
                            }
                        }
                    }
                    None => {
                        tracing::warn!("redis subscription lost");
                        fail_link(&shared);
                        break;
                    }
                },
                _ = ticker.tick() => {
                    let silent = now_ms().saturating_sub(shared.last_probe.load(Ordering::Relaxed));
                    // On a cluster, sooner: a failover moves the channel's
                    // slot, and the client moves a subscription only when a
                    // request of its own fails, which an idle one never makes.
                    let deaf = if shared.keys.is_cluster() { 2 } else { 3 };
                    if silent > deaf * check.as_millis() as u64 {
                        tracing::warn!(silent_ms = silent, "redis subscription delivers nothing; resubscribing");
                        break;
                    }
                }
            }
        }
        shared.receiving.store(false, Ordering::Release);
    }
}

/// Tells the shared connection's supervisor that Redis went away, so that the
/// directory is rebuilt at once rather than at the next failing command.
fn fail_link(shared: &Shared) {
    if let Some((_, generation)) = shared.link.current() {
        let e = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "a dedicated redis connection was lost",
        ));
        shared.link.failed(generation, &e);
    }
}

/// Recently seen envelope ids, to drop the duplicates at-least-once delivery brings.
struct Seen {
    set: HashSet<(String, u64)>,
    order: VecDeque<(String, u64)>,
    cap: usize,
}

impl Seen {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// Records an id; false if it was seen already.
    fn insert(&mut self, origin: &str, id: u64) -> bool {
        let key = (origin.to_owned(), id);
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }
}

async fn consumer_connection(shared: &Shared) -> Result<Conn, RedisError> {
    let mut conn = match &shared.link.target {
        link::Target::Single(client) => {
            let cfg = link::connection_config()
                .set_response_timeout(Some(BLOCK + link::RESPONSE_TIMEOUT));
            Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            )
        }
        // Its own cluster connection: a blocking read holds the connection
        // to its shard, and the response timeout (3 s) outlasts the block.
        cluster => cluster.connect().await?,
    };
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(shared.keys.queue(shared.node()))
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Ok(()) => {}
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(e),
    }
    Ok(conn)
}

/// A stream entry id `MS-SEQ` as a comparable pair.
pub(crate) fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Queue mode, at join: creates the node's stream and group if needed and
/// returns the id of the last entry already in it (its possible backlog).
pub(crate) async fn prepare_queue(shared: &Shared) -> Result<Option<(u64, u64)>, RedisError> {
    let mut conn = consumer_connection(shared).await?;
    let last: redis::streams::StreamRangeReply = conn
        .xrevrange_count(shared.keys.queue(shared.node()), "+", "-", 1)
        .await?;
    Ok(last.ids.first().map(|e| parse_id(&e.id)))
}

/// Queue mode: reads the node's stream through its consumer group, hands
/// entries to the node, and acknowledges them once the node has handled them.
pub(crate) async fn consumer(
    shared: Arc<Shared>,
    inbound: Inbound,
    mut handled: watch::Receiver<u64>,
    backlog_until: Option<(u64, u64)>,
    stop: CancellationToken,
) {
    let key = shared.keys.queue(shared.node());
    let me = shared.node().to_string();
    let mut seen = Seen::new(100_000);
    let mut sent_total = 0u64;
    // Entries up to this id were in the stream before this process joined: a
    // backlog from its previous life, held back for the grace period once.
    let mut backlog_until = backlog_until;
    let mut wait = Duration::from_millis(50);
    'connect: loop {
        let mut conn = match consumer_connection(&shared).await {
            Ok(c) => c,
            Err(e) => {
                shared.receiving.store(false, Ordering::Release);
                tracing::debug!(error = %e, "redis stream consumer cannot connect");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = backoff(&mut wait) => continue 'connect,
                }
            }
        };
        wait = Duration::from_millis(50);
        shared.receiving.store(true, Ordering::Release);
        // Entries delivered to this consumer before a crash or a lost
        // connection, and not acknowledged, come first ("0"); then new ones.
        let mut cursor = "0";
        // Handled entries, acknowledged with the next read: one round trip
        // (and one wake-up of this node) a batch rather than two.
        let mut handled_ids: Vec<String> = Vec::new();
        loop {
            let mut opts = StreamReadOptions::default()
                .group(GROUP, &me)
                .count(shared.cfg.concurrency);
            if cursor == ">" {
                opts = opts.block(BLOCK.as_millis() as usize);
            }
            let (keys, cursors) = ([&key], [cursor]);
            if stop.is_cancelled() {
                // Stopping: what was handled is acknowledged all the same.
                if !handled_ids.is_empty() {
                    let _: Result<u64, RedisError> = conn.xack(&key, GROUP, &handled_ids).await;
                }
                return;
            }
            let mut pipe = redis::pipe();
            if !handled_ids.is_empty() {
                pipe.xack(&key, GROUP, &handled_ids).ignore();
            }
            pipe.xread_options(&keys, &cursors, &opts);
            let query = pipe.query_async::<(StreamReadReply,)>(&mut conn);
            let read: Result<StreamReadReply, RedisError> = if handled_ids.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = query => r,
                }
            } else {
                // Not raced against `stop`: the acknowledgement must go (the
                // read then blocks for at most `BLOCK`).
                query.await
            }
            .map(|(r,)| r);
            handled_ids.clear();
            let reply = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "redis stream read failed");
                    shared.receiving.store(false, Ordering::Release);
                    if link::is_link_error(&e) {
                        fail_link(&shared);
                    }
                    if e.code() == Some("NOGROUP") {
                        // The stream expired or was removed: recreate it.
                        continue 'connect;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = backoff(&mut wait) => continue 'connect,
                    }
                }
            };
            let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
            if entries.is_empty() {
                cursor = ">";
                continue;
            }
            let backlog =
                backlog_until.is_some_and(|until| entries.iter().any(|e| parse_id(&e.id) <= until));
            if backlog {
                backlog_until = None;
                // Left from this node's previous life: give reconnecting
                // clients a moment to come back before delivering it.
                tracing::info!(entries = entries.len(), grace = ?shared.cfg.backlog_grace, "delivering the backlog after the grace period");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(shared.cfg.backlog_grace) => {}
                }
            }
            let oldest = shared
                .redis_now_ms()
                .saturating_sub(shared.cfg.queue_age.as_millis() as u64);
            let mut ids = Vec::with_capacity(entries.len());
            for entry in entries {
                let stamp: u64 = entry
                    .id
                    .split('-')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let bytes: Option<Vec<u8>> = entry.get("e");
                ids.push(entry.id);
                let Some(bytes) = bytes else { continue };
                if stamp < oldest {
                    shared.stats.expired.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some((origin, id)) = switchboard_core::envelope::peek_id(&bytes)
                    && !seen.insert(origin, id)
                {
                    shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                shared.stats.received.fetch_add(1, Ordering::Relaxed);
                if inbound.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
                sent_total += 1;
            }
            // Acknowledge only what the node has fully handled (with the
            // next read, above).
            let target = sent_total;
            tokio::select! {
                () = stop.cancelled() => return,
                _ = handled.wait_for(|h| *h >= target) => {}
            }
            handled_ids = ids;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Gaps;

    #[test]
    fn gaps_count_skipped_numbers_per_sender_epoch_and_channel() {
        let mut g = Gaps::default();
        assert_eq!(g.record("a", false, 1, 1, 1), 0);
        assert_eq!(g.record("a", false, 1, 2, 2), 0);
        assert_eq!(g.record("a", false, 1, 5, 5), 2);
        assert_eq!(
            g.record("a", true, 1, 1, 1),
            0,
            "channels are counted apart"
        );
        assert_eq!(
            g.record("a", false, 1, 4, 4),
            0,
            "late or repeated numbers are not losses"
        );
        assert_eq!(
            g.record("a", false, 2, 1, 1),
            0,
            "a new epoch (restarted sender) starts over"
        );
        assert_eq!(
            g.record("b", false, 9, 7, 7),
            0,
            "first message seen from a sender is not a gap"
        );
        assert_eq!(g.record("b", false, 9, 9, 9), 1);
    }

    #[test]
    fn a_bundle_covers_a_range_of_numbers() {
        let mut g = Gaps::default();
        assert_eq!(g.record("a", false, 1, 1, 10), 0);
        assert_eq!(g.record("a", false, 1, 11, 11), 0, "the bundle took 1..=10");
        assert_eq!(
            g.record("a", false, 1, 15, 20),
            3,
            "12, 13 and 14 were lost"
        );
        assert_eq!(g.record("a", false, 1, 21, 30), 0);
    }
}
