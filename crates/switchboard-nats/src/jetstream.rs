//! The JetStream mode: one stream per deployment (named after the prefix)
//! keeps the envelopes for every node under `P.q.NODE`, and each node reads
//! its own subject through a durable pull consumer named after it.
//!
//! - A sender publishes each envelope once per recipient node and waits for
//!   JetStream's acknowledgement, retrying until it comes (bounded by the
//!   publish queue): nothing the sender accepted is lost while the stream
//!   keeps it. Envelopes for users, groups and everyone go to every node heard
//!   from within `queue_age` that has not said goodbye: a node that crashed
//!   and is restarted under the same id within `queue_age` finds them in its
//!   backlog.
//! - A node acknowledges (`AckPolicy::All`, one acknowledgement covers all
//!   before it) only what the node has handled, so what a killed node had
//!   not delivered is delivered again; redeliveries are recognised by their
//!   numbers and dropped.
//! - The stream keeps at most `queue_cap` envelopes per node, for at most
//!   `queue_age`; what it discards unread is counted by the receiver from the
//!   gap in the numbers.
//!
//! Liveness stays on core NATS (`P.b`, `P.n.NODE`), as in the core mode.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use switchboard_core::backplane::Inbound;
use switchboard_core::relay::{self, Seen};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How long a JetStream request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The subject of one node's queue.
pub(crate) fn queue_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.q.{node}")
}

/// Creates the deployment's stream if it is missing (every node asks the
/// same), then the node's durable consumer.
pub(crate) async fn prepare(shared: &Shared) -> Result<consumer::PullConsumer, String> {
    prepare_from(shared, consumer::DeliverPolicy::All).await
}

/// After a lost link: what was in flight to the node when it broke counts,
/// for JetStream, as delivered and waits out the acknowledgement timeout,
/// and an acknowledgement of a later message (`AckPolicy::All`) would cover
/// it. So the consumer is made again from just past what the node
/// acknowledged: everything after is delivered again, in order, and what the
/// node had already (a redelivery) is recognised by its number and dropped.
///
/// `floor` keeps the last floor read across attempts: an attempt cut off by a
/// failover may have removed the consumer already, and the next one must
/// still make it again from there.
pub(crate) async fn rewind(
    shared: &Shared,
    consumer: &mut consumer::PullConsumer,
    floor: &mut Option<u64>,
) -> Result<consumer::PullConsumer, String> {
    match consumer.info().await {
        Ok(info) => *floor = Some(info.ack_floor.stream_sequence),
        Err(e) if floor.is_none() => return Err(format!("reading the consumer: {e}")),
        Err(e) => {
            tracing::debug!(error = %e, "the consumer is gone: made again from the last floor read")
        }
    }
    let start_sequence = floor.map_or(1, |f| f + 1);
    let js = &shared.js;
    let stream = js
        .get_stream(&shared.cfg.prefix)
        .await
        .map_err(|e| format!("reading the stream: {e}"))?;
    match stream.delete_consumer(shared.node.as_str()).await {
        Ok(_) => {}
        // Gone already: an earlier attempt removed it.
        Err(e) if e.to_string().contains("not found") => {}
        // Still there, maybe: made again it would keep its old position.
        Err(e) => return Err(format!("removing the consumer: {e}")),
    }
    prepare_from(
        shared,
        consumer::DeliverPolicy::ByStartSequence { start_sequence },
    )
    .await
}

async fn prepare_from(
    shared: &Shared,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<consumer::PullConsumer, String> {
    let js = &shared.js;
    let cfg = &shared.cfg;
    let stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.prefix.clone(),
            subjects: vec![format!("{}.q.*", cfg.prefix)],
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: cfg.queue_cap,
            max_age: cfg.queue_age,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the jetstream stream {:?}: {e}", cfg.prefix))?;
    let node = shared.node.as_str();
    stream
        .get_or_create_consumer(
            node,
            consumer::pull::Config {
                durable_name: Some(node.to_owned()),
                filter_subject: queue_subject(&cfg.prefix, node),
                deliver_policy,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 100_000,
                // A node gone for good takes its consumer with it.
                inactive_threshold: cfg.queue_age * 2,
                num_replicas: cfg.replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("creating the jetstream consumer {node:?}: {e}"))
}

/// On a clean stop: the node's consumer goes (peers stop sending to a node
/// that said goodbye, and its connections are closed, so a backlog would
/// reach nobody), and the stream too when no consumer is left.
pub(crate) async fn retire(shared: &Shared) -> Result<(), String> {
    let js = jetstream::new(shared.client.clone());
    let mut stream = js
        .get_stream(&shared.cfg.prefix)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .delete_consumer(shared.node.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    if info.state.consumer_count == 0 {
        js.delete_stream(&shared.cfg.prefix)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Publishes `body` on `subject` until JetStream acknowledges it, or `stop`.
pub(crate) async fn publish(shared: &Shared, subject: String, body: Bytes, count: u64) {
    let js = &shared.js;
    let mut wait = Duration::from_millis(50);
    let mut failing = false;
    loop {
        let sent = async {
            let ack = js
                .publish(subject.clone(), body.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(drop).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
            Ok(Ok(())) => {
                shared.stats.published.fetch_add(count, Ordering::Relaxed);
                if failing {
                    shared.publishing_since.store(0, Ordering::Relaxed);
                }
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %subject, "jetstream publish failed; retrying")
            }
            Err(_) => tracing::debug!(%subject, "jetstream publish timed out; retrying"),
        }
        if !failing {
            // Retrying: the node's status says so once it lasts (a stream
            // with no leader during a NATS server's failover).
            failing = true;
            let now = shared.started.elapsed().as_millis() as u64;
            let _ = shared.publishing_since.compare_exchange(
                0,
                now.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = switchboard_core::backplane::backoff(&mut wait, BACKOFF_MAX) => {}
        }
    }
}

/// Whether the node's consumer holds envelopes from before the node started
/// (a node restarted under its id): they wait for `backlog_grace`, so that
/// the clients reconnecting to the node are there to receive them.
pub(crate) async fn has_backlog(consumer: &mut consumer::PullConsumer) -> bool {
    match consumer.info().await {
        Ok(info) => info.num_pending > 0 || info.num_ack_pending > 0,
        Err(e) => {
            tracing::debug!(error = %e, "could not read the consumer's backlog");
            false
        }
    }
}

/// Reads the node's consumer into the node, acknowledging what it handled,
/// until `stop`; recreates the consumer's message stream when it fails.
pub(crate) async fn consume(
    shared: Arc<Shared>,
    mut consumer: consumer::PullConsumer,
    inbound: Inbound,
    mut handled: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    // Envelopes handed to the node so far; an acknowledgement waits until
    // the node has handled as many.
    let mut sent: u64 = *handled.borrow();
    let mut wait = Duration::from_millis(50);
    if has_backlog(&mut consumer).await && !shared.cfg.backlog_grace.is_zero() {
        tracing::info!(grace = ?shared.cfg.backlog_grace, "a backlog waits for reconnecting clients");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.cfg.backlog_grace) => {}
        }
    }
    // The link generation the message stream was made on: a reconnect
    // makes a new one at once, rather than after the client's request
    // timeout (a consumer whose leader moved answers nothing meanwhile).
    let mut made_on = shared.link.generation.load(Ordering::Acquire);
    let mut generation = shared.link.generation_changes();
    // Whether the last message stream ended (a lost link, an error): what
    // was in flight on it must be delivered again (see `rewind`).
    let mut broken = false;
    let mut floor: Option<u64> = None;
    loop {
        if broken {
            match rewind(&shared, &mut consumer, &mut floor).await {
                Ok(c) => {
                    consumer = c;
                    broken = false;
                    floor = None;
                }
                Err(e) => {
                    shared.receiving.store(false, Ordering::Release);
                    tracing::warn!(error = %e, "could not rewind the jetstream consumer");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = switchboard_core::backplane::backoff(&mut wait, BACKOFF_MAX) => {}
                    }
                    continue;
                }
            }
        }
        made_on = shared.link.generation.load(Ordering::Acquire).max(made_on);
        let heartbeat = (shared.cfg.node_ttl / 3).max(Duration::from_millis(500));
        let messages = consumer
            .stream()
            .heartbeat(heartbeat)
            .expires(heartbeat * 4)
            .messages();
        let messages = match messages.await {
            Ok(m) => m,
            Err(e) => {
                shared.receiving.store(false, Ordering::Release);
                tracing::warn!(error = %e, "jetstream consumer unavailable");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = switchboard_core::backplane::backoff(&mut wait, BACKOFF_MAX) => {}
                }
                // The consumer may be gone (a restarted server without it).
                if let Ok(c) = prepare(&shared).await {
                    consumer = c;
                }
                continue;
            }
        };
        shared.receiving.store(true, Ordering::Release);
        wait = Duration::from_millis(50);
        tokio::pin!(messages);
        // The latest message read, to acknowledge once the node handled
        // everything up to `upto`.
        let mut unacked: Option<(u64, jetstream::Message)> = None;
        loop {
            let ready = unacked
                .as_ref()
                .is_some_and(|(upto, _)| *handled.borrow() >= *upto);
            if ready && let Some((_, m)) = unacked.take() {
                if let Err(e) = m.ack().await {
                    // Redelivered after ack_wait, and dropped as a duplicate.
                    tracing::debug!(error = %e, "jetstream acknowledgement failed");
                }
                continue;
            }
            let next = tokio::select! {
                () = stop.cancelled() => return,
                _ = generation.changed() => {
                    if shared.link.generation.load(Ordering::Acquire) != made_on {
                        tracing::info!("nats reconnected: pulling from the consumer afresh");
                        break;
                    }
                    continue;
                }
                r = handled.changed(), if unacked.is_some() => {
                    if r.is_err() { return; }
                    continue;
                }
                next = messages.next() => next,
            };
            let m = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "jetstream consumer error");
                    shared.receiving.store(false, Ordering::Release);
                    break;
                }
                None => break,
            };
            shared.receiving.store(true, Ordering::Release);
            match deliver(&shared, m.message.payload.clone(), &inbound).await {
                Some(n) => sent += n,
                None => return,
            }
            unacked = Some((sent, m));
        }
        broken = true;
        tokio::select! {
            () = stop.cancelled() => return,
            () = switchboard_core::backplane::backoff(&mut wait, BACKOFF_MAX) => {}
        }
    }
}

/// Hands a message's new envelopes to the node; how many, or `None` when
/// the node is gone.
async fn deliver(shared: &Shared, payload: Bytes, inbound: &Inbound) -> Option<u64> {
    let (epoch, first, envelopes) = match relay::decode(payload) {
        Some(relay::Message::Envelope {
            epoch,
            seq,
            envelope,
            ..
        }) => (epoch, seq, vec![envelope]),
        Some(relay::Message::Bundle {
            epoch,
            first,
            envelopes,
        }) => (epoch, first, envelopes),
        _ => {
            tracing::warn!("malformed jetstream message dropped");
            return Some(0);
        }
    };
    let count = envelopes.len() as u64;
    let Some((origin, _)) = envelopes
        .first()
        .and_then(|e| switchboard_core::envelope::peek_id(e))
    else {
        tracing::warn!("malformed envelope dropped");
        return Some(0);
    };
    let stats = &shared.stats;
    {
        let mut t = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
        // One stream per sender: this node's queue.
        match t.record_range(origin, "q", epoch, first, first + count - 1) {
            Seen::Again => {
                stats.duplicates.fetch_add(count, Ordering::Relaxed);
                return Some(0);
            }
            Seen::New { missed } if missed > 0 => {
                tracing::warn!(%origin, missed, "envelopes discarded by the stream unread");
                stats.expired.fetch_add(missed, Ordering::Relaxed);
            }
            Seen::New { .. } => {}
        }
    }
    shared.hand_over(envelopes, inbound).await.then_some(count)
}
