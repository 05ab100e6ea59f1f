//! `switchboard serve` configuration: built-in defaults, then a TOML file, then
//! `SWITCHBOARD_*` environment variables, then command-line flags, each
//! overriding the one before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use std::sync::Arc;

use switchboard::auth::proxy::{ConnectProxy, ProxyConfig};
use switchboard::auth::{JwtVerifier, Permissions};
use switchboard::core::Framing;
use switchboard::tls::Tls;
use switchboard::{Limits, NodeId, RateLimit};

use crate::security::{LOOPBACK_ORIGINS, Security, is_loopback};

/// Declares every option of `switchboard serve` once: its flag (the name with
/// `-` for `_`), its `SWITCHBOARD_*` variable, its TOML key (the name), its
/// built-in default and its help text. From that one table come the flags
/// ([`ServeArgs`], which is also what a TOML file deserializes into, unknown
/// keys refused), the merge of flags over file, and [`Options`], the merged
/// values with the defaults applied.
macro_rules! options {
    ($(
        $(#[$attr:meta])*
        $name:ident : $ty:ty $(= $default:literal)?, $env:literal, $help:literal;
    )*) => {
        /// Flags of `switchboard serve`, and the keys of its TOML file. Each
        /// flag also reads a `SWITCHBOARD_*` variable.
        #[derive(Debug, Default, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ServeArgs {
            /// TOML configuration file; its keys are the flag names with `_` for `-`.
            #[arg(long, env = "SWITCHBOARD_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                #[doc = $help]
                #[arg(long, env = $env, help = concat!($help $(, " [default: ", $default, "]")?))]
                #[serde(default)]
                $(#[$attr])*
                pub $name: Option<$ty>,
            )*
        }

        /// Every option, merged: flags over the file, the file over the
        /// built-in defaults.
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub struct Options {
            $(
                #[doc = $help]
                pub $name: options!(@ty $ty $(, $default)?),
            )*
        }

        /// Every option's TOML key and variable, in the table's order.
        pub const OPTIONS: &[(&str, &str)] = &[$((stringify!($name), $env)),*];

        impl ServeArgs {
            /// These flags over `file`, over the defaults.
            fn merge(self, file: ServeArgs) -> Options {
                Options {
                    $( $name: options!(@val self.$name.or(file.$name) $(, $default)?), )*
                }
            }
        }
    };
    (@ty $ty:ty) => { Option<$ty> };
    (@ty $ty:ty, $default:literal) => { $ty };
    (@val $v:expr) => { $v };
    (@val $v:expr, $default:literal) => {
        match $v {
            Some(v) => v,
            // Every default parses: `every_default_parses` below.
            None => $default.parse().expect("a built-in default parses"),
        }
    };
}

options! {
    node_id: String, "SWITCHBOARD_NODE_ID",
        "This node's id (A-Z a-z 0-9 _ -); random when unset.";
    ws: String = "127.0.0.1:9001", "SWITCHBOARD_WS",
        "WebSocket listen address, or `off`";
    ws_path: String = "/ws", "SWITCHBOARD_WS_PATH",
        "WebSocket path";
    tcp: String = "127.0.0.1:9101", "SWITCHBOARD_TCP",
        "TCP listen address, or `off`";
    tcp_framing: Framing = "line", "SWITCHBOARD_TCP_FRAMING",
        "TCP framing: `line` or `length`";
    tls_cert: PathBuf, "SWITCHBOARD_TLS_CERT",
        "Serve TLS (wss://, https://, and TLS on the TCP listener) with this PEM certificate chain, leaf first; read again on SIGHUP";
    tls_key: PathBuf, "SWITCHBOARD_TLS_KEY",
        "The PEM private key of --tls-cert; read again on SIGHUP";
    cluster: String = "local", "SWITCHBOARD_CLUSTER",
        "Cluster backplane: `local`, `memory:N` (N nodes in this process, on consecutive ports), `redis://HOST:PORT[/DB]?mode=pubsub|queue&prefix=..`, `redis-cluster://HOST:PORT,HOST:PORT?mode=pubsub|queue&prefix=..` (a Redis Cluster), `amqp://USER:PASS@HOST:PORT/VHOST?mode=fanout|routing&prefix=..` or `nats://[USER:PASS@]HOST:PORT[,HOST:PORT]?mode=core&prefix=..`; `rediss://`, `amqps://` and `tls://` (NATS) are over TLS, the broker checked against the system trust store (or SSL_CERT_FILE)";
    #[serde(deserialize_with = "text")]
    redis_prefix: String, "SWITCHBOARD_REDIS_PREFIX",
        "Redis: key and channel prefix (overrides the URL's `prefix`; default sb)";
    #[serde(deserialize_with = "text")]
    redis_ttl: String, "SWITCHBOARD_REDIS_TTL",
        "Redis: seconds after which a silent node counts as dead (URL `ttl`; default 10)";
    #[serde(deserialize_with = "text")]
    redis_queue_cap: String, "SWITCHBOARD_REDIS_QUEUE_CAP",
        "Redis queue mode: approximate maximum stream length per node (URL `queue_cap`; default 100000)";
    #[serde(deserialize_with = "text")]
    redis_queue_age: String, "SWITCHBOARD_REDIS_QUEUE_AGE",
        "Redis queue mode: seconds an undelivered envelope is kept (URL `queue_age`; default 300)";
    #[serde(deserialize_with = "text")]
    redis_concurrency: String, "SWITCHBOARD_REDIS_CONCURRENCY",
        "Redis queue mode: stream entries read and dispatched per round trip (URL `concurrency`; default 256)";
    #[serde(deserialize_with = "text")]
    redis_backlog_grace: String, "SWITCHBOARD_REDIS_BACKLOG_GRACE",
        "Redis queue mode: seconds a restarted node waits before delivering its backlog (URL `backlog_grace`; default 5)";
    #[serde(deserialize_with = "text")]
    amqp_mode: String, "SWITCHBOARD_AMQP_MODE",
        "RabbitMQ: `fanout` or `routing` (overrides the URL's `mode`; default fanout)";
    #[serde(deserialize_with = "text")]
    amqp_exchange: String, "SWITCHBOARD_AMQP_EXCHANGE",
        "RabbitMQ: the deployment's exchange (URL `exchange`; default PREFIX.MODE)";
    #[serde(deserialize_with = "text")]
    amqp_prefix: String, "SWITCHBOARD_AMQP_PREFIX",
        "RabbitMQ: prefix of the node queues' names (URL `prefix`; default sb)";
    #[serde(deserialize_with = "text")]
    amqp_ttl: String, "SWITCHBOARD_AMQP_TTL",
        "RabbitMQ: seconds after which a silent node counts as dead (URL `ttl`; default 10)";
    #[serde(deserialize_with = "text")]
    amqp_queue_cap: String, "SWITCHBOARD_AMQP_QUEUE_CAP",
        "RabbitMQ: most messages a node's queue holds (URL `queue_cap`; default 100000)";
    max_message_size: usize = "65536", "SWITCHBOARD_MAX_MESSAGE_SIZE",
        "Largest inbound message in bytes";
    outbox_frames: usize = "1024", "SWITCHBOARD_OUTBOX_FRAMES",
        "Frames a connection's outbound queue holds before it is closed as slow";
    heartbeat: u64 = "25", "SWITCHBOARD_HEARTBEAT",
        "Seconds between WebSocket pings";
    idle_timeout: u64 = "60", "SWITCHBOARD_IDLE_TIMEOUT",
        "Seconds of silence after which a WebSocket client is closed; 0 disables";
    tcp_idle_timeout: u64 = "0", "SWITCHBOARD_TCP_IDLE_TIMEOUT",
        "Seconds of silence after which a TCP client is closed; 0 disables";
    handshake_timeout: u64 = "10", "SWITCHBOARD_HANDSHAKE_TIMEOUT",
        "Seconds a client has to complete its handshake";
    shutdown_timeout: u64 = "10", "SWITCHBOARD_SHUTDOWN_TIMEOUT",
        "Seconds shutdown waits for connections to close";
    jwt_secret: Secret, "SWITCHBOARD_JWT_SECRET",
        "Authenticate clients by JWT signed with this HS256 secret (prefer the variable: a flag shows in the process list)";
    jwt_public_key: PathBuf, "SWITCHBOARD_JWT_PUBLIC_KEY",
        "Authenticate clients by JWT verified with this PEM public key (RS256 or ES256)";
    connect_proxy: String, "SWITCHBOARD_CONNECT_PROXY",
        "Authenticate clients by asking this backend (http://HOST:PORT/PATH) whether to accept each connection, and as whom (docs/SECURITY.md)";
    connect_proxy_timeout: u64 = "5", "SWITCHBOARD_CONNECT_PROXY_TIMEOUT",
        "Seconds the connect proxy has to answer before the connection is refused";
    connect_proxy_concurrency: usize = "64", "SWITCHBOARD_CONNECT_PROXY_CONCURRENCY",
        "Connections waiting for the connect proxy at once, at most; more are refused (503)";
    connect_proxy_headers: String = "authorization,cookie,origin,user-agent,x-forwarded-for", "SWITCHBOARD_CONNECT_PROXY_HEADERS",
        "Request headers passed to the connect proxy, comma-separated";
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    insecure: bool = "false", "SWITCHBOARD_INSECURE",
        "Serve non-loopback addresses without authentication: anyone may connect as any uid and do anything";
    can: String, "SWITCHBOARD_CAN",
        "Permissions every authenticated client has, comma-separated rules (docs/SECURITY.md), besides its token's";
    allowed_origins: String, "SWITCHBOARD_ALLOWED_ORIGINS",
        "Browser origins allowed to open a WebSocket, comma-separated, `*` matching any run (default: any once authentication is on; loopback pages only in development mode)";
    max_groups_per_conn: usize = "128", "SWITCHBOARD_MAX_GROUPS_PER_CONN",
        "Most groups one connection may be in";
    client_rate: f64, "SWITCHBOARD_CLIENT_RATE",
        "Messages a second one client may send; 0 for no limit (default: 100 once authentication or --insecure is on, none in development mode)";
    client_burst: f64, "SWITCHBOARD_CLIENT_BURST",
        "Messages one client may send at once after a quiet spell (default: twice the rate)";
    max_conns_per_uid: usize, "SWITCHBOARD_MAX_CONNS_PER_UID",
        "Most connections one uid may hold across the cluster (default: no limit)";
    api: String, "SWITCHBOARD_API",
        "Serve the server API (POST /api/<method>, /api/openapi.json, /metrics, /ready, /stats) on this address (docs/SERVER-API.md); off when unset";
    api_key: Secret, "SWITCHBOARD_API_KEY",
        "The key every API request carries as `Authorization: apikey KEY` (prefer the variable: a flag shows in the process list)";
    events_url: String, "SWITCHBOARD_EVENTS_URL",
        "POST client events (connect, message, close, online, offline) in batches to this backend URL, http://HOST:PORT/PATH (docs/EVENTS.md)";
    events_secret: Secret, "SWITCHBOARD_EVENTS_SECRET",
        "Sign each events body with HMAC-SHA256 under this secret, in the X-Switchboard-Signature header";
    events_queue: usize = "10000", "SWITCHBOARD_EVENTS_QUEUE",
        "Events waiting for the backend, at most; more are dropped and counted";
    events_timeout: u64 = "5", "SWITCHBOARD_EVENTS_TIMEOUT",
        "Seconds the backend has to answer one batch of events before it is retried";
    history: String, "SWITCHBOARD_HISTORY",
        "Where recorded pushes are kept for clients that reconnect: memory, off, or redis://HOST:PORT[?prefix=P] (default: memory for local and memory:N, the cluster's Redis for redis://, off for redis-cluster://, amqp:// and nats://)";
    history_size: usize = "100", "SWITCHBOARD_HISTORY_SIZE",
        "Entries kept per stream; older ones are trimmed";
    history_ttl: u64 = "300", "SWITCHBOARD_HISTORY_TTL",
        "Seconds an entry is kept; a stream not written for this long is forgotten, and its positions with it";
    history_record: String, "SWITCHBOARD_HISTORY_RECORD",
        "Record every push to the streams these comma-separated patterns name (user:*, group:news-*), without the push asking";
}

/// A secret option: never shown by `Debug`, so never in a log.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// A cluster option from TOML, where it may be written as a string or a
/// number: the text its URL parser reads.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Some(match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }))
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
    /// A NATS server or cluster.
    Nats(switchboard_nats::NatsConfig),
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
            ClusterUrl::Nats(c) => write!(f, "nats {}, prefix {:?}", c.mode, c.prefix),
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
            url if ["redis://", "rediss://", "redis-cluster://"]
                .iter()
                .any(|s| url.starts_with(s)) =>
            {
                Ok(ClusterUrl::Redis(switchboard_redis::RedisConfig::from_url(
                    url,
                )?))
            }
            url if url.starts_with("amqp://") || url.starts_with("amqps://") => Ok(
                ClusterUrl::Amqp(switchboard_amqp::AmqpConfig::from_url(url)?),
            ),
            url if url.starts_with("nats://") || url.starts_with("tls://") => Ok(ClusterUrl::Nats(
                switchboard_nats::NatsConfig::from_url(url)?,
            )),
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
        "unsupported cluster {0:?}: use `local`, `memory:N` (1 to 64 nodes in this process), `redis://...`, `redis-cluster://...`, `amqp://...` or `nats://...`"
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
    /// Bad NATS options.
    #[error(transparent)]
    Nats(#[from] switchboard_nats::ConfigError),
    /// A RabbitMQ option given without a RabbitMQ cluster.
    #[error("{0} is set but the cluster is not amqp://")]
    AmqpOptionWithoutAmqp(&'static str),
    /// No listener at all.
    #[error("both --ws and --tcp are off: nothing to serve")]
    NoListener,
    /// A listener reachable from other hosts with nobody authenticated.
    #[error(
        "refusing to serve {0} without authentication: anyone could connect as any user and push to everyone. \
         Set --jwt-secret (or SWITCHBOARD_JWT_SECRET), --jwt-public-key or --connect-proxy, listen on a loopback address, \
         or pass --insecure to accept that"
    )]
    Insecure(String),
    /// A server API reachable from other hosts without a key.
    #[error(
        "refusing to serve the API on {0} without a key: anyone could push to everyone and close any connection. \
         Set --api-key (or SWITCHBOARD_API_KEY), listen on a loopback address, or pass --insecure to accept that"
    )]
    InsecureApi(String),
    /// An authentication setting that cannot be used.
    #[error("{0}")]
    Auth(String),
    /// TLS settings or files that cannot be used.
    #[error("{0}")]
    Tls(String),
    /// History settings that cannot be used.
    #[error("{0}")]
    History(String),
}

/// The listeners' TLS: the certificate and key files, and what was last
/// loaded from them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
    /// What the listeners serve; shared by clones, so a reload reaches them.
    pub tls: Tls,
}

impl TlsFiles {
    /// Reads and checks the pair.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, ConfigError> {
        let (chain, pem) = read_pair(&cert, &key)?;
        let tls = Tls::from_pem(&chain, &pem).map_err(|e| pair_error(&cert, &key, &e))?;
        Ok(Self { cert, key, tls })
    }

    /// Reads the files again: handshakes from now on use what they hold, and
    /// open connections are not touched. On error the certificate served so
    /// far stays.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let (chain, pem) = read_pair(&self.cert, &self.key)?;
        self.tls
            .replace_pem(&chain, &pem)
            .map_err(|e| pair_error(&self.cert, &self.key, &e))
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ConfigError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    Ok((read(cert)?, read(key)?))
}

fn pair_error(cert: &Path, key: &Path, e: &switchboard::tls::TlsError) -> ConfigError {
    // The error names what is wrong, never the key's content.
    ConfigError::Tls(format!(
        "TLS certificate {} and key {}: {e}",
        cert.display(),
        key.display()
    ))
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
    /// Authentication and what clients may do.
    pub security: Security,
    /// No authentication and loopback listeners only: clients name their uid
    /// and may do anything (a warning at start says so).
    pub development: bool,
    /// TLS on every listener, when set.
    pub tls: Option<TlsFiles>,
    /// The server API's listener, when served.
    pub api: Option<ApiListen>,
    /// Where client events go, when anywhere.
    pub events: Option<crate::events::EventsConfig>,
    /// Where recorded pushes are kept, and which are recorded.
    pub history: crate::history::HistoryConfig,
}

/// Where the server API listens, and the key its requests carry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiListen {
    /// The listen address.
    pub addr: String,
    /// The key; `None` only on a loopback address or with `--insecure`.
    pub key: Option<Secret>,
}

impl ApiListen {
    /// Checks that an API reachable from other hosts has a key, unless the
    /// operator said `--insecure`; a keyless API is logged as such.
    pub fn new(addr: String, key: Option<Secret>, insecure: bool) -> Result<Self, ConfigError> {
        if key.as_ref().is_some_and(|k| k.expose().len() < 16) {
            return Err(ConfigError::Auth(
                "--api-key is shorter than 16 bytes: use a long random key".into(),
            ));
        }
        if key.is_none() {
            if !is_loopback(&addr) && !insecure {
                return Err(ConfigError::InsecureApi(addr));
            }
            tracing::warn!(
                %addr,
                "the server API has no key: anyone who reaches {addr} may push to everyone and close any connection (set --api-key)"
            );
        }
        Ok(Self { addr, key })
    }
}

impl Default for ServeConfig {
    /// The built-in defaults of the options table.
    fn default() -> Self {
        Self::from_options(ServeArgs::default().merge(ServeArgs::default()))
            .expect("the built-in defaults are a valid configuration")
    }
}

/// The JWT verifier `--jwt-secret` or `--jwt-public-key` asks for, if either
/// is set (for `serve` and for the gateway topology's `worker`).
pub fn jwt_verifier(
    secret: Option<&Secret>,
    public_key: Option<&std::path::Path>,
) -> Result<Option<JwtVerifier>, ConfigError> {
    let auth = |e: String| ConfigError::Auth(e);
    Ok(match (secret, public_key) {
        (Some(_), Some(_)) => {
            return Err(auth(
                "--jwt-secret and --jwt-public-key are both set: choose one".into(),
            ));
        }
        (Some(s), None) if s.expose().len() < 16 => {
            return Err(auth(
                "--jwt-secret is shorter than 16 bytes: use a long random secret".into(),
            ));
        }
        (Some(s), None) => Some(JwtVerifier::hs256(s.expose())),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| auth(format!("cannot read {}: {e}", path.display())))?;
            Some(
                JwtVerifier::public_key_pem(&pem)
                    .map_err(|e| auth(format!("{}: {e}", path.display())))?,
            )
        }
        (None, None) => None,
    })
}

/// Reads the authentication and per-client limit options into `cfg`.
fn secure(cfg: &mut ServeConfig, o: &Options) -> Result<(), ConfigError> {
    let auth = |e: String| ConfigError::Auth(e);
    let jwt = jwt_verifier(o.jwt_secret.as_ref(), o.jwt_public_key.as_deref())?;
    let list = split_list;
    let proxy = match &o.connect_proxy {
        None => None,
        Some(_) if jwt.is_some() => {
            return Err(auth(
                "--connect-proxy and a JWT key are both set: choose one".into(),
            ));
        }
        Some(url) => {
            let mut p = ProxyConfig::from_url(url).map_err(auth)?;
            p.timeout = Duration::from_secs(o.connect_proxy_timeout.max(1));
            p.concurrency = o.connect_proxy_concurrency.max(1);
            p.headers = list(&o.connect_proxy_headers.to_ascii_lowercase());
            Some(ConnectProxy::new(p))
        }
    };
    let listeners: Vec<&String> = cfg.ws.iter().chain(cfg.tcp.iter()).collect();
    let exposed = listeners.iter().find(|a| !is_loopback(a));
    if jwt.is_none() && proxy.is_none() && !o.insecure {
        if let Some(addr) = exposed {
            return Err(ConfigError::Insecure((*addr).clone()));
        }
        cfg.development = true;
    }
    let mut sec = Security::open();
    sec.proxy = proxy;
    if let Some(v) = jwt {
        sec.jwt = Some(Arc::new(v));
    }
    if sec.authenticates() {
        sec.can = Permissions::parse(list(o.can.as_deref().unwrap_or("")))
            .map_err(|e| auth(format!("--can: {e}")))?;
    } else if o.can.is_some() {
        return Err(auth(
            "--can is set but clients are not authenticated: without a token every client may do everything".into(),
        ));
    }
    sec.origins = match &o.allowed_origins {
        Some(s) => Some(list(s)),
        None if cfg.development => Some(LOOPBACK_ORIGINS.iter().map(|s| s.to_string()).collect()),
        None => None,
    };
    sec.max_conns_per_uid = o.max_conns_per_uid;
    cfg.limits.max_groups_per_conn = o.max_groups_per_conn.max(1);
    let rate = o
        .client_rate
        .unwrap_or(if cfg.development { 0.0 } else { 100.0 });
    let rate_ok = rate.is_finite() && rate >= 0.0;
    let burst_ok = o.client_burst.is_none_or(|b| b.is_finite() && b >= 1.0);
    if !rate_ok || !burst_ok {
        return Err(auth(
            "--client-rate must be 0 or more, --client-burst 1 or more".into(),
        ));
    }
    cfg.limits.message_rate = (rate > 0.0).then(|| RateLimit {
        per_second: rate,
        burst: o.client_burst.unwrap_or((rate * 2.0).max(1.0)),
    });
    cfg.security = sec;
    Ok(())
}

/// A comma-separated option (`--can`, `--allowed-origins`, header names):
/// its items, trimmed, empty ones left out.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A listen address, or `None` for `off`.
fn listener(value: String) -> Option<String> {
    (!matches!(value.as_str(), "off" | "none" | "")).then_some(value)
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
                toml::from_str::<ServeArgs>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => ServeArgs::default(),
        };
        Self::from_options(args.merge(file))
    }

    /// Checks merged options and builds the node's configuration from them.
    pub fn from_options(o: Options) -> Result<Self, ConfigError> {
        let mut limits = Limits::default();
        limits.max_message_size = o.max_message_size;
        limits.outbox_frames = o.outbox_frames.max(1);
        limits.heartbeat = Duration::from_secs(o.heartbeat.max(1));
        limits.ws_idle_timeout = secs_opt(o.idle_timeout);
        limits.tcp_idle_timeout = secs_opt(o.tcp_idle_timeout);
        limits.handshake_timeout = Duration::from_secs(o.handshake_timeout.max(1));
        let mut cfg = ServeConfig {
            // Set below, once the cluster's own options are applied.
            history: crate::history::HistoryConfig::off(),
            node_id: o.node_id.clone().map(NodeId::new).transpose()?,
            ws: listener(o.ws.clone()),
            ws_path: o.ws_path.clone(),
            tcp: listener(o.tcp.clone()),
            tcp_framing: o.tcp_framing,
            cluster: o.cluster.parse()?,
            limits,
            shutdown_timeout: Duration::from_secs(o.shutdown_timeout),
            security: Security::open(),
            development: false,
            tls: match (o.tls_cert.clone(), o.tls_key.clone()) {
                (Some(cert), Some(key)) => Some(TlsFiles::load(cert, key)?),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError::Tls(
                        "--tls-cert is set without --tls-key".into(),
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::Tls(
                        "--tls-key is set without --tls-cert".into(),
                    ));
                }
            },
            api: match o.api.clone().and_then(listener) {
                None if o.api_key.is_some() => {
                    return Err(ConfigError::Auth(
                        "--api-key is set but --api is not".into(),
                    ));
                }
                None => None,
                Some(addr) => Some(ApiListen::new(addr, o.api_key.clone(), o.insecure)?),
            },
            events: match o.events_url.clone() {
                None if o.events_secret.is_some() => {
                    return Err(ConfigError::Auth(
                        "--events-secret is set but --events-url is not".into(),
                    ));
                }
                None => None,
                Some(url) => Some(crate::events::EventsConfig::new(
                    &url,
                    o.events_secret.clone(),
                    o.events_queue,
                    Duration::from_secs(o.events_timeout.max(1)),
                )?),
            },
        };
        secure(&mut cfg, &o)?;
        let redis_opts = [
            ("prefix", "redis_prefix", o.redis_prefix),
            ("ttl", "redis_ttl", o.redis_ttl),
            ("queue_cap", "redis_queue_cap", o.redis_queue_cap),
            ("queue_age", "redis_queue_age", o.redis_queue_age),
            ("concurrency", "redis_concurrency", o.redis_concurrency),
            (
                "backlog_grace",
                "redis_backlog_grace",
                o.redis_backlog_grace,
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
        let amqp_opts = [
            ("mode", "amqp_mode", o.amqp_mode),
            ("exchange", "amqp_exchange", o.amqp_exchange),
            ("prefix", "amqp_prefix", o.amqp_prefix),
            ("ttl", "amqp_ttl", o.amqp_ttl),
            ("queue_cap", "amqp_queue_cap", o.amqp_queue_cap),
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
        cfg.history = crate::history::HistoryConfig::from_options(
            o.history.as_deref(),
            o.history_size,
            o.history_ttl,
            o.history_record.as_deref(),
            &cfg.cluster,
        )?;
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

    #[test]
    fn every_default_parses_and_matches_the_library() {
        // `ServeConfig::default` parses every default of the table.
        let cfg = ServeConfig::default();
        assert_eq!(cfg.ws.as_deref(), Some("127.0.0.1:9001"));
        assert_eq!(cfg.tcp.as_deref(), Some("127.0.0.1:9101"));
        assert!(matches!(cfg.cluster, ClusterUrl::Local));
        // The server's defaults are the library's, so a library user and an
        // operator get the same node.
        let lib = Limits::default();
        assert_eq!(cfg.limits.max_message_size, lib.max_message_size);
        assert_eq!(cfg.limits.outbox_frames, lib.outbox_frames);
        assert_eq!(cfg.limits.heartbeat, lib.heartbeat);
        assert_eq!(cfg.limits.ws_idle_timeout, lib.ws_idle_timeout);
        assert_eq!(cfg.limits.tcp_idle_timeout, lib.tcp_idle_timeout);
        assert_eq!(cfg.limits.handshake_timeout, lib.handshake_timeout);
    }

    #[test]
    fn the_help_names_each_flag_its_variable_and_its_default() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        for needle in [
            "--ws <WS>",
            "SWITCHBOARD_WS=",
            "[default: 127.0.0.1:9001]",
            "--redis-queue-cap",
            "SWITCHBOARD_REDIS_QUEUE_CAP=",
            "--heartbeat",
            "[default: 25]",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from\n{help}");
        }
    }

    #[test]
    fn toml_takes_numbers_or_strings_for_cluster_options() {
        let args: ServeArgs = toml::from_str("redis_ttl = 4\nredis_prefix = \"p\"").unwrap();
        assert_eq!(args.redis_ttl.as_deref(), Some("4"));
        assert_eq!(args.redis_prefix.as_deref(), Some("p"));
        let err = toml::from_str::<ServeArgs>("config = \"x.toml\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn an_exposed_address_needs_authentication_or_insecure() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let exposed = |extra: &[&str]| {
            let mut argv = vec!["x", "--ws", "0.0.0.0:1", "--tcp", "off"];
            argv.extend_from_slice(extra);
            ServeConfig::load(Cli::try_parse_from(argv).unwrap().serve)
        };
        let err = exposed(&[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Insecure(a) if a == "0.0.0.0:1"),
            "{err}"
        );
        let cfg = exposed(&["--insecure"]).unwrap();
        assert!(!cfg.development && !cfg.security.authenticates());
        assert_eq!(cfg.limits.message_rate.map(|r| r.per_second), Some(100.0));
        assert!(cfg.security.origins.is_none());
        let cfg = exposed(&["--jwt-secret", "0123456789abcdef"]).unwrap();
        assert!(cfg.security.authenticates());
        assert!(matches!(
            exposed(&["--jwt-secret", "short"]),
            Err(ConfigError::Auth(e)) if e.contains("16 bytes")
        ));
        assert!(matches!(
            exposed(&["--insecure", "--can", "push:all"]),
            Err(ConfigError::Auth(e)) if e.contains("--can")
        ));
        assert!(matches!(
            exposed(&["--jwt-secret", "0123456789abcdef", "--can", "push:everyone"]),
            Err(ConfigError::Auth(e)) if e.contains("push:everyone")
        ));
        // Loopback without authentication: development mode, no rate limit,
        // pages of this machine only.
        let dev = ServeConfig::default();
        assert!(dev.development);
        assert_eq!(dev.limits.message_rate, None);
        assert!(!dev.security.origin_allowed("https://example.com"));
        assert_eq!(dev.limits.max_groups_per_conn, 128);
        // The secret never shows in a debug print.
        let args = Cli::try_parse_from(["x", "--jwt-secret", "hunter2-hunter2-hunter2"]).unwrap();
        assert!(!format!("{:?}", args.serve).contains("hunter2"));
    }

    #[test]
    fn the_readme_lists_every_option() {
        let readme = include_str!("../../../README.md");
        for (key, env) in OPTIONS {
            // A row of the options table, or of a cluster's table.
            let flag = format!("`--{}", key.replace('_', "-"));
            let row = readme
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&flag))
                .unwrap_or_else(|| panic!("README.md has no row for {flag}"));
            assert!(
                row.contains(&format!("`{key}`")) && row.contains(env),
                "README.md's row for {flag} should name `{key}` and {env}: {row}"
            );
        }
    }
}
