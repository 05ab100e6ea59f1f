//! History in Redis, for every mode whose nodes do not share a process.
//!
//! Each stream (`user:U`, `group:G`) is two keys (see `keys`): a Redis Stream
//! of its entries, whose ids are `<offset>-0`, and a hash of its epoch and
//! latest offset. Every operation is one Lua script, so that
//!
//! - appends from any node of the cluster get consecutive offsets: the
//!   offset is handed out, and the entry written, in one atomic step;
//! - a read sees the epoch, the latest offset and the entries of one moment,
//!   never entries of a newer epoch under an older one's position.
//!
//! The store has [`MemoryHistory`](switchboard_core::MemoryHistory)'s
//! semantics: entries are trimmed to `retention.size`, an entry older than
//! `retention.ttl` no longer counts (reads drop it, by the Redis clock), and
//! both keys expire `retention.ttl` after the stream's last append, which
//! forgets the stream with its epoch. A stream whose hash is gone (expired,
//! or a Redis restarted without persistence) starts again at offset 1 under
//! a fresh epoch, so no client mistakes the new entries for the old ones.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, Script, Value};
use switchboard_core::FrameKind;
use switchboard_core::history::{
    Entry, History, HistoryError, Position, Retention, Since, StreamOf, new_epoch, read_since,
};

use crate::RedisConfig;
use crate::keys::Keys;

/// A connection attempt slower than this counts as failed, as on the
/// backplane's own connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection attempts per loss of the connection. Few, so that callers
/// get [`HistoryError::Unavailable`] quickly while Redis is down (the next
/// command starts another round); the first connection is attempted as many
/// times, so [`RedisHistory::connect`] fails within seconds too.
const RECONNECT_RETRIES: usize = 2;
/// The longest wait between two reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Redis rejects an expiry that overflows once added to its clock: a longer
/// ttl (about 35,000 years) is as good as forever.
const MAX_TTL_MS: u64 = 1 << 50;

/// Stream entry fields: the data, whether it is binary, when it was appended.
const DATA: &str = "d";
const BINARY: &str = "b";
const APPENDED: &str = "t";

/// Milliseconds on the Redis server's clock, in `now`: entry ages must not
/// depend on which node appended or reads.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// KEYS: entries, meta. ARGV: an epoch for a stream that has none (hex),
/// data, binary (0/1), size, ttl_ms. Returns `{offset, epoch}`.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local entries, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- The stream's history is lost or never was: a fresh epoch, and no entry
  -- of an older one (its ids would also be ahead of the new offsets).
  epoch = ARGV[1]
  redis.call('DEL', entries)
  redis.call('HSET', meta, 'epoch', epoch)
end
local top = redis.call('HINCRBY', meta, 'top', 1)
{NOW}
redis.call('XADD', entries, 'MAXLEN', ARGV[4], string.format('%d-0', top),
  '{DATA}', ARGV[2], '{BINARY}', ARGV[3], '{APPENDED}', string.format('%d', now))
redis.call('PEXPIRE', entries, ARGV[5])
redis.call('PEXPIRE', meta, ARGV[5])
return {{top, epoch}}
"#
    ))
});

/// KEYS: entries, meta. ARGV: the position's epoch (hex), its offset, the
/// limit, the first entry id after the position. Returns `{}` for a stream
/// with no history, else `{epoch, top, now_ms, entries}`; entries only when
/// the read can succeed, so a resync costs no entry data.
static SINCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then return {{}} end
local top = redis.call('HGET', KEYS[2], 'top') or '0'
{NOW}
local found = {{}}
local after, last = tonumber(ARGV[2]), tonumber(top)
if epoch == ARGV[1] and after < last and last - after <= tonumber(ARGV[3]) then
  found = redis.call('XRANGE', KEYS[1], ARGV[4], '+', 'COUNT', ARGV[3])
end
return {{epoch, top, now, found}}
"#
    ))
});

/// KEYS: entries, meta. ARGV: how many entries. Returns `{}` for a stream
/// with no history, else `{epoch, top, now_ms, entries newest first}`.
static LATEST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then return {{}} end
local top = redis.call('HGET', KEYS[2], 'top') or '0'
{NOW}
local found = {{}}
if ARGV[1] ~= '0' then
  found = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
end
return {{epoch, top, now, found}}
"#
    ))
});

/// History kept in Redis, shared by every node of a cluster: see the module
/// docs. Cloning is cheap (the connection is shared, not reopened), and the
/// connection reconnects by itself, so one value can serve a whole node.
#[derive(Clone)]
pub struct RedisHistory {
    /// redis-rs's multiplexed connection that reconnects on its own: the
    /// store has no task to supervise a connection, unlike the backplane.
    conn: ConnectionManager,
    keys: Keys,
    retention: Retention,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory")
            .field("prefix", &self.keys.prefix)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl RedisHistory {
    /// Connects to the Redis at `url` (`redis://` or `rediss://`, as for the
    /// backplane: switchboard's own options in its query, such as `mode` or
    /// `prefix`, are checked and left out; the key prefix is `prefix`, not the
    /// URL's). Fails if Redis cannot be reached now; afterwards the
    /// connection is re-established by itself, and commands fail with
    /// [`HistoryError::Unavailable`] meanwhile.
    pub async fn connect(
        url: &str,
        prefix: &str,
        retention: Retention,
    ) -> Result<Self, HistoryError> {
        let secret = Secret::of(url);
        let server = RedisConfig::from_url(url)
            .map_err(|e| HistoryError::Unavailable(secret.redact(&e.to_string())))?
            .url;
        let client = redis::Client::open(server.as_str())
            .map_err(|e| HistoryError::Unavailable(secret.redact(&e.to_string())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(crate::link::RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| HistoryError::Unavailable(secret.redact(&e.to_string())))?;
        Ok(Self::from_manager(conn, prefix, retention))
    }

    /// A store on a connection the caller made (its own timeouts, TLS or
    /// credentials), with keys under `prefix`.
    pub fn from_manager(conn: ConnectionManager, prefix: &str, retention: Retention) -> Self {
        Self {
            conn,
            keys: Keys::new(prefix),
            retention,
        }
    }

    /// The retention applied to every stream.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Runs one script on the stream's two keys.
    async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        stream: &str,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<T, HistoryError> {
        if StreamOf::parse(stream).is_none() {
            return Err(HistoryError::BadStream(stream.to_owned()));
        }
        let mut call = script.prepare_invoke();
        call.key(self.keys.history(stream))
            .key(self.keys.history_meta(stream));
        args(&mut call);
        // A clone shares the connection: commands need it `&mut`.
        let mut conn = self.conn.clone();
        call.invoke_async(&mut conn).await.map_err(unavailable)
    }

    /// [`RedisHistory::run`] for a read: tried once more when the first try
    /// finds the connection broken (the manager reconnects only when a
    /// command fails, so the first one after Redis came back does). Reads
    /// only: an append whose connection broke may have been applied.
    async fn read<T: FromRedisValue>(
        &self,
        script: &Script,
        stream: &str,
        args: impl Fn(&mut redis::ScriptInvocation<'_>),
    ) -> Result<T, HistoryError> {
        match self.run(script, stream, &args).await {
            Err(HistoryError::Unavailable(_)) => self.run(script, stream, &args).await,
            other => other,
        }
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn append(
        &self,
        stream: &str,
        data: Bytes,
        kind: FrameKind,
    ) -> Result<Position, HistoryError> {
        let Retention { size, ttl } = self.retention;
        let (offset, epoch): (u64, String) = self
            .run(&APPEND, stream, |call| {
                // Generated here, used only if the stream has no epoch:
                // Lua cannot hold a u64 exactly, so it keeps it as text.
                call.arg(format!("{:x}", new_epoch()))
                    .arg(&data[..])
                    .arg(if kind == FrameKind::Binary { "1" } else { "0" })
                    .arg(redis_count(size))
                    .arg(ttl_ms(ttl));
            })
            .await?;
        Ok(Position {
            offset,
            epoch: parse_epoch(&epoch)?,
        })
    }

    async fn since(
        &self,
        stream: &str,
        after: Position,
        limit: usize,
    ) -> Result<Since, HistoryError> {
        let reply: Vec<Value> = self
            .read(&SINCE, stream, |call| {
                call.arg(format!("{:x}", after.epoch))
                    .arg(after.offset)
                    .arg(redis_count(limit))
                    // Entry ids are `<offset>-0`: this is the first id after
                    // the position's, with no arithmetic in Lua.
                    .arg(format!("{}-1", after.offset));
            })
            .await?;
        let Some(snap) = Snapshot::parse(reply, self.retention.ttl)? else {
            return Ok(Since::Gone { top: None });
        };
        // The script fetched only what the read may need; the rules are the
        // ones every store applies.
        Ok(read_since(snap.top, snap.entries.iter(), after, limit))
    }

    async fn latest(
        &self,
        stream: &str,
        n: usize,
    ) -> Result<(Vec<Entry>, Option<Position>), HistoryError> {
        let reply: Vec<Value> = self
            .read(&LATEST, stream, |call| {
                call.arg(redis_count(n));
            })
            .await?;
        let Some(mut snap) = Snapshot::parse(reply, self.retention.ttl)? else {
            return Ok((Vec::new(), None));
        };
        // XREVRANGE gives the newest first.
        snap.entries.reverse();
        Ok((snap.entries, Some(snap.top)))
    }
}

/// What a read script saw of a stream: its latest position and the entries
/// it returned that have not expired.
struct Snapshot {
    top: Position,
    entries: Vec<Entry>,
}

/// A stream entry as XRANGE returns it: id and field-value pairs.
type RawEntry = (String, Vec<(String, Vec<u8>)>);

impl Snapshot {
    /// Reads `{}` (no history: `None`) or `{epoch, top, now_ms, entries}`.
    fn parse(reply: Vec<Value>, ttl: Duration) -> Result<Option<Self>, HistoryError> {
        if reply.is_empty() {
            return Ok(None);
        }
        let (epoch, top, now, raw): (String, u64, u64, Vec<RawEntry>) =
            FromRedisValue::from_redis_value(Value::Array(reply))
                .map_err(|e| malformed(&e.to_string()))?;
        let epoch = parse_epoch(&epoch)?;
        // Entries expire one by one, as in memory; the keys only expire
        // with the newest entry.
        let expired = now.saturating_sub(ttl_ms(ttl));
        let mut entries = Vec::with_capacity(raw.len());
        for (id, fields) in raw {
            let (entry, appended) = parse_entry(&id, fields, epoch)?;
            if appended > expired {
                entries.push(entry);
            }
        }
        Ok(Some(Snapshot {
            top: Position { offset: top, epoch },
            entries,
        }))
    }
}

/// An entry of epoch `epoch` and when it was appended (ms, Redis clock).
fn parse_entry(
    id: &str,
    fields: Vec<(String, Vec<u8>)>,
    epoch: u64,
) -> Result<(Entry, u64), HistoryError> {
    let offset = id
        .split_once('-')
        .and_then(|(offset, _)| offset.parse().ok())
        .ok_or_else(|| malformed(&format!("entry id {id:?}")))?;
    let (mut data, mut binary, mut appended) = (None, None, None);
    for (field, value) in fields {
        match field.as_str() {
            DATA => data = Some(value),
            BINARY => binary = Some(value),
            APPENDED => {
                appended = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|t| t.parse().ok())
            }
            // Fields a later version may add are not this one's concern.
            _ => {}
        }
    }
    let (Some(data), Some(binary), Some(appended)) = (data, binary, appended) else {
        return Err(malformed(&format!("entry {id} lacks a field")));
    };
    let kind = if binary == b"1" {
        FrameKind::Binary
    } else {
        FrameKind::Text
    };
    let entry = Entry {
        pos: Position { offset, epoch },
        data: Bytes::from(data),
        kind,
    };
    Ok((entry, appended))
}

fn parse_epoch(epoch: &str) -> Result<u64, HistoryError> {
    u64::from_str_radix(epoch, 16).map_err(|_| malformed(&format!("epoch {epoch:?}")))
}

/// Something under the history's keys that this store did not write.
fn malformed(what: &str) -> HistoryError {
    HistoryError::Unavailable(format!("malformed history in redis: {what}"))
}

/// Command errors come from the server or the socket and carry no URL, so
/// they need no redaction (unlike those of [`RedisHistory::connect`]).
fn unavailable(e: RedisError) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

/// A count for a Redis argument: Redis parses counts as signed 64-bit.
fn redis_count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX).min(i64::MAX as u64)
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_TTL_MS)
}

/// The password of a URL, so that no error quotes it: redis-rs's errors do
/// not today, but a connection error is the one place one could.
struct Secret(Vec<String>);

impl Secret {
    /// The password in `url`'s userinfo, as written and percent-decoded.
    fn of(url: &str) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let password = authority
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password)
            .filter(|p| !p.is_empty());
        let mut forms = Vec::new();
        if let Some(p) = password {
            forms.push(p.to_owned());
            let decoded = percent_decode(p);
            if decoded != p && !decoded.is_empty() {
                forms.push(decoded);
            }
        }
        Self(forms)
    }

    fn redact(&self, message: &str) -> String {
        self.0
            .iter()
            .fold(message.to_owned(), |m, secret| m.replace(secret, "***"))
    }
}

/// `%XX` escapes decoded, as redis-rs reads the password (bad escapes kept).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<RedisHistory>();
    }

    #[test]
    fn passwords_are_redacted_as_written_and_decoded() {
        let s = Secret::of("rediss://user:p%40ss@host:6380/0?prefix=x#insecure");
        assert_eq!(
            s.redact("auth p%40ss failed, p@ss wrong"),
            "auth *** failed, *** wrong"
        );
        let s = Secret::of("redis://:hunter2@h");
        assert_eq!(s.redact("x hunter2 y"), "x *** y");
        // No password, or a `@` that is not in the authority: nothing to hide.
        assert_eq!(Secret::of("redis://h:1/?a=b@c").0, Vec::<String>::new());
        assert_eq!(Secret::of("redis://user@h").0, Vec::<String>::new());
    }

    #[test]
    fn counts_and_ttls_fit_what_redis_accepts() {
        assert_eq!(redis_count(usize::MAX), i64::MAX as u64);
        assert_eq!(redis_count(7), 7);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
        assert_eq!(ttl_ms(Duration::from_secs(3)), 3000);
    }

    #[test]
    fn entries_read_back_with_their_kind_and_expired_ones_are_dropped() {
        let fields = |b: &str, t: &str| {
            vec![
                (DATA.to_owned(), b"\x00\xff".to_vec()),
                (BINARY.to_owned(), b.as_bytes().to_vec()),
                (APPENDED.to_owned(), t.as_bytes().to_vec()),
            ]
        };
        let (e, t) = parse_entry("7-0", fields("1", "1000"), 0xab).unwrap();
        assert_eq!(
            e.pos,
            Position {
                offset: 7,
                epoch: 0xab
            }
        );
        assert_eq!(
            (e.kind, &e.data[..], t),
            (FrameKind::Binary, &b"\x00\xff"[..], 1000)
        );
        assert!(parse_entry("x-0", fields("0", "1"), 1).is_err());
        assert!(parse_entry("1-0", Vec::new(), 1).is_err());

        let entry = |id: &str, t: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(
                    fields("0", t)
                        .into_iter()
                        .flat_map(|(f, v)| {
                            [Value::BulkString(f.into_bytes()), Value::BulkString(v)]
                        })
                        .collect(),
                ),
            ])
        };
        let reply = vec![
            Value::BulkString(b"ab".to_vec()),
            Value::BulkString(b"9".to_vec()),
            Value::Int(10_000),
            Value::Array(vec![entry("8-0", "4000"), entry("9-0", "5001")]),
        ];
        let snap = Snapshot::parse(reply, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            snap.top,
            Position {
                offset: 9,
                epoch: 0xab
            }
        );
        assert_eq!(
            snap.entries
                .iter()
                .map(|e| e.pos.offset)
                .collect::<Vec<_>>(),
            [9],
            "an entry as old as the ttl has expired"
        );
        assert!(
            Snapshot::parse(Vec::new(), Duration::from_secs(5))
                .unwrap()
                .is_none()
        );
    }
}
