//! Options of the Redis backplanes, from a `redis://` URL and overrides.

use std::time::Duration;

/// How envelopes travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Redis pub/sub: a channel per node and a broadcast channel. At-most-once:
    /// what is published while a node is disconnected never reaches it.
    #[default]
    PubSub,
    /// A Redis Stream per node, read through a consumer group and acknowledged
    /// after local delivery. At-least-once (duplicates dropped by envelope id);
    /// a node restarted under the same id gets what arrived while it was down.
    Queue,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::PubSub => "pubsub",
            Mode::Queue => "queue",
        })
    }
}

/// A `redis://` URL or option that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Unknown option in the URL query.
    #[error(
        "unknown redis option {0:?}: use mode, prefix, ttl, queue_cap, queue_age, concurrency or backlog_grace"
    )]
    UnknownOption(String),
    /// An option's value is invalid.
    #[error("invalid value {value:?} for redis option {name}")]
    BadValue {
        /// The option.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The URL itself is invalid.
    #[error("invalid redis URL")]
    Url(#[source] redis::RedisError),
}

/// Options of a Redis backplane. `Debug` masks the password.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server URL without switchboard's options (`redis://host:port/db`);
    /// for a Redis Cluster, its first node's.
    pub url: String,
    /// A Redis Cluster's nodes to start from (`redis://host:port` each), from
    /// `redis-cluster://HOST:PORT,HOST:PORT`; empty for a single Redis.
    pub cluster: Vec<String>,
    /// Pub/sub or queue.
    pub mode: Mode,
    /// Prefix of every key and channel, so several deployments share one Redis.
    pub prefix: String,
    /// A node that has not renewed its liveness for this long is dead: its
    /// connections disappear from every answer. Renewed every third of it.
    pub node_ttl: Duration,
    /// Queue mode: approximate maximum length of a node's stream.
    pub queue_cap: usize,
    /// Queue mode: entries older than this are dropped (counted) rather than
    /// delivered, and the stream of a node dead for longer is deleted.
    pub queue_age: Duration,
    /// Queue mode: stream entries read and dispatched per round trip.
    pub concurrency: usize,
    /// Queue mode: on start, how long a node waits before delivering a backlog
    /// left from its previous life, so that reconnecting clients receive it.
    pub backlog_grace: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.display_url())
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| mask_password(u))
                    .collect::<Vec<_>>(),
            )
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("node_ttl", &self.node_ttl)
            .field("queue_cap", &self.queue_cap)
            .field("queue_age", &self.queue_age)
            .finish_non_exhaustive()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: Vec::new(),
            mode: Mode::PubSub,
            prefix: "sb".into(),
            node_ttl: Duration::from_secs(10),
            queue_cap: 100_000,
            queue_age: Duration::from_secs(300),
            concurrency: 256,
            backlog_grace: Duration::from_secs(5),
        }
    }
}

fn secs(name: &'static str, v: &str) -> Result<Duration, ConfigError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| ConfigError::BadValue {
            name,
            value: v.to_owned(),
        })
}

fn count(name: &'static str, v: &str) -> Result<usize, ConfigError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ConfigError::BadValue {
            name,
            value: v.to_owned(),
        })
}

impl RedisConfig {
    /// Parses `redis[s]://[user:pass@]host[:port][/db][?mode=pubsub|queue&prefix=P&ttl=S&queue_cap=N&queue_age=S&concurrency=N&backlog_grace=S]`.
    /// `rediss://` is TLS, the server's certificate checked against the
    /// system's trust store (which SSL_CERT_FILE or SSL_CERT_DIR replace).
    ///
    /// `redis-cluster://HOST:PORT[,HOST:PORT...][?...]` names a Redis Cluster
    /// by some of its nodes (the client learns the rest), with the same options.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        if let Some(rest) = url.strip_prefix("redis-cluster://") {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            // `USER:PASS@` before the list is every node's.
            let (auth, hosts) = match hosts.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), hosts),
            };
            let nodes: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .map(|h| format!("redis://{auth}{}", h.trim()))
                .collect();
            let first = nodes.first().cloned().unwrap_or_default();
            let mut cfg = Self::from_url(&format!("{first}?{query}"))?;
            for n in &nodes {
                redis::Client::open(n.as_str()).map_err(ConfigError::Url)?;
            }
            if cfg.prefix.contains(['{', '}']) {
                // The keys' hash tags are made from the prefix.
                return Err(ConfigError::BadValue {
                    name: "prefix",
                    value: cfg.prefix,
                });
            }
            cfg.cluster = nodes;
            return Ok(cfg);
        }
        // The client's own `#fragment` (`#insecure`) stays with the server URL.
        let (url, fragment) = url.split_once('#').unwrap_or((url, ""));
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut cfg = RedisConfig {
            url: base.to_owned(),
            ..RedisConfig::default()
        };
        if !fragment.is_empty() {
            cfg.url.push('#');
            cfg.url.push_str(fragment);
        }
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            cfg.set(&k, &v)?;
        }
        redis::Client::open(cfg.url.as_str()).map_err(ConfigError::Url)?;
        Ok(cfg)
    }

    /// The server URL with any password masked, for logs and errors.
    pub fn display_url(&self) -> String {
        mask_password(&self.url)
    }

    /// Sets one option by name, as in the URL query.
    pub fn set(&mut self, name: &str, v: &str) -> Result<(), ConfigError> {
        match name {
            "mode" => {
                self.mode = match v {
                    "pubsub" => Mode::PubSub,
                    "queue" => Mode::Queue,
                    _ => {
                        return Err(ConfigError::BadValue {
                            name: "mode",
                            value: v.to_owned(),
                        });
                    }
                }
            }
            "prefix" => {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(ConfigError::BadValue {
                        name: "prefix",
                        value: v.to_owned(),
                    });
                }
                self.prefix = v.to_owned();
            }
            "ttl" => {
                self.node_ttl = secs("ttl", v)?;
                if self.node_ttl < Duration::from_millis(300) {
                    return Err(ConfigError::BadValue {
                        name: "ttl",
                        value: v.to_owned(),
                    });
                }
            }
            "queue_cap" => self.queue_cap = count("queue_cap", v)?,
            "queue_age" => self.queue_age = secs("queue_age", v)?,
            "concurrency" => self.concurrency = count("concurrency", v)?,
            "backlog_grace" => self.backlog_grace = secs("backlog_grace", v)?,
            other => return Err(ConfigError::UnknownOption(other.to_owned())),
        }
        Ok(())
    }
}

/// `scheme://user:***@host...`: the password (or a lone `:password`) hidden.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_and_keeps_the_server_url() {
        let c = RedisConfig::from_url("redis://127.0.0.1:6380/2?mode=queue&prefix=app1&ttl=3&queue_cap=50&queue_age=60&concurrency=8&backlog_grace=0.5")
            .unwrap();
        assert_eq!(c.url, "redis://127.0.0.1:6380/2");
        assert_eq!(c.mode, Mode::Queue);
        assert_eq!(c.prefix, "app1");
        assert_eq!(c.node_ttl, Duration::from_secs(3));
        assert_eq!((c.queue_cap, c.concurrency), (50, 8));
        assert_eq!(c.queue_age, Duration::from_secs(60));
        assert_eq!(c.backlog_grace, Duration::from_millis(500));
        let d = RedisConfig::from_url("redis://localhost").unwrap();
        assert_eq!(d.mode, Mode::PubSub);
        assert!(matches!(
            RedisConfig::from_url("redis://x?mode=fast"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            RedisConfig::from_url("redis://x?color=red"),
            Err(ConfigError::UnknownOption(_))
        ));
        assert!(matches!(
            RedisConfig::from_url("redis://x?ttl=0"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(RedisConfig::from_url("http://x").is_err());
    }

    #[test]
    fn a_cluster_is_named_by_some_of_its_nodes() {
        let c = RedisConfig::from_url(
            "redis-cluster://127.0.0.1:7000,127.0.0.1:7001?mode=queue&prefix=app",
        )
        .unwrap();
        assert_eq!(
            c.cluster,
            vec!["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!((c.mode, c.prefix.as_str()), (Mode::Queue, "app"));
        assert!(
            RedisConfig::from_url("redis://h")
                .unwrap()
                .cluster
                .is_empty()
        );
        assert!(RedisConfig::from_url("redis-cluster://h:1?prefix=a{b}").is_err());
        assert!(RedisConfig::from_url("redis-cluster://h:notaport").is_err());
    }

    #[test]
    fn rediss_is_tls() {
        let c = RedisConfig::from_url("rediss://127.0.0.1:6380/1?mode=queue").unwrap();
        assert_eq!(c.url, "rediss://127.0.0.1:6380/1");
        assert_eq!(c.mode, Mode::Queue);
        let client = redis::Client::open(c.url.as_str()).unwrap();
        assert!(
            matches!(
                client.get_connection_info().addr(),
                redis::ConnectionAddr::TcpTls {
                    insecure: false,
                    ..
                }
            ),
            "{:?}",
            client.get_connection_info().addr()
        );
        // The client's fragment is kept apart from switchboard's options.
        let c = RedisConfig::from_url("rediss://h:1/?prefix=p#insecure").unwrap();
        assert_eq!(
            (c.url.as_str(), c.prefix.as_str()),
            ("rediss://h:1/#insecure", "p")
        );
    }
}
