//! Recorded pushes and recovery: the hub's side of streams with history.
//!
//! A recorded push is appended to each of its streams (one append per
//! stream, never per recipient), then delivered as a
//! `{"op":"push","stream":...,"pos":...,"data":...}` frame, encoded once per
//! stream and shared by every recipient on every node. A connection that
//! recovers streams holds its frames while its replay is read, and drops the
//! recorded frames its replay already covered (see `Outbox::begin_recovery`).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::Engine;
use switchboard_core::history::{group_stream, user_stream};
use switchboard_core::{
    Body, Dest, Entry, Frame, FrameKind, History, HistoryError, Payload, Position, Since, Target,
};

use super::Hub;
use crate::error::PushError;
use crate::outbox::Outbox;
use crate::registry::Delivery;
use crate::stats::Counters;

/// Recorded pushes to one stream are made one at a time on a node, so that
/// its peers get them in the order of their positions. Streams are spread
/// over this many locks, so that pushes to different streams do not wait for
/// each other (two streams sharing a lock only share its wait).
pub(crate) const ORDER_LOCKS: usize = 64;

/// Most entries a connection is replayed per stream: a client that missed
/// more is told `recovered:false` and resyncs. Also the outbox's frame cap.
const fn replay_limit(outbox_frames: usize) -> usize {
    outbox_frames
}

/// What a recorded push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedPush {
    /// The delivery of each stream's frame, summed.
    pub report: super::PushReport,
    /// Each stream the push was appended to, with its position there.
    pub positions: Vec<(String, Position)>,
}

/// The frame a client gets for the entry at `pos` of `stream`: text, with a
/// binary entry's data in base64 and `"binary":true`. Written straight into
/// one string (no JSON tree): it is built once per stream and push on the
/// pushing node, and once per receiving node.
pub fn recorded_frame(stream: &str, pos: Position, data: &[u8], kind: FrameKind) -> Frame {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64 + stream.len() + data.len() * 4 / 3);
    s.push_str(r#"{"op":"push","stream":"#);
    json_string(&mut s, stream);
    let _ = write!(s, r#","pos":"{pos}","data":"#);
    match kind {
        FrameKind::Text => json_string(&mut s, &String::from_utf8_lossy(data)),
        FrameKind::Binary => {
            s.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut s);
            s.push_str(r#"","binary":true"#);
        }
    }
    s.push('}');
    Frame::text(s)
}

/// Appends `v` as a JSON string, quoted and escaped.
fn json_string(out: &mut String, v: &str) {
    // A string always serializes.
    out.push_str(&serde_json::to_string(v).unwrap_or_default());
}

/// The frame that ends a stream's replay.
pub fn recovered_frame(stream: &str, recovered: bool) -> Frame {
    Frame::text(
        serde_json::json!({"op": "recovered", "stream": stream, "recovered": recovered})
            .to_string(),
    )
}

impl Hub {
    /// The history store, if this hub keeps history.
    pub fn history(&self) -> Option<&Arc<dyn History>> {
        self.inner.history.as_ref()
    }

    /// Whether the configuration may ask for any push to be recorded: a
    /// history and at least one pattern. Checked first, so that a node that
    /// records nothing by configuration pays nothing per push.
    pub fn records_any(&self) -> bool {
        self.inner.history.is_some() && !self.inner.record.is_empty()
    }

    /// Whether the configuration asks for pushes to `stream` to be recorded
    /// ([`HubBuilder::record`](super::HubBuilder::record)), and there is a
    /// history to record them in. Applications (the server's API and
    /// reference application) check it to choose between
    /// [`Hub::push_recorded`] and [`Hub::push`].
    pub fn records(&self, stream: &str) -> bool {
        self.inner.history.is_some()
            && self
                .inner
                .record
                .iter()
                .any(|p| crate::auth::pattern_matches(p, stream))
    }

    /// Pushes and records: the payload is appended to the stream of each user
    /// (`user:U`) and group (`group:G`) of `target`, then delivered to that
    /// user's connections or that group's members, on any node, as
    /// `{"op":"push","stream":...,"pos":...,"data":...}`. A connection reached
    /// through several streams gets one frame per stream. Excluded users and
    /// connections apply to the delivery, not to what is recorded.
    ///
    /// Returns once every stream's entry is appended and its frame handed to
    /// the cluster. If an append fails, the streams before it were pushed and
    /// the error is returned; nothing is pushed to a stream whose append
    /// failed.
    pub async fn push_recorded(
        &self,
        target: &Target,
        payload: impl Into<Payload>,
    ) -> Result<RecordedPush, PushError> {
        if target.is_all() || !target.conns().is_empty() {
            return Err(PushError::NotRecordable);
        }
        let history = self.inner.history.clone().ok_or(PushError::NoHistory)?;
        let frame = payload.into().into_frame(self.inner.default_kind)?;
        let narrow = |t: Target| t.excluding_as(target);
        let mut out = RecordedPush::default();
        for user in target.included_users() {
            let stream = user_stream(user.as_str());
            self.record_one(
                &*history,
                stream,
                narrow(Target::user(user.clone())),
                &frame,
                &mut out,
            )
            .await?;
        }
        for group in target.included_groups() {
            let stream = group_stream(group.as_str());
            self.record_one(
                &*history,
                stream,
                narrow(Target::group(group.clone())),
                &frame,
                &mut out,
            )
            .await?;
        }
        Ok(out)
    }

    async fn record_one(
        &self,
        history: &dyn History,
        stream: String,
        target: Target,
        frame: &Frame,
        out: &mut RecordedPush,
    ) -> Result<(), PushError> {
        let lock = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            stream.hash(&mut h);
            &self.inner.record_order[h.finish() as usize % ORDER_LOCKS]
        };
        let _order = lock.lock().await;
        let pos = match history
            .append(&stream, frame.data().clone(), frame.kind())
            .await
        {
            Ok(pos) => pos,
            Err(e) => {
                Counters::add(&self.inner.counters.record_failed, 1);
                return Err(e.into());
            }
        };
        Counters::add(&self.inner.counters.recorded, 1);
        let shared = recorded_frame(&stream, pos, frame.data(), frame.kind());
        self.inner.counters.pushed(&target);
        let d = self.deliver_recorded(&target, &stream, pos, &shared);
        out.report.local += d.queued;
        out.report.local_dropped += d.dropped + d.overflowed;
        if self.needs_cluster(&target) {
            let env = self.envelope(Body::Recorded {
                target: target.clone(),
                stream: stream.clone(),
                pos,
                frame: shared,
            });
            let h = self.inner.backplane.publish(Dest::Interested(&target), env);
            out.report.remote.sent += h.sent;
            out.report.remote.dropped += h.dropped;
        }
        out.positions.push((stream, pos));
        Ok(())
    }

    /// The entries of `stream` after `after` (at most `limit`), or
    /// [`Since::Gone`] when the history no longer covers `after`.
    pub async fn history_since(
        &self,
        stream: &str,
        after: Position,
        limit: usize,
    ) -> Result<Since, HistoryError> {
        let history = self.inner.history.as_ref().ok_or_else(no_history)?;
        history.since(stream, after, limit).await
    }

    /// The latest `n` entries of `stream`, oldest first, and its latest position.
    pub async fn history_latest(
        &self,
        stream: &str,
        n: usize,
    ) -> Result<(Vec<Entry>, Option<Position>), HistoryError> {
        let history = self.inner.history.as_ref().ok_or_else(no_history)?;
        history.latest(stream, n).await
    }

    /// Starts recovering `streams` for a connection whose outbox holds its
    /// frames (see [`Outbox::begin_recovery`]): once the connection's
    /// membership is visible cluster-wide, reads each stream's missed entries
    /// and queues them. Owned by the hub's connection tasks, so shutdown
    /// waits for it.
    ///
    /// Why after the membership settles: a push appended after the read
    /// started must then reach the connection live, and one appended before
    /// is in the replay; a push that is both is dropped as a repeat.
    pub(crate) fn spawn_recovery(&self, outbox: Arc<Outbox>, streams: Vec<(String, Position)>) {
        let hub = self.clone();
        self.spawn_conn(async move {
            hub.settle().await;
            let limit = replay_limit(hub.inner.limits.outbox_frames);
            let mut frames = Vec::new();
            let mut last = Vec::with_capacity(streams.len());
            for (stream, pos) in &streams {
                let read = match hub.inner.history.as_ref() {
                    Some(h) => h.since(stream, *pos, limit).await,
                    None => Err(no_history()),
                };
                match read {
                    Ok(Since::Entries { entries, .. }) => {
                        Counters::add(&hub.inner.counters.recovered, 1);
                        Counters::add(&hub.inner.counters.replayed, entries.len() as u64);
                        last.push(Some(entries.last().map_or(*pos, |e| e.pos)));
                        frames.extend(
                            entries
                                .iter()
                                .map(|e| recorded_frame(stream, e.pos, &e.data, e.kind)),
                        );
                        frames.push(recovered_frame(stream, true));
                    }
                    Ok(Since::Gone { .. }) => {
                        Counters::add(&hub.inner.counters.not_recovered, 1);
                        last.push(None);
                        frames.push(recovered_frame(stream, false));
                    }
                    Err(error) => {
                        Counters::add(&hub.inner.counters.not_recovered, 1);
                        tracing::warn!(node = %hub.inner.node, %stream, %error, "cannot read a stream's history to recover it");
                        last.push(None);
                        frames.push(recovered_frame(stream, false));
                    }
                }
            }
            outbox.finish_recovery(frames, last.clone());
            for ((stream, _), last) in streams.iter().zip(last) {
                let d = hub.registry().recovered(stream, last);
                hub.inner.counters.delivered(&d);
            }
        });
    }

    /// Delivers a recorded push (this node's or a peer's) in its stream's
    /// order.
    pub(super) fn deliver_recorded(
        &self,
        target: &Target,
        stream: &str,
        pos: Position,
        frame: &Frame,
    ) -> Delivery {
        let (d, holding) =
            self.registry()
                .deliver_recorded(target, stream, pos, frame, self.clock_ms());
        self.inner.counters.delivered(&d);
        if holding {
            self.inner.gaps.notify_one();
        }
        d
    }
}

/// How long a node holds a stream's early entries for the ones before them
/// before it reads those from the history. Long enough for a push that is
/// still on its way through the broker (a few milliseconds), short enough
/// that a lost one delays the stream's next entries little.
pub(crate) const GAP_TIMEOUT_MS: u64 = 250;

/// How long a gap waits for a history store that does not answer before it
/// is given up (and the stream's members told): a Redis back from a restart
/// answers well within it.
const GAP_GIVE_UP_MS: u64 = 5_000;

/// Fills the gaps of recorded streams that stay open past
/// [`GAP_TIMEOUT_MS`] from the history, until the hub stops. Sleeps while no
/// entry is held (woken by a delivery that held one). Holds the hub weakly,
/// like the dispatcher.
pub(super) async fn fill_gaps(
    hub: std::sync::Weak<super::Inner>,
    stop: tokio_util::sync::CancellationToken,
    wake: Arc<tokio::sync::Notify>,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_millis(GAP_TIMEOUT_MS / 4)) => {}
            }
            let Some(inner) = hub.upgrade() else { return };
            let hub = Hub { inner };
            let gaps = hub.registry().overdue_gaps(hub.clock_ms(), GAP_TIMEOUT_MS);
            for gap in gaps {
                let after = Position {
                    offset: gap.from.saturating_sub(1),
                    epoch: gap.epoch,
                };
                let want = (gap.until - gap.from) as usize;
                let read = match hub.inner.history.as_ref() {
                    Some(h) => h.since(&gap.stream, after, usize::MAX).await,
                    None => Err(no_history()),
                };
                let frames: Vec<(Position, Frame)> = match read {
                    Ok(Since::Entries { entries, .. }) => entries
                        .iter()
                        .take(want)
                        .map(|e| (e.pos, recorded_frame(&gap.stream, e.pos, &e.data, e.kind)))
                        .collect(),
                    Ok(Since::Gone { .. }) => Vec::new(),
                    Err(error) => {
                        // The store is down: try again at the next look, until
                        // the gap is older than the store is given to return.
                        if hub.clock_ms().saturating_sub(gap.since) < GAP_GIVE_UP_MS {
                            tracing::debug!(node = %hub.inner.node, stream = %gap.stream, %error, "cannot read the history to fill a gap yet");
                            continue;
                        }
                        tracing::warn!(node = %hub.inner.node, stream = %gap.stream, %error, "cannot read the history to fill a gap");
                        Vec::new()
                    }
                };
                let (d, lost, _) = hub.registry().fill_gap(&gap, &frames, hub.clock_ms());
                hub.inner.counters.delivered(&d);
                Counters::add(&hub.inner.counters.gap_filled, frames.len() as u64);
                if lost > 0 {
                    Counters::add(&hub.inner.counters.gap_lost, lost);
                    tracing::warn!(node = %hub.inner.node, stream = %gap.stream, lost, "entries of a stream never came and are not in its history");
                }
            }
            if !hub.registry().holding() {
                break;
            }
        }
    }
}

fn no_history() -> HistoryError {
    HistoryError::Unavailable("this node keeps no history".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_frame_is_one_json_object_whatever_the_data() {
        let pos = Position {
            offset: 7,
            epoch: 0xab,
        };
        let f = recorded_frame("user:a\"b", pos, "say \"hi\"\n".as_bytes(), FrameKind::Text);
        let v: serde_json::Value = serde_json::from_str(f.as_text().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op": "push", "stream": "user:a\"b", "pos": "7-ab", "data": "say \"hi\"\n"})
        );
        let f = recorded_frame("group:g", pos, &[0, 255, 1], FrameKind::Binary);
        let v: serde_json::Value = serde_json::from_str(f.as_text().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op": "push", "stream": "group:g", "pos": "7-ab", "data": "AP8B", "binary": true})
        );
    }
}
