//! Streams with history in the server: where recorded pushes are kept
//! (`--history`, `--history-size`, `--history-ttl`), which pushes are
//! recorded without asking (`--history-record`), and the one push path the
//! reference application and the API share.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::core::history::{group_stream, user_stream};
use switchboard::{Frame, History, Hub, MemoryHistory, PushError, Retention, Target};

use crate::config::{ClusterUrl, ConfigError};

/// Where recorded pushes are kept.
#[derive(Clone)]
#[non_exhaustive]
pub enum Store {
    /// Nowhere: recorded pushes fail, and recovery answers `recovered:false`.
    Off,
    /// In this process (standalone and `memory:N` nodes).
    Memory,
    /// In Redis Streams, under a key prefix.
    Redis {
        /// The Redis URL.
        url: String,
        /// The key prefix.
        prefix: String,
    },
    /// A store already opened (the nodes of `memory:N` share one).
    Shared(Arc<dyn History>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Off => f.write_str("Off"),
            Store::Memory => f.write_str("Memory"),
            // The URL may carry a password.
            Store::Redis { prefix, .. } => write!(f, "Redis {{ prefix: {prefix:?} }}"),
            Store::Shared(_) => f.write_str("Shared"),
        }
    }
}

/// The node's history settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HistoryConfig {
    /// Where.
    pub store: Store,
    /// How much each stream keeps.
    pub retention: Retention,
    /// Streams recorded without asking (patterns).
    pub record: Vec<String>,
}

impl HistoryConfig {
    /// No history.
    pub fn off() -> Self {
        HistoryConfig {
            store: Store::Off,
            retention: Retention::default(),
            record: Vec::new(),
        }
    }

    /// Reads `serve`'s options: `history` is `memory`, `off` or a Redis URL;
    /// unset, the cluster mode's own (memory for local and `memory:N`, the
    /// cluster's Redis for Redis modes, none for RabbitMQ).
    pub fn from_options(
        history: Option<&str>,
        size: usize,
        ttl: u64,
        record: Option<&str>,
        cluster: &ClusterUrl,
    ) -> Result<Self, ConfigError> {
        let default = match cluster {
            ClusterUrl::Local | ClusterUrl::Memory(_) => Store::Memory,
            // The history store speaks to one Redis, not to a cluster.
            ClusterUrl::Redis(c) if !c.cluster.is_empty() => Store::Off,
            ClusterUrl::Redis(c) => Store::Redis {
                url: c.url.clone(),
                prefix: c.prefix.clone(),
            },
            ClusterUrl::Amqp(_) | ClusterUrl::Nats(_) => Store::Off,
        };
        let in_process = matches!(cluster, ClusterUrl::Local | ClusterUrl::Memory(_));
        Self::parse(history, size, ttl, record, default, in_process)
    }

    /// Reads the options with `default` for an unset `history`; `memory`
    /// only where every node is in this process (`in_process`).
    pub fn parse(
        history: Option<&str>,
        size: usize,
        ttl: u64,
        record: Option<&str>,
        default: Store,
        in_process: bool,
    ) -> Result<Self, ConfigError> {
        let bad = |m: String| ConfigError::History(m);
        let store = match history.map(str::trim) {
            None | Some("") => default,
            Some("off") => Store::Off,
            Some("memory") if in_process => Store::Memory,
            Some("memory") => {
                return Err(bad(
                    "--history memory keeps each node's own history, but a stream's positions must be the whole cluster's: name a Redis (--history redis://HOST:PORT)".into(),
                ));
            }
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                let c = switchboard_redis::RedisConfig::from_url(url)?;
                Store::Redis {
                    url: url.to_owned(),
                    prefix: c.prefix,
                }
            }
            Some(other) => {
                return Err(bad(format!(
                    "--history {other:?}: use memory, off, or redis://HOST:PORT[?prefix=P]"
                )));
            }
        };
        if size == 0 || ttl == 0 {
            return Err(bad(
                "--history-size and --history-ttl must be at least 1 (use --history off for none)"
                    .into(),
            ));
        }
        let record: Vec<String> = record
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(p) = record
            .iter()
            .find(|p| !(p.starts_with("user:") || p.starts_with("group:")))
        {
            return Err(bad(format!(
                "--history-record {p:?}: a pattern names user:... or group:... streams"
            )));
        }
        if !record.is_empty() && matches!(store, Store::Off) {
            return Err(bad(
                "--history-record needs a history: set --history redis://HOST:PORT".into(),
            ));
        }
        Ok(HistoryConfig {
            store,
            retention: Retention {
                size,
                ttl: Duration::from_secs(ttl),
            },
            record,
        })
    }

    /// Opens the store, if any.
    pub async fn open(&self) -> anyhow::Result<Option<Arc<dyn History>>> {
        Ok(match &self.store {
            Store::Off => None,
            Store::Memory => Some(Arc::new(MemoryHistory::new(self.retention))),
            Store::Shared(h) => Some(h.clone()),
            Store::Redis { url, prefix } => Some(Arc::new(
                switchboard_redis::RedisHistory::connect(url, prefix, self.retention)
                    .await
                    .map_err(|e| anyhow::anyhow!("opening the history: {e}"))?,
            )),
        })
    }
}

/// What [`push`] did: the delivery, and for a recorded push each stream's
/// position.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Queued here, dropped here, handed to the cluster.
    pub report: switchboard::PushReport,
    /// The streams appended to, with their positions (empty when nothing was
    /// recorded).
    pub positions: Vec<(String, switchboard::Position)>,
}

impl Pushed {
    /// The API's answer: the report's counts, and `positions` when recorded.
    pub fn to_json(&self) -> Value {
        let r = &self.report;
        let mut v = json!({
            "local": r.local,
            "local_dropped": r.local_dropped,
            "remote_sent": r.remote.sent,
            "remote_dropped": r.remote.dropped,
        });
        if !self.positions.is_empty() {
            v["positions"] = self
                .positions
                .iter()
                .map(|(s, pos)| (s.clone(), Value::String(pos.to_string())))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        v
    }
}

/// Pushes `frame` to `target`, recording the streams that ask for it: every
/// user and group of `target` when `record` is set (an error for
/// connections or everyone, which have no stream), else those that
/// `--history-record` names. The rest of the target gets a plain push.
pub async fn push(
    hub: &Hub,
    target: &Target,
    frame: Frame,
    record: bool,
) -> Result<Pushed, PushError> {
    // The common case costs what a plain push does: no stream name is built
    // unless something may be recorded.
    if !record && !hub.records_any() {
        return Ok(Pushed {
            report: hub.push(target, frame)?,
            positions: Vec::new(),
        });
    }
    let recorded = |s: &str| record || hub.records(s);
    let users: Vec<_> = target
        .included_users()
        .iter()
        .filter(|u| recorded(&user_stream(u.as_str())))
        .cloned()
        .collect();
    let groups: Vec<_> = target
        .included_groups()
        .iter()
        .filter(|g| recorded(&group_stream(g.as_str())))
        .cloned()
        .collect();
    if users.is_empty() && groups.is_empty() {
        if record {
            return Err(PushError::NotRecordable);
        }
        return Ok(Pushed {
            report: hub.push(target, frame)?,
            positions: Vec::new(),
        });
    }
    if record && (target.is_all() || !target.conns().is_empty()) {
        return Err(PushError::NotRecordable);
    }
    let except = |t: Target| t.excluding_as(target);
    let rec_target = except(Target::users(users.clone()).and_groups(groups.clone()));
    let rest_users: Vec<_> = target
        .included_users()
        .iter()
        .filter(|u| !users.contains(u))
        .cloned()
        .collect();
    let rest_groups: Vec<_> = target
        .included_groups()
        .iter()
        .filter(|g| !groups.contains(g))
        .cloned()
        .collect();
    let mut rest = Target::users(rest_users).and_groups(rest_groups);
    if target.is_all() {
        rest = Target::all();
    }
    rest = except(rest.and_conns(target.conns().iter().cloned()));
    let r = hub.push_recorded(&rec_target, frame.clone()).await?;
    let mut report = r.report;
    if !rest.is_empty() {
        let p = hub.push(&rest, frame)?;
        report.local += p.local;
        report.local_dropped += p.local_dropped;
        report.remote.sent += p.remote.sent;
        report.remote.dropped += p.remote.dropped;
    }
    Ok(Pushed {
        report,
        positions: r.positions,
    })
}
