//! Identifiers: nodes, connections, users and groups.
//!
//! A [`ConnId`] carries the id of the node that holds the socket, so any node can
//! route to a connection without a directory lookup (the "distributed fd"). Its
//! text form `NODE.SEQ` round-trips through `Display`/`FromStr`, which is what
//! applications hand to browsers and to other services.
//!
//! Connections held by a gateway use GatewayWorker's client id instead: the
//! gateway's node id is the 12 hex digits of its inner address (IPv4 and port)
//! and the sequence is its 32-bit connection id, so the text form is the
//! 20 hex digits PHP business workers already know (`7f000001326400000001`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest accepted node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Why a node id or connection id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// A node id is 1 to 64 bytes of `A-Z a-z 0-9 _ -`.
    #[error("invalid node id {0:?}: use 1 to 64 characters of A-Z a-z 0-9 _ -")]
    InvalidNode(String),
    /// A connection id is `NODE.SEQ` with SEQ in lowercase hex, or a
    /// 20-hex-digit gateway client id.
    #[error(
        "invalid connection id {0:?}: expected NODE.SEQ (SEQ in hex) or a 20-hex-digit client id"
    )]
    InvalidConn(String),
}

/// The id of one node of a cluster. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Checks and wraps a node id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, IdError> {
        let id = id.as_ref();
        let ok = !id.is_empty()
            && id.len() <= MAX_NODE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(Arc::from(id)))
        } else {
            Err(IdError::InvalidNode(id.to_owned()))
        }
    }

    /// A random id (`n-` and 10 hex digits), the default when none is configured.
    pub fn random() -> Self {
        let n: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
        Self(Arc::from(format!("n-{n:010x}")))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The node id of a gateway whose inner (worker-facing) address is
    /// `ip:port`: 12 lowercase hex digits, as in GatewayWorker client ids.
    pub fn gateway(ip: std::net::Ipv4Addr, port: u16) -> Self {
        Self(Arc::from(format!("{:08x}{port:04x}", u32::from(ip))))
    }

    /// The inner address of a gateway node, if this is a gateway node id.
    pub fn gateway_addr(&self) -> Option<std::net::SocketAddrV4> {
        if !is_lower_hex(&self.0, GATEWAY_NODE_LEN) {
            return None;
        }
        let ip = u32::from_str_radix(&self.0[..8], 16).ok()?;
        let port = u16::from_str_radix(&self.0[8..], 16).ok()?;
        Some(std::net::SocketAddrV4::new(ip.into(), port))
    }
}

/// Length of a gateway node id: 8 hex digits of IPv4 and 4 of port.
const GATEWAY_NODE_LEN: usize = 12;

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0.to_string()
    }
}

/// A cluster-wide connection id: the node that holds the socket and a sequence
/// number local to that node.
///
/// Sequence numbers start at the node's start time in microseconds, so a node
/// restarted under the same id does not hand out the ids of its previous life.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId {
    node: NodeId,
    seq: u64,
}

impl ConnId {
    /// A connection id from its parts.
    pub fn new(node: NodeId, seq: u64) -> Self {
        Self { node, seq }
    }

    /// The node holding the socket.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The node-local sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the text form is a GatewayWorker client id (20 hex digits).
    fn is_client_id(&self) -> bool {
        self.seq <= u64::from(u32::MAX) && self.node.gateway_addr().is_some()
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_client_id() {
            write!(f, "{}{:08x}", self.node, self.seq)
        } else {
            write!(f, "{}.{:x}", self.node, self.seq)
        }
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnId({self})")
    }
}

impl FromStr for ConnId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::InvalidConn(s.to_owned());
        if is_lower_hex(s, GATEWAY_NODE_LEN + 8) {
            let seq = u64::from_str_radix(&s[GATEWAY_NODE_LEN..], 16).map_err(|_| bad())?;
            let node = NodeId(Arc::from(&s[..GATEWAY_NODE_LEN]));
            return Ok(Self { node, seq });
        }
        let (node, seq) = s.rsplit_once('.').ok_or_else(bad)?;
        // Only the canonical form (lowercase hex, no leading zeros, no sign) is
        // accepted, so that text and value map one to one.
        let canonical = !seq.is_empty()
            && seq.len() <= 16
            && seq.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && (seq == "0" || !seq.starts_with('0'));
        if !canonical {
            return Err(bad());
        }
        let seq = u64::from_str_radix(seq, 16).map_err(|_| bad())?;
        let node = NodeId::new(node).map_err(|_| bad())?;
        let id = Self { node, seq };
        // A gateway connection has exactly one text form, the client id.
        if id.is_client_id() {
            return Err(bad());
        }
        Ok(id)
    }
}

macro_rules! name_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                Self(Arc::from(s.as_str()))
            }
        }

        impl From<Arc<str>> for $name {
            fn from(s: Arc<str>) -> Self {
                Self(s)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// An application user id. A user may hold many connections, on any nodes.
    UserId
);
name_type!(
    /// A group name. Connections join and leave groups; pushes can target them.
    GroupId
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn node_id_rules() {
        assert!(NodeId::new("node-1_a").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a.b").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        let r = NodeId::random();
        assert_eq!(NodeId::new(r.as_str()).as_ref(), Ok(&r));
    }

    #[test]
    fn conn_id_text_form() {
        let c = ConnId::new(NodeId::new("n1").unwrap(), 0x1f);
        assert_eq!(c.to_string(), "n1.1f");
        assert_eq!("n1.1f".parse::<ConnId>().unwrap(), c);
        for bad in [
            "n1",
            "n1.",
            ".1",
            "n1.01",
            "n1.1F",
            "n1.+1",
            "n1.x",
            "a.b.1",
            "n1.11111111111111111",
        ] {
            assert!(bad.parse::<ConnId>().is_err(), "{bad} accepted");
        }
        assert_eq!("n1.0".parse::<ConnId>().unwrap().seq(), 0);
    }

    #[test]
    fn gateway_conn_ids_are_client_ids() {
        // 127.0.0.1, inner port 12900, connection 1 (GatewayWorker's Context::addressToClientId).
        let gw = NodeId::gateway(std::net::Ipv4Addr::LOCALHOST, 12900);
        assert_eq!(gw.as_str(), "7f0000013264");
        assert_eq!(gw.gateway_addr(), Some("127.0.0.1:12900".parse().unwrap()));
        let c = ConnId::new(gw.clone(), 1);
        assert_eq!(c.to_string(), "7f000001326400000001");
        assert_eq!("7f000001326400000001".parse::<ConnId>().unwrap(), c);
        // One text form per value: the dotted form of a client id is refused.
        assert!("7f0000013264.1".parse::<ConnId>().is_err());
        assert!("7F000001326400000001".parse::<ConnId>().is_err());
        assert!("7f00000132640000001".parse::<ConnId>().is_err());
        // Beyond 32 bits the dotted form is the only one.
        let big = ConnId::new(gw, 1 << 40);
        assert_eq!(big.to_string().parse::<ConnId>().unwrap(), big);
        assert_eq!(NodeId::new("n1").unwrap().gateway_addr(), None);
    }

    proptest! {
        #[test]
        fn conn_id_round_trips(node in "[A-Za-z0-9_-]{1,64}", seq in any::<u64>()) {
            let c = ConnId::new(NodeId::new(&node).unwrap(), seq);
            prop_assert_eq!((c.node().as_str(), c.seq()), (node.as_str(), seq));
            let text = c.to_string();
            prop_assert_eq!(text.parse::<ConnId>().unwrap(), c.clone());
            let bin = postcard::to_allocvec(&c).unwrap();
            prop_assert_eq!(postcard::from_bytes::<ConnId>(&bin).unwrap(), c);
        }

        #[test]
        fn conn_id_parse_never_panics(s in ".{0,80}") {
            if let Ok(c) = s.parse::<ConnId>() {
                prop_assert_eq!(c.to_string(), s);
            }
        }
    }

    #[test]
    fn random_node_ids_have_ten_hex_digits() {
        for _ in 0..64 {
            let id = NodeId::random();
            let hex = id.as_str().strip_prefix("n-").expect("n- prefix");
            assert_eq!(hex.len(), 10, "{id:?}");
            assert!(u64::from_str_radix(hex, 16).is_ok(), "{id:?}");
        }
        assert_ne!(NodeId::random(), NodeId::random());
    }
}
