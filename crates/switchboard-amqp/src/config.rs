//! Options of the RabbitMQ backplanes, from an `amqp://` URL and overrides.

use std::time::Duration;

use lapin::uri::AMQPUri;

/// How envelopes travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One fanout exchange: every node receives every message and keeps what
    /// concerns its own connections. No routing state on the broker.
    #[default]
    Fanout,
    /// One direct exchange: each node's queue is bound with a routing key per
    /// user and per group it holds, its node key and the broadcast key, so a
    /// node receives only what concerns it.
    Routing,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Fanout => "fanout",
            Mode::Routing => "routing",
        })
    }
}

/// An `amqp://` URL or option that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Unknown option in the URL query.
    #[error(
        "unknown amqp option {0:?}: use mode, exchange, prefix, ttl or queue_cap (or the client's heartbeat, connection_timeout, frame_max, channel_max, auth_mechanism)"
    )]
    UnknownOption(String),
    /// An option's value is invalid.
    #[error("invalid value {value:?} for amqp option {name}")]
    BadValue {
        /// The option.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The URL itself is invalid.
    #[error("invalid amqp URL: {0}")]
    Url(String),
}

/// Options of a RabbitMQ backplane.
#[derive(Clone)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The broker URL without switchboard's options
    /// (`amqp://user:pass@host:port/vhost`, plus client options such as `heartbeat`).
    pub url: String,
    /// Fanout or routing.
    pub mode: Mode,
    /// The exchange every node of the deployment publishes to; by default
    /// `PREFIX.MODE`. Deployments sharing a broker use different exchanges.
    pub exchange: Option<String>,
    /// Prefix of the node queues' names (`PREFIX.node.NODE`).
    pub prefix: String,
    /// A node not heard from for this long is dead: it leaves every answer.
    /// Nodes announce themselves every third of it.
    pub node_ttl: Duration,
    /// Most messages a node's queue holds; beyond it the broker refuses new
    /// messages for that node and the sender counts them as dropped.
    pub queue_cap: u32,
    uri: AMQPUri,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.display_url())
            .field("mode", &self.mode)
            .field("exchange", &self.exchange_name())
            .field("prefix", &self.prefix)
            .field("node_ttl", &self.node_ttl)
            .field("queue_cap", &self.queue_cap)
            .finish()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        // Invariant: a constant, valid URL.
        Self::from_url("amqp://guest:guest@127.0.0.1:5672/%2f").expect("the default URL parses")
    }
}

/// AMQP heartbeat asked for when the URL does not say: a dead TCP peer is
/// noticed by both ends within two of these.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Options of the AMQP client itself, passed through to it.
const CLIENT_OPTIONS: [&str; 5] = [
    "heartbeat",
    "connection_timeout",
    "frame_max",
    "channel_max",
    "auth_mechanism",
];

fn secs(name: &'static str, v: &str) -> Result<Duration, ConfigError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| bad(name, v))
}

fn bad(name: &'static str, v: &str) -> ConfigError {
    ConfigError::BadValue {
        name,
        value: v.to_owned(),
    }
}

/// A name the broker accepts and that cannot clash with its own (`amq.*`).
fn name(name: &'static str, v: &str) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 100
        && !v.starts_with("amq.")
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(bad(name, v))
    }
}

impl AmqpConfig {
    /// Parses `amqp[s]://[user:pass@]host[:port][/vhost][?mode=fanout|routing&exchange=E&prefix=P&ttl=S&queue_cap=N]`;
    /// the client's own options (`heartbeat`, `connection_timeout`, ...) pass through.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let parsed = url::Url::parse(url).map_err(|e| ConfigError::Url(e.to_string()))?;
        match parsed.scheme() {
            // amqps: TLS with rustls, the server's certificate checked
            // against the system's trust store (which SSL_CERT_FILE or
            // SSL_CERT_DIR replace).
            "amqp" | "amqps" => {}
            other => return Err(ConfigError::Url(format!("scheme {other:?} is not amqp"))),
        }
        let mut cfg = AmqpConfig {
            url: String::new(),
            mode: Mode::Fanout,
            exchange: None,
            prefix: "sb".into(),
            node_ttl: Duration::from_secs(10),
            queue_cap: 100_000,
            uri: AMQPUri::default(),
        };
        let mut client = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in parsed.query_pairs() {
            if CLIENT_OPTIONS.contains(&k.as_ref()) {
                client.append_pair(&k, &v);
            } else {
                cfg.set(&k, &v)?;
            }
        }
        let mut base = parsed.clone();
        let client = client.finish();
        base.set_query((!client.is_empty()).then_some(client.as_str()));
        cfg.url = base.to_string();
        let mut uri: AMQPUri = cfg.url.parse().map_err(ConfigError::Url)?;
        // The client takes the host from the URL's domain only: an IP address
        // would silently become "localhost".
        let host = parsed
            .host_str()
            .ok_or_else(|| ConfigError::Url("no host".into()))?;
        uri.authority.host = host.trim_matches(['[', ']']).to_owned();
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        cfg.uri = uri;
        Ok(cfg)
    }

    /// Sets one option by name, as in the URL query.
    pub fn set(&mut self, option: &str, v: &str) -> Result<(), ConfigError> {
        match option {
            "mode" => {
                self.mode = match v {
                    "fanout" => Mode::Fanout,
                    "routing" => Mode::Routing,
                    _ => return Err(bad("mode", v)),
                }
            }
            "exchange" => self.exchange = Some(name("exchange", v)?),
            "prefix" => self.prefix = name("prefix", v)?,
            "ttl" => {
                self.node_ttl = secs("ttl", v)?;
                if self.node_ttl < Duration::from_millis(300) {
                    return Err(bad("ttl", v));
                }
            }
            "queue_cap" => {
                self.queue_cap = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("queue_cap", v))?;
            }
            other => return Err(ConfigError::UnknownOption(other.to_owned())),
        }
        Ok(())
    }

    /// The exchange in use: the configured one, or `PREFIX.MODE`.
    pub fn exchange_name(&self) -> String {
        self.exchange
            .clone()
            .unwrap_or_else(|| format!("{}.{}", self.prefix, self.mode))
    }

    /// The URL with its password masked, for logs.
    pub fn display_url(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            _ => self.url.clone(),
        }
    }

    /// The parsed URI handed to the AMQP client.
    pub(crate) fn uri(&self) -> AMQPUri {
        self.uri.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_and_keeps_the_broker_url() {
        let c = AmqpConfig::from_url(
            "amqp://u:p%40ss@127.0.0.1:5673/prod?mode=routing&exchange=chat.x&prefix=chat&ttl=2.5&queue_cap=500&heartbeat=5",
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Routing);
        assert_eq!(c.exchange_name(), "chat.x");
        assert_eq!(c.prefix, "chat");
        assert_eq!(c.node_ttl, Duration::from_millis(2500));
        assert_eq!(c.queue_cap, 500);
        assert_eq!(c.url, "amqp://u:p%40ss@127.0.0.1:5673/prod?heartbeat=5");
        let uri = c.uri();
        assert_eq!(uri.authority.host, "127.0.0.1", "an IP host is kept");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.authority.userinfo.password, "p@ss");
        assert_eq!(uri.vhost, "prod");
        assert_eq!(uri.query.heartbeat, Some(5));
        assert!(!format!("{c:?}").contains("p%40ss"), "password in {c:?}");

        let d = AmqpConfig::from_url("amqp://localhost").unwrap();
        assert_eq!(d.mode, Mode::Fanout);
        assert_eq!(d.exchange_name(), "sb.fanout");
        assert_eq!(d.uri().query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(d.uri().vhost, "/");
        let r = AmqpConfig::from_url("amqp://h?mode=routing&prefix=p1").unwrap();
        assert_eq!(r.exchange_name(), "p1.routing");
    }

    #[test]
    fn amqps_is_tls_on_the_amqps_port() {
        use lapin::uri::AMQPScheme;
        let c = AmqpConfig::from_url("amqps://u:p@127.0.0.1/%2f?mode=routing").unwrap();
        let uri = c.uri();
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(
            uri.authority.host, "127.0.0.1",
            "the name the certificate is checked against"
        );
        assert_eq!(c.url, "amqps://u:p@127.0.0.1/%2f");
    }

    #[test]
    fn rejects_bad_input_with_a_typed_error() {
        let err = |u: &str| AmqpConfig::from_url(u).unwrap_err();
        assert!(matches!(
            err("amqp://h?mode=topic"),
            ConfigError::BadValue { name: "mode", .. }
        ));
        assert!(matches!(
            err("amqp://h?colour=red"),
            ConfigError::UnknownOption(_)
        ));
        assert!(matches!(
            err("amqp://h?ttl=0.1"),
            ConfigError::BadValue { name: "ttl", .. }
        ));
        assert!(matches!(
            err("amqp://h?queue_cap=0"),
            ConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("amqp://h?exchange=amq.direct"),
            ConfigError::BadValue {
                name: "exchange",
                ..
            }
        ));
        assert!(matches!(
            err("amqp://h?prefix=a%20b"),
            ConfigError::BadValue { name: "prefix", .. }
        ));
        assert!(matches!(
            err("amqp://h?heartbeat=soon"),
            ConfigError::Url(_)
        ));
        assert!(matches!(err("http://h"), ConfigError::Url(_)));
        assert!(matches!(err("not a url"), ConfigError::Url(_)));
    }
}
