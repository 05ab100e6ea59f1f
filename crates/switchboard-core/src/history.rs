//! Streams with history: recorded pushes, their positions, and the store
//! that keeps them for clients that reconnect.
//!
//! A recorded push to a user is appended to the stream `user:U`; one to a
//! group, to `group:G`. Each entry gets a [`Position`]: an offset that grows
//! by one per entry of its stream, cluster-wide, and the stream's epoch, which
//! changes when the store lost the stream's history (a Redis restarted
//! without persistence, a stream that expired). A position of another epoch
//! says nothing about this one's entries, so a client holding one must resync.
//!
//! [`History`] is the seam; [`MemoryHistory`] keeps streams in this process
//! (standalone and `memory:N` nodes share one), `switchboard-redis` keeps them
//! in Redis Streams for every other mode.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame::FrameKind;

/// Where an entry sits in its stream: `<offset>-<epoch>` on the wire, both
/// numbers, the epoch in hexadecimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// 1 for a stream's first entry, then one more per entry.
    pub offset: u64,
    /// Changes whenever the stream's history was lost.
    pub epoch: u64,
}

impl Position {
    /// Whether `self` is an entry at or before `other`, of the same epoch.
    pub fn covered_by(&self, other: &Position) -> bool {
        self.epoch == other.epoch && self.offset <= other.offset
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:x}", self.offset, self.epoch)
    }
}

/// A position that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a position is <offset>-<epoch>, both numbers, the epoch in hexadecimal")]
pub struct BadPosition;

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Self, BadPosition> {
        let (offset, epoch) = s.split_once('-').ok_or(BadPosition)?;
        if offset.is_empty() || epoch.is_empty() || epoch.len() > 16 {
            return Err(BadPosition);
        }
        Ok(Position {
            offset: offset.parse().map_err(|_| BadPosition)?,
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| BadPosition)?,
        })
    }
}

/// The stream a push to user `uid` is recorded in.
pub fn user_stream(uid: &str) -> String {
    format!("user:{uid}")
}

/// The stream a push to group `group` is recorded in.
pub fn group_stream(group: &str) -> String {
    format!("group:{group}")
}

/// What a stream name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOf<'a> {
    /// `user:U`.
    User(&'a str),
    /// `group:G`.
    Group(&'a str),
}

impl<'a> StreamOf<'a> {
    /// Reads a stream name; `None` for anything but `user:U` or `group:G`
    /// with a non-empty name.
    pub fn parse(stream: &'a str) -> Option<Self> {
        if let Some(u) = stream.strip_prefix("user:") {
            return (!u.is_empty()).then_some(StreamOf::User(u));
        }
        if let Some(g) = stream.strip_prefix("group:") {
            return (!g.is_empty()).then_some(StreamOf::Group(g));
        }
        None
    }
}

/// One recorded push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the stream.
    pub pos: Position,
    /// What was pushed.
    pub data: Bytes,
    /// Text or binary.
    pub kind: FrameKind,
}

/// What a read from a position found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Every entry after the position, oldest first (none if the client is
    /// up to date). `top` is the stream's latest position (the one given when
    /// the stream is empty and the position is its start).
    Entries {
        /// The entries after the position.
        entries: Vec<Entry>,
        /// The stream's latest position.
        top: Position,
    },
    /// The history no longer covers the position: its epoch is not the
    /// stream's, entries after it were trimmed or expired, or more than the
    /// read's limit came after it. The client must resync.
    Gone {
        /// The stream's latest position, if it has any entry.
        top: Option<Position>,
    },
}

/// Errors of a history store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The store could not be reached or failed.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    /// A stream name is not `user:U` or `group:G`.
    #[error("not a stream: {0}")]
    BadStream(String),
}

/// Where recorded pushes are kept.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Appends one entry to `stream` and returns its position. Appends to one
    /// stream from the whole cluster get consecutive offsets.
    async fn append(
        &self,
        stream: &str,
        data: Bytes,
        kind: FrameKind,
    ) -> Result<Position, HistoryError>;

    /// The entries of `stream` after `after`, at most `limit` of them (more
    /// than `limit` is [`Since::Gone`]).
    async fn since(
        &self,
        stream: &str,
        after: Position,
        limit: usize,
    ) -> Result<Since, HistoryError>;

    /// The latest `n` entries of `stream`, oldest first, and its latest
    /// position (`None` for a stream with no entry).
    async fn latest(
        &self,
        stream: &str,
        n: usize,
    ) -> Result<(Vec<Entry>, Option<Position>), HistoryError>;
}

/// How much history each stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries per stream: older ones are trimmed.
    pub size: usize,
    /// How long an entry is kept; a stream with no entry for this long is
    /// forgotten with its epoch.
    pub ttl: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            size: 100,
            ttl: Duration::from_secs(300),
        }
    }
}

/// A fresh epoch: random and never 0, so it cannot match a made-up position.
pub fn new_epoch() -> u64 {
    rand::random::<u64>() | 1
}

struct Stream {
    epoch: u64,
    /// The latest offset handed out.
    top: u64,
    entries: VecDeque<(Instant, Entry)>,
    /// When the last entry was appended: a stream idle for the ttl is forgotten.
    touched: Instant,
}

/// History in this process's memory, bounded per stream by size and age.
/// Streams whose every entry expired are swept on later appends, so memory
/// follows the streams written within the ttl.
pub struct MemoryHistory {
    retention: Retention,
    streams: Mutex<MemoryStreams>,
}

#[derive(Default)]
struct MemoryStreams {
    map: HashMap<String, Stream>,
    /// Appends since the last sweep of forgotten streams.
    since_sweep: usize,
}

impl fmt::Debug for MemoryHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHistory")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl MemoryHistory {
    /// An empty store.
    pub fn new(retention: Retention) -> Self {
        MemoryHistory {
            retention,
            streams: Mutex::new(MemoryStreams::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryStreams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops expired entries of one stream, and says whether it is forgotten.
    fn expire(&self, s: &mut Stream, now: Instant) -> bool {
        let ttl = self.retention.ttl;
        while s
            .entries
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= ttl)
        {
            s.entries.pop_front();
        }
        now.duration_since(s.touched) >= ttl
    }

    /// Number of streams held now.
    pub fn streams(&self) -> usize {
        self.lock().map.len()
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(
        &self,
        stream: &str,
        data: Bytes,
        kind: FrameKind,
    ) -> Result<Position, HistoryError> {
        let now = Instant::now();
        let mut g = self.lock();
        let streams = &mut *g;
        streams.since_sweep += 1;
        if streams.since_sweep >= 1024.max(streams.map.len()) {
            streams.since_sweep = 0;
            let ttl = self.retention.ttl;
            streams
                .map
                .retain(|_, s| now.duration_since(s.touched) < ttl);
        }
        let s = match streams.map.get_mut(stream) {
            Some(s) => {
                if self.expire(s, now) {
                    *s = Stream::fresh(now);
                }
                s
            }
            None => streams
                .map
                .entry(stream.to_owned())
                .or_insert_with(|| Stream::fresh(now)),
        };
        s.top += 1;
        s.touched = now;
        let pos = Position {
            offset: s.top,
            epoch: s.epoch,
        };
        s.entries.push_back((now, Entry { pos, data, kind }));
        while s.entries.len() > self.retention.size {
            s.entries.pop_front();
        }
        Ok(pos)
    }

    async fn since(
        &self,
        stream: &str,
        after: Position,
        limit: usize,
    ) -> Result<Since, HistoryError> {
        let now = Instant::now();
        let mut g = self.lock();
        let Some(s) = g.map.get_mut(stream) else {
            return Ok(Since::Gone { top: None });
        };
        if self.expire(s, now) {
            g.map.remove(stream);
            return Ok(Since::Gone { top: None });
        }
        let top = Position {
            offset: s.top,
            epoch: s.epoch,
        };
        Ok(read_since(
            top,
            s.entries.iter().map(|(_, e)| e),
            after,
            limit,
        ))
    }

    async fn latest(
        &self,
        stream: &str,
        n: usize,
    ) -> Result<(Vec<Entry>, Option<Position>), HistoryError> {
        let now = Instant::now();
        let mut g = self.lock();
        let Some(s) = g.map.get_mut(stream) else {
            return Ok((Vec::new(), None));
        };
        if self.expire(s, now) {
            g.map.remove(stream);
            return Ok((Vec::new(), None));
        }
        let skip = s.entries.len().saturating_sub(n);
        let entries = s
            .entries
            .iter()
            .skip(skip)
            .map(|(_, e)| e.clone())
            .collect();
        Ok((
            entries,
            Some(Position {
                offset: s.top,
                epoch: s.epoch,
            }),
        ))
    }
}

impl Stream {
    fn fresh(now: Instant) -> Self {
        Stream {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            touched: now,
        }
    }
}

/// The rule every store applies to a read from `after`, given the stream's
/// latest position and its retained entries (oldest first): the entries
/// after `after` when the history still holds every one of them, else
/// [`Since::Gone`].
pub fn read_since<'a>(
    top: Position,
    retained: impl Iterator<Item = &'a Entry>,
    after: Position,
    limit: usize,
) -> Since {
    let gone = Since::Gone { top: Some(top) };
    if after.epoch != top.epoch || after.offset > top.offset {
        return gone;
    }
    let missed = top.offset - after.offset;
    if missed == 0 {
        return Since::Entries {
            entries: Vec::new(),
            top,
        };
    }
    if missed > limit as u64 {
        return gone;
    }
    let entries: Vec<Entry> = retained
        .filter(|e| e.pos.offset > after.offset)
        .cloned()
        .collect();
    // Every offset from after+1 to top must still be there.
    if entries.len() as u64 != missed
        || entries.first().map(|e| e.pos.offset) != Some(after.offset + 1)
    {
        return gone;
    }
    Since::Entries { entries, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn datas(since: &Since) -> Vec<String> {
        match since {
            Since::Entries { entries, .. } => entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.data).into_owned())
                .collect(),
            Since::Gone { .. } => vec!["<gone>".into()],
        }
    }

    #[test]
    fn positions_read_back_what_they_print() {
        let p = Position {
            offset: 42,
            epoch: 0xdead_beef,
        };
        assert_eq!(p.to_string(), "42-deadbeef");
        assert_eq!("42-deadbeef".parse::<Position>(), Ok(p));
        for bad in ["", "42", "-1", "42-", "x-1", "1-xyz", "1-11111111111111111"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_names() {
        assert_eq!(StreamOf::parse("user:alice"), Some(StreamOf::User("alice")));
        assert_eq!(StreamOf::parse("group:a:b"), Some(StreamOf::Group("a:b")));
        assert_eq!(StreamOf::parse("user:"), None);
        assert_eq!(StreamOf::parse("room:x"), None);
    }

    #[tokio::test]
    async fn a_read_returns_what_came_after_the_position_in_order() {
        let h = MemoryHistory::new(Retention::default());
        let mut pos = Vec::new();
        for m in ["m1", "m2", "m3", "m4", "m5"] {
            pos.push(h.append("user:a", text(m), FrameKind::Text).await.unwrap());
        }
        assert_eq!(
            pos.iter().map(|p| p.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert!(pos.iter().all(|p| p.epoch == pos[0].epoch));
        let s = h.since("user:a", pos[1], 100).await.unwrap();
        assert_eq!(datas(&s), ["m3", "m4", "m5"]);
        let s = h.since("user:a", pos[4], 100).await.unwrap();
        assert_eq!(datas(&s), Vec::<String>::new(), "up to date");
        // Another stream has its own offsets.
        let other = h
            .append("group:g", text("x"), FrameKind::Text)
            .await
            .unwrap();
        assert_eq!(other.offset, 1);
        let (latest, top) = h.latest("user:a", 2).await.unwrap();
        assert_eq!(top, Some(pos[4]));
        assert_eq!(
            latest.iter().map(|e| e.pos.offset).collect::<Vec<_>>(),
            [4, 5]
        );
    }

    #[tokio::test]
    async fn a_position_outside_the_window_or_of_another_epoch_is_gone() {
        let h = MemoryHistory::new(Retention {
            size: 3,
            ttl: Duration::from_secs(60),
        });
        let mut pos = Vec::new();
        for i in 0..5 {
            pos.push(
                h.append("user:a", text(&i.to_string()), FrameKind::Text)
                    .await
                    .unwrap(),
            );
        }
        // Entries 1..=2 were trimmed: a client at 1 missed 2.
        assert!(matches!(
            h.since("user:a", pos[0], 100).await.unwrap(),
            Since::Gone { .. }
        ));
        // At 2 it missed 3, 4, 5, all still there.
        assert_eq!(
            datas(&h.since("user:a", pos[1], 100).await.unwrap()),
            ["2", "3", "4"]
        );
        // More than the limit missed.
        assert!(matches!(
            h.since("user:a", pos[1], 2).await.unwrap(),
            Since::Gone { .. }
        ));
        let other_epoch = Position {
            epoch: pos[1].epoch ^ 2,
            ..pos[1]
        };
        assert!(matches!(
            h.since("user:a", other_epoch, 100).await.unwrap(),
            Since::Gone { .. }
        ));
        let future = Position {
            offset: 99,
            ..pos[1]
        };
        assert!(matches!(
            h.since("user:a", future, 100).await.unwrap(),
            Since::Gone { .. }
        ));
        assert!(matches!(
            h.since("user:nobody", pos[1], 100).await.unwrap(),
            Since::Gone { top: None }
        ));
    }

    #[tokio::test]
    async fn an_expired_stream_comes_back_with_a_new_epoch() {
        let h = MemoryHistory::new(Retention {
            size: 10,
            ttl: Duration::from_secs(5),
        });
        let p1 = h
            .append("user:a", text("a"), FrameKind::Text)
            .await
            .unwrap();
        // Age the entry by hand rather than wait out the ttl.
        {
            let mut g = h.lock();
            let s = g.map.get_mut("user:a").unwrap();
            let old = Instant::now() - Duration::from_secs(6);
            s.touched = old;
            s.entries[0].0 = old;
        }
        assert!(matches!(
            h.since("user:a", Position { offset: 0, ..p1 }, 10)
                .await
                .unwrap(),
            Since::Gone { top: None }
        ));
        let p2 = h
            .append("user:a", text("b"), FrameKind::Text)
            .await
            .unwrap();
        assert_eq!(p2.offset, 1);
        assert_ne!(p2.epoch, p1.epoch);
    }
}
