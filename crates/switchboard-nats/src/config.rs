//! Options of the NATS backplanes, from a `nats://` URL.

use std::time::Duration;

/// How envelopes travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Core NATS: a node subscribes to the subjects of the users and groups
    /// it holds, so the NATS servers route each push only to the nodes that
    /// need it. At-most-once.
    #[default]
    Core,
    /// JetStream: envelopes for a node are kept in a stream and read through
    /// the node's durable consumer, acknowledged after local delivery.
    /// At-least-once, duplicates dropped.
    JetStream,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Core => "core",
            Mode::JetStream => "jetstream",
        })
    }
}

/// A `nats://` URL or option that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Unknown option in the URL query.
    #[error(
        "unknown nats option {0:?}: use mode, prefix, ttl, queue_cap, queue_age, replicas or backlog_grace"
    )]
    UnknownOption(String),
    /// An option's value is invalid.
    #[error("invalid value {value:?} for nats option {name}")]
    BadValue {
        /// The option.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The URL itself is invalid.
    #[error("invalid nats URL: {0}")]
    Url(String),
}

/// How a node proves who it is to the NATS servers. `Debug` never shows the
/// secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// None.
    #[default]
    None,
    /// `nats://TOKEN@host`.
    Token(String),
    /// `nats://USER:PASS@host`.
    UserPassword(String, String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(***)",
            Credentials::UserPassword(..) => "UserPassword(***)",
        })
    }
}

/// Options of a NATS backplane.
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The servers to connect to (`host:port`); the client also learns the
    /// rest of a NATS cluster from them.
    pub servers: Vec<String>,
    /// `tls://`: the connection must be TLS, the server checked against the
    /// system's trust store.
    pub tls: bool,
    /// Never shown in logs or `Debug`.
    pub credentials: Credentials,
    /// Core or JetStream.
    pub mode: Mode,
    /// First tokens of every subject (and the JetStream stream's name), so
    /// that deployments sharing a NATS never see each other.
    pub prefix: String,
    /// A node not heard from for this long is dead: it leaves every answer.
    /// Nodes announce themselves every third of it.
    pub node_ttl: Duration,
    /// JetStream: most messages the stream keeps for one node; beyond them
    /// the oldest are discarded and counted by the receiver.
    pub queue_cap: i64,
    /// JetStream: how long a message waits for its node; a node restarted
    /// within this gets what arrived while it was down.
    pub queue_age: Duration,
    /// JetStream: on start, how long a node waits before delivering a backlog
    /// left from its previous life, so that reconnecting clients receive it.
    pub backlog_grace: Duration,
    /// JetStream: copies of the stream and the consumers the NATS cluster
    /// keeps (1 to 5); 3 survive the loss of one server of three.
    pub replicas: usize,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.display_url())
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("node_ttl", &self.node_ttl)
            .field("queue_cap", &self.queue_cap)
            .field("queue_age", &self.queue_age)
            .field("replicas", &self.replicas)
            .field("backlog_grace", &self.backlog_grace)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        // Invariant: a constant, valid URL.
        Self::from_url("nats://127.0.0.1:4222").expect("the default URL parses")
    }
}

fn bad(name: &'static str, v: &str) -> ConfigError {
    ConfigError::BadValue {
        name,
        value: v.to_owned(),
    }
}

/// Whether `s` can be a subject token: NATS reserves `.`, `*`, `>` and
/// whitespace, and a JetStream stream name (the prefix) also excludes `/`
/// and `\`, so only a safe alphabet passes.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// `%XX` decoding of a URL's user or password.
fn unescape(s: &str) -> Result<String, ConfigError> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConfigError::Url("bad %-escape in the credentials".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConfigError::Url("credentials are not UTF-8".into()))
}

impl NatsConfig {
    /// Parses `nats://[USER:PASS@|TOKEN@]HOST:PORT[,HOST:PORT...][?mode=core|jetstream&prefix=P&ttl=S&queue_cap=N&queue_age=S&replicas=N&backlog_grace=S]`;
    /// `tls://` requires TLS.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("nats://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("tls://") {
            (true, r)
        } else {
            return Err(ConfigError::Url(
                "the scheme is not nats:// or tls://".into(),
            ));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => Credentials::None,
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => Credentials::UserPassword(unescape(user)?, unescape(pass)?),
                None => Credentials::Token(unescape(u)?),
            },
        };
        let servers: Vec<String> = hosts
            .split(',')
            .map(|h| {
                let h = h.trim();
                let ok = !h.is_empty()
                    && !h.contains('/')
                    && h.rsplit_once(':')
                        .is_none_or(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if ok {
                    Ok(if h.contains(':') {
                        h.to_owned()
                    } else {
                        format!("{h}:4222")
                    })
                } else {
                    Err(ConfigError::Url(format!("bad server {h:?}")))
                }
            })
            .collect::<Result<_, _>>()?;
        let mut cfg = NatsConfig {
            servers,
            tls,
            credentials,
            mode: Mode::Core,
            prefix: "sb".into(),
            node_ttl: Duration::from_secs(10),
            queue_cap: 100_000,
            queue_age: Duration::from_secs(60),
            replicas: 1,
            backlog_grace: Duration::from_secs(5),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            cfg.set(k, v)?;
        }
        Ok(cfg)
    }

    /// Sets one option by name, as in the URL query.
    pub fn set(&mut self, option: &str, v: &str) -> Result<(), ConfigError> {
        let secs = |name: &'static str, min: f64| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= min)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad(name, v))
        };
        match option {
            "mode" => {
                self.mode = match v {
                    "core" => Mode::Core,
                    "jetstream" => Mode::JetStream,
                    _ => return Err(bad("mode", v)),
                }
            }
            "prefix" if is_token(v) => self.prefix = v.to_owned(),
            "prefix" => return Err(bad("prefix", v)),
            "ttl" => self.node_ttl = secs("ttl", 0.3)?,
            "queue_age" => self.queue_age = secs("queue_age", 1.0)?,
            "backlog_grace" => self.backlog_grace = secs("backlog_grace", 0.0)?,
            "replicas" => {
                self.replicas = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=5).contains(n))
                    .ok_or_else(|| bad("replicas", v))?;
            }
            "queue_cap" => {
                self.queue_cap = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("queue_cap", v))?;
            }
            other => return Err(ConfigError::UnknownOption(other.to_owned())),
        }
        Ok(())
    }

    /// The URL without credentials, for logs.
    pub fn display_url(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        let who = match &self.credentials {
            Credentials::None => "",
            Credentials::Token(_) => "***@",
            Credentials::UserPassword(..) => "***:***@",
        };
        format!(
            "{scheme}://{who}{}?mode={}&prefix={}",
            self.servers.join(","),
            self.mode,
            self.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_credentials_and_options() {
        let c = NatsConfig::from_url(
            "nats://u%40x:p%3Aw@127.0.0.1:4222,h2?mode=jetstream&prefix=chat_1&ttl=3&queue_cap=5&queue_age=30&replicas=3&backlog_grace=0.5",
        )
        .unwrap();
        assert_eq!(c.servers, vec!["127.0.0.1:4222", "h2:4222"]);
        assert_eq!(
            c.credentials,
            Credentials::UserPassword("u@x".into(), "p:w".into())
        );
        assert_eq!(c.mode, Mode::JetStream);
        assert_eq!(c.prefix, "chat_1");
        assert_eq!(c.node_ttl, Duration::from_secs(3));
        assert_eq!((c.queue_cap, c.queue_age), (5, Duration::from_secs(30)));
        assert_eq!(c.replicas, 3);
        assert_eq!(c.backlog_grace, Duration::from_millis(500));
        assert!(!c.tls);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("p:w") && !shown.contains("u@x"),
            "credentials never shown: {shown}"
        );

        let t = NatsConfig::from_url("tls://s3cr3t@nats.example:4443").unwrap();
        assert!(t.tls);
        assert_eq!(t.credentials, Credentials::Token("s3cr3t".into()));
        assert!(!t.display_url().contains("s3cr3t"));
        assert_eq!(t.mode, Mode::Core);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for bad in [
            "redis://h",
            "nats://",
            "nats://h:notaport",
            "nats://h/x",
            "nats://h?mode=fanout",
            "nats://h?prefix=a.b",
            "nats://h?prefix=a*",
            "nats://h?prefix=",
            "nats://h?ttl=0.1",
            "nats://h?queue_cap=0",
            "nats://h?replicas=0",
            "nats://h?replicas=6",
            "nats://h?color=red",
            "nats://u:%zz@h",
        ] {
            assert!(NatsConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
