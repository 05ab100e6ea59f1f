//! `switchboard serve` configuration: built-in defaults, then a TOML file, then
//! `SWITCHBOARD_*` environment variables, then command-line flags, each
//! overriding the one before.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use switchboard::core::Framing;
use switchboard::{Limits, NodeId};

/// Flags of `switchboard serve`. Each also reads a `SWITCHBOARD_*` variable.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML configuration file; its keys are the flag names with `_` for `-`.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id (A-Z a-z 0-9 _ -); random when unset.
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,
    /// WebSocket listen address, or `off` [default: 127.0.0.1:9001]
    #[arg(long, env = "SWITCHBOARD_WS")]
    pub ws: Option<String>,
    /// WebSocket path [default: /ws]
    #[arg(long, env = "SWITCHBOARD_WS_PATH")]
    pub ws_path: Option<String>,
    /// TCP listen address, or `off` [default: 127.0.0.1:9101]
    #[arg(long, env = "SWITCHBOARD_TCP")]
    pub tcp: Option<String>,
    /// TCP framing: `line` or `length` [default: line]
    #[arg(long, env = "SWITCHBOARD_TCP_FRAMING")]
    pub tcp_framing: Option<Framing>,
    /// Cluster backplane: `local`, `memory:N` (N nodes in this process, on consecutive ports), `redis://HOST:PORT[/DB]?mode=pubsub|queue&prefix=..` or `amqp://USER:PASS@HOST:PORT/VHOST?mode=fanout|routing&prefix=..` [default: local]
    #[arg(long, env = "SWITCHBOARD_CLUSTER")]
    pub cluster: Option<String>,
    /// Redis: key and channel prefix (overrides the URL's `prefix`) [default: sb]
    #[arg(long, env = "SWITCHBOARD_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Redis: seconds after which a silent node counts as dead (URL `ttl`) [default: 10]
    #[arg(long, env = "SWITCHBOARD_REDIS_TTL")]
    pub redis_ttl: Option<String>,
    /// Redis queue mode: approximate maximum stream length per node (URL `queue_cap`) [default: 100000]
    #[arg(long, env = "SWITCHBOARD_REDIS_QUEUE_CAP")]
    pub redis_queue_cap: Option<String>,
    /// Redis queue mode: seconds an undelivered envelope is kept (URL `queue_age`) [default: 300]
    #[arg(long, env = "SWITCHBOARD_REDIS_QUEUE_AGE")]
    pub redis_queue_age: Option<String>,
    /// Redis queue mode: stream entries read and dispatched per round trip (URL `concurrency`) [default: 256]
    #[arg(long, env = "SWITCHBOARD_REDIS_CONCURRENCY")]
    pub redis_concurrency: Option<String>,
    /// Redis queue mode: seconds a restarted node waits before delivering its backlog (URL `backlog_grace`) [default: 5]
    #[arg(long, env = "SWITCHBOARD_REDIS_BACKLOG_GRACE")]
    pub redis_backlog_grace: Option<String>,
    /// RabbitMQ: `fanout` or `routing` (overrides the URL's `mode`) [default: fanout]
    #[arg(long, env = "SWITCHBOARD_AMQP_MODE")]
    pub amqp_mode: Option<String>,
    /// RabbitMQ: the deployment's exchange (URL `exchange`) [default: PREFIX.MODE]
    #[arg(long, env = "SWITCHBOARD_AMQP_EXCHANGE")]
    pub amqp_exchange: Option<String>,
    /// RabbitMQ: prefix of the node queues' names (URL `prefix`) [default: sb]
    #[arg(long, env = "SWITCHBOARD_AMQP_PREFIX")]
    pub amqp_prefix: Option<String>,
    /// RabbitMQ: seconds after which a silent node counts as dead (URL `ttl`) [default: 10]
    #[arg(long, env = "SWITCHBOARD_AMQP_TTL")]
    pub amqp_ttl: Option<String>,
    /// RabbitMQ: most messages a node's queue holds (URL `queue_cap`) [default: 100000]
    #[arg(long, env = "SWITCHBOARD_AMQP_QUEUE_CAP")]
    pub amqp_queue_cap: Option<String>,
    /// Largest inbound message in bytes [default: 65536]
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Frames a connection's outbound queue holds before it is closed as slow [default: 1024]
    #[arg(long, env = "SWITCHBOARD_OUTBOX_FRAMES")]
    pub outbox_frames: Option<usize>,
    /// Seconds between WebSocket pings [default: 25]
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT")]
    pub heartbeat: Option<u64>,
    /// Seconds of silence after which a WebSocket client is closed; 0 disables [default: 60]
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,
    /// Seconds of silence after which a TCP client is closed; 0 disables [default: 0]
    #[arg(long, env = "SWITCHBOARD_TCP_IDLE_TIMEOUT")]
    pub tcp_idle_timeout: Option<u64>,
    /// Seconds a client has to complete its handshake [default: 10]
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<u64>,
    /// Seconds shutdown waits for connections to close [default: 10]
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
}

/// The same settings, from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    ws: Option<String>,
    ws_path: Option<String>,
    tcp: Option<String>,
    tcp_framing: Option<Framing>,
    cluster: Option<String>,
    redis_prefix: Option<String>,
    redis_ttl: Option<toml::Value>,
    redis_queue_cap: Option<toml::Value>,
    redis_queue_age: Option<toml::Value>,
    redis_concurrency: Option<toml::Value>,
    redis_backlog_grace: Option<toml::Value>,
    amqp_mode: Option<String>,
    amqp_exchange: Option<String>,
    amqp_prefix: Option<String>,
    amqp_ttl: Option<toml::Value>,
    amqp_queue_cap: Option<toml::Value>,
    max_message_size: Option<usize>,
    outbox_frames: Option<usize>,
    heartbeat: Option<u64>,
    idle_timeout: Option<u64>,
    tcp_idle_timeout: Option<u64>,
    handshake_timeout: Option<u64>,
    shutdown_timeout: Option<u64>,
}

/// Where the cluster's other nodes are reached.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClusterUrl {
    /// One process, no peers.
    Local,
    /// Several nodes in this one process, joined by an in-memory bus
    /// (`memory:N`): a cluster without any external service, for trying the
    /// cluster behaviour and for benchmarks.
    Memory(usize),
    /// A shared Redis.
    Redis(switchboard_redis::RedisConfig),
    /// A RabbitMQ broker.
    Amqp(switchboard_amqp::AmqpConfig),
}

impl std::fmt::Display for ClusterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterUrl::Local => f.write_str("local"),
            ClusterUrl::Memory(n) => write!(f, "in-process, {n} nodes"),
            ClusterUrl::Redis(c) => write!(f, "redis {}, prefix {:?}", c.mode, c.prefix),
            ClusterUrl::Amqp(c) => write!(
                f,
                "amqp {}, exchange {:?}, prefix {:?}",
                c.mode,
                c.exchange_name(),
                c.prefix
            ),
        }
    }
}

impl std::str::FromStr for ClusterUrl {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" | "" => Ok(ClusterUrl::Local),
            m if m.starts_with("memory:") => match m["memory:".len()..].parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => Ok(ClusterUrl::Memory(n)),
                _ => Err(ConfigError::Cluster(m.to_owned())),
            },
            url if url.starts_with("redis://") || url.starts_with("rediss://") => Ok(
                ClusterUrl::Redis(switchboard_redis::RedisConfig::from_url(url)?),
            ),
            url if url.starts_with("amqp://") || url.starts_with("amqps://") => Ok(
                ClusterUrl::Amqp(switchboard_amqp::AmqpConfig::from_url(url)?),
            ),
            other => Err(ConfigError::Cluster(other.to_owned())),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid.
    #[error("invalid configuration file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// Bad node id.
    #[error(transparent)]
    NodeId(#[from] switchboard::core::id::IdError),
    /// Unknown cluster URL.
    #[error(
        "unsupported cluster {0:?}: use `local`, `memory:N` (1 to 64 nodes in this process), `redis://...` or `amqp://...`"
    )]
    Cluster(String),
    /// Bad Redis options.
    #[error(transparent)]
    Redis(#[from] switchboard_redis::ConfigError),
    /// A Redis option given without a Redis cluster.
    #[error("{0} is set but the cluster is not redis://")]
    RedisOptionWithoutRedis(&'static str),
    /// Bad RabbitMQ options.
    #[error(transparent)]
    Amqp(#[from] switchboard_amqp::ConfigError),
    /// A RabbitMQ option given without a RabbitMQ cluster.
    #[error("{0} is set but the cluster is not amqp://")]
    AmqpOptionWithoutAmqp(&'static str),
    /// No listener at all.
    #[error("both --ws and --tcp are off: nothing to serve")]
    NoListener,
}

/// A complete, checked configuration of one node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Node id; random when `None`.
    pub node_id: Option<NodeId>,
    /// WebSocket listen address, if serving WebSocket.
    pub ws: Option<String>,
    /// WebSocket path.
    pub ws_path: String,
    /// TCP listen address, if serving TCP.
    pub tcp: Option<String>,
    /// TCP framing.
    pub tcp_framing: Framing,
    /// Cluster backplane.
    pub cluster: ClusterUrl,
    /// Connection limits.
    pub limits: Limits,
    /// Bound on graceful shutdown.
    pub shutdown_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            ws: Some("127.0.0.1:9001".into()),
            ws_path: "/ws".into(),
            tcp: Some("127.0.0.1:9101".into()),
            tcp_framing: Framing::Line,
            cluster: ClusterUrl::Local,
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

fn listener(value: Option<String>, default: Option<String>) -> Option<String> {
    match value {
        Some(v) if v == "off" || v == "none" || v.is_empty() => None,
        Some(v) => Some(v),
        None => default,
    }
}

/// A TOML scalar as the text an option parser reads.
fn toml_text(v: toml::Value) -> String {
    match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Sets each given `(URL option, config key, value)` on the cluster with
/// `set`, which returns `None` when the cluster is not of the options' kind:
/// the error is then `Err(key)`.
fn apply<const N: usize>(
    cluster: &mut ClusterUrl,
    opts: [(&'static str, &'static str, Option<String>); N],
    set: impl Fn(&mut ClusterUrl, &str, &str) -> Option<Result<(), ConfigError>>,
) -> Result<(), Result<ConfigError, &'static str>> {
    for (name, key, value) in opts {
        let Some(value) = value else { continue };
        set(cluster, name, &value).ok_or(Err(key))?.map_err(Ok)?;
    }
    Ok(())
}

fn secs_opt(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_secs(v))
}

impl ServeConfig {
    /// Merges defaults, the file named by `--config`, and flags/environment.
    pub fn load(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let d = ServeConfig::default();
        let mut limits = Limits::default();
        if let Some(v) = args.max_message_size.or(file.max_message_size) {
            limits.max_message_size = v;
        }
        if let Some(v) = args.outbox_frames.or(file.outbox_frames) {
            limits.outbox_frames = v.max(1);
        }
        if let Some(v) = args.heartbeat.or(file.heartbeat) {
            limits.heartbeat = Duration::from_secs(v.max(1));
        }
        if let Some(v) = args.idle_timeout.or(file.idle_timeout) {
            limits.ws_idle_timeout = secs_opt(v);
        }
        if let Some(v) = args.tcp_idle_timeout.or(file.tcp_idle_timeout) {
            limits.tcp_idle_timeout = secs_opt(v);
        }
        if let Some(v) = args.handshake_timeout.or(file.handshake_timeout) {
            limits.handshake_timeout = Duration::from_secs(v.max(1));
        }
        let cfg = ServeConfig {
            node_id: args.node_id.or(file.node_id).map(NodeId::new).transpose()?,
            ws: listener(args.ws.or(file.ws), d.ws),
            ws_path: args.ws_path.or(file.ws_path).unwrap_or(d.ws_path),
            tcp: listener(args.tcp.or(file.tcp), d.tcp),
            tcp_framing: args
                .tcp_framing
                .or(file.tcp_framing)
                .unwrap_or(d.tcp_framing),
            cluster: args
                .cluster
                .or(file.cluster)
                .map(|c| c.parse())
                .transpose()?
                .unwrap_or(d.cluster),
            limits,
            shutdown_timeout: args
                .shutdown_timeout
                .or(file.shutdown_timeout)
                .map_or(d.shutdown_timeout, Duration::from_secs),
        };
        let mut cfg = cfg;
        let redis_opts: [(&'static str, &'static str, Option<String>); 6] = [
            (
                "prefix",
                "redis_prefix",
                args.redis_prefix.or(file.redis_prefix),
            ),
            (
                "ttl",
                "redis_ttl",
                args.redis_ttl.or(file.redis_ttl.map(toml_text)),
            ),
            (
                "queue_cap",
                "redis_queue_cap",
                args.redis_queue_cap.or(file.redis_queue_cap.map(toml_text)),
            ),
            (
                "queue_age",
                "redis_queue_age",
                args.redis_queue_age.or(file.redis_queue_age.map(toml_text)),
            ),
            (
                "concurrency",
                "redis_concurrency",
                args.redis_concurrency
                    .or(file.redis_concurrency.map(toml_text)),
            ),
            (
                "backlog_grace",
                "redis_backlog_grace",
                args.redis_backlog_grace
                    .or(file.redis_backlog_grace.map(toml_text)),
            ),
        ];
        apply(
            &mut cfg.cluster,
            redis_opts,
            |cluster, name, value| match cluster {
                ClusterUrl::Redis(r) => Some(r.set(name, value).map_err(Into::into)),
                _ => None,
            },
        )
        .map_err(|e| e.unwrap_or_else(ConfigError::RedisOptionWithoutRedis))?;
        let amqp_opts: [(&'static str, &'static str, Option<String>); 5] = [
            ("mode", "amqp_mode", args.amqp_mode.or(file.amqp_mode)),
            (
                "exchange",
                "amqp_exchange",
                args.amqp_exchange.or(file.amqp_exchange),
            ),
            (
                "prefix",
                "amqp_prefix",
                args.amqp_prefix.or(file.amqp_prefix),
            ),
            (
                "ttl",
                "amqp_ttl",
                args.amqp_ttl.or(file.amqp_ttl.map(toml_text)),
            ),
            (
                "queue_cap",
                "amqp_queue_cap",
                args.amqp_queue_cap.or(file.amqp_queue_cap.map(toml_text)),
            ),
        ];
        apply(
            &mut cfg.cluster,
            amqp_opts,
            |cluster, name, value| match cluster {
                ClusterUrl::Amqp(a) => Some(a.set(name, value).map_err(Into::into)),
                _ => None,
            },
        )
        .map_err(|e| e.unwrap_or_else(ConfigError::AmqpOptionWithoutAmqp))?;
        if cfg.ws.is_none() && cfg.tcp.is_none() {
            return Err(ConfigError::NoListener);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "node_id = \"from-file\"\ntcp = \"off\"\nws = \"127.0.0.1:1\"\nheartbeat = 7\n",
        )
        .unwrap();
        let cfg = ServeConfig::load(ServeArgs {
            config: Some(path.clone()),
            ws: Some("127.0.0.1:2".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(cfg.node_id.unwrap().as_str(), "from-file");
        assert_eq!(cfg.ws.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(cfg.tcp, None);
        assert_eq!(cfg.limits.heartbeat, Duration::from_secs(7));

        std::fs::write(&path, "bogus = 1\n").unwrap();
        let err = ServeConfig::load(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                cluster: Some("kafka://x".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::Cluster(_))
        ));
        // Redis options: the URL's, overridden by flags; refused without Redis.
        let cfg = ServeConfig::load(ServeArgs {
            cluster: Some("redis://127.0.0.1:6379/1?mode=queue&prefix=fromurl&ttl=4".into()),
            redis_prefix: Some("fromflag".into()),
            redis_queue_age: Some("60".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        let ClusterUrl::Redis(r) = &cfg.cluster else {
            panic!("not redis: {}", cfg.cluster)
        };
        assert_eq!(r.prefix, "fromflag");
        assert_eq!(r.node_ttl, Duration::from_secs(4));
        assert_eq!(r.queue_age, Duration::from_secs(60));
        assert_eq!(r.mode, switchboard_redis::Mode::Queue);
        assert_eq!(r.url, "redis://127.0.0.1:6379/1");
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                redis_prefix: Some("x".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::RedisOptionWithoutRedis("redis_prefix"))
        ));
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                cluster: Some("redis://x?mode=fast".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::Redis(_))
        ));
        // RabbitMQ options: the URL's, then the file's, then flags; refused without RabbitMQ.
        std::fs::write(
            &path,
            "cluster = \"amqp://u:p@127.0.0.1:5672/%2f?mode=fanout&prefix=fromurl&ttl=4\"\namqp_prefix = \"fromfile\"\namqp_queue_cap = 77\namqp_exchange = \"ex.file\"\n",
        )
        .unwrap();
        let cfg = ServeConfig::load(ServeArgs {
            config: Some(path.clone()),
            amqp_mode: Some("routing".into()),
            amqp_exchange: Some("ex.flag".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        let ClusterUrl::Amqp(a) = &cfg.cluster else {
            panic!("not amqp: {}", cfg.cluster)
        };
        assert_eq!(a.mode, switchboard_amqp::Mode::Routing, "flag over URL");
        assert_eq!(a.prefix, "fromfile", "file over URL");
        assert_eq!(a.exchange_name(), "ex.flag", "flag over file");
        assert_eq!(a.queue_cap, 77);
        assert_eq!(a.node_ttl, Duration::from_secs(4), "URL over default");
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                amqp_ttl: Some("3".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::AmqpOptionWithoutAmqp("amqp_ttl"))
        ));
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                cluster: Some("amqp://h?mode=topic".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::Amqp(_))
        ));
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                cluster: Some("amqp://h".into()),
                amqp_queue_cap: Some("-1".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::Amqp(_))
        ));
        assert!(matches!(
            ServeConfig::load(ServeArgs {
                ws: Some("off".into()),
                tcp: Some("off".into()),
                ..ServeArgs::default()
            }),
            Err(ConfigError::NoListener)
        ));
    }
}
