//! Who may connect to a node, and what its clients may do: the security
//! settings of `switchboard serve` (docs/SECURITY.md).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use switchboard::auth::proxy::ConnectProxy;
use switchboard::auth::{JwtVerifier, Permissions};

/// How a node's clients are authenticated and limited.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Security {
    /// Tokens are checked with this; `None`: clients name their own uid
    /// (`?uid=`), as in development.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// The backend is asked whether to accept each connection.
    pub proxy: Option<ConnectProxy>,
    /// Rules every authenticated client has, besides its token's.
    pub can: Permissions,
    /// Browser origins allowed to open a WebSocket (patterns, `*` any run);
    /// `None`: any. A request without an `Origin` (not a browser) is not
    /// concerned.
    pub origins: Option<Vec<String>>,
    /// Most connections one uid may hold across the cluster.
    pub max_conns_per_uid: Option<usize>,
    /// Time a connection whose token expired has to present a fresh one
    /// (`refresh`) before it is closed.
    pub refresh_grace: Duration,
}

impl Security {
    /// No authentication: every client names its uid and may do anything.
    /// For tests and development; `serve` allows it on loopback only, or with
    /// `--insecure`.
    pub fn open() -> Self {
        Self {
            jwt: None,
            proxy: None,
            can: Permissions::everything(),
            origins: None,
            max_conns_per_uid: None,
            refresh_grace: Duration::from_secs(10),
        }
    }

    /// Whether clients are authenticated.
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some() || self.proxy.is_some()
    }

    /// Whether a browser page from `origin` may connect.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.origins.as_ref().is_none_or(|list| {
            list.iter()
                .any(|p| switchboard::auth::pattern_matches(p, origin))
        })
    }
}

impl Default for Security {
    fn default() -> Self {
        Self::open()
    }
}

/// The origins of pages served from this machine: what development mode
/// allows, so that a web page elsewhere cannot drive a developer's node.
pub const LOOPBACK_ORIGINS: [&str; 7] = [
    "http://127.0.0.1:*",
    "http://localhost:*",
    "http://[::1]:*",
    // The console of a node served with --tls-cert.
    "https://127.0.0.1:*",
    "https://localhost:*",
    "https://[::1]:*",
    "null",
];

/// Whether a listen address only accepts connections from this machine.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_told_apart() {
        for a in ["127.0.0.1:9001", "127.0.0.2:1", "[::1]:9", "localhost:80"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:9001", "[::]:9", "10.0.0.1:1", "example.com:80"] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn origins_match_the_allow_list() {
        let mut s = Security::open();
        assert!(s.origin_allowed("https://evil.example"));
        s.origins = Some(LOOPBACK_ORIGINS.iter().map(|s| s.to_string()).collect());
        assert!(s.origin_allowed("http://127.0.0.1:9001"));
        assert!(s.origin_allowed("http://localhost:3000"));
        assert!(!s.origin_allowed("https://evil.example"));
        assert!(!s.origin_allowed("http://127.0.0.1.evil.example"));
    }
}
