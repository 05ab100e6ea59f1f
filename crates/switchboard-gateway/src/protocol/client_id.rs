//! Client ids: which gateway and connection a client is (docs/GATEWAY-PROTOCOL.md §3.5).
//!
//! PHP's `Context::addressToClientId` writes `bin2hex(pack("NnN", local_ip,
//! local_port, connection_id))`: 20 lowercase hex digits. A worker reads the
//! gateway's inner address back out of it and writes to the link registered
//! under exactly that `ip:port` string.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::Header;

/// A client of a gateway: the gateway's inner address and the connection id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    /// The gateway's lanIp as a big-endian `u32` (`ip2long`).
    pub ip: u32,
    /// The gateway's inner port.
    pub port: u16,
    /// The connection id on that gateway.
    pub connection_id: u32,
}

impl ClientId {
    /// The client id a frame's header names (`local_ip`, `local_port`, `connection_id`).
    pub fn from_header(h: &Header) -> Self {
        Self {
            ip: h.local_ip,
            port: h.local_port,
            connection_id: h.connection_id,
        }
    }

    /// The gateway's inner address as the register advertises it: `a.b.c.d:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", Ipv4Addr::from(self.ip), self.port)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:08x}{:04x}{:08x}",
            self.ip, self.port, self.connection_id
        )
    }
}

/// A string that is not a client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientIdError {
    /// Not 20 bytes long (PHP refuses these too).
    #[error("client id must be 20 hex digits, got {0} bytes")]
    Length(usize),
    /// A byte that is not a hex digit.
    #[error("client id contains a non-hex character")]
    NotHex,
}

impl FromStr for ClientId {
    type Err = ClientIdError;

    /// Parses 20 hex digits; upper case is accepted, as PHP's `pack("H*")` does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 20 {
            return Err(ClientIdError::Length(s.len()));
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientIdError::NotHex);
        }
        // All 20 bytes are ASCII hex digits, so these slices and parses succeed.
        let field = |range: std::ops::Range<usize>| {
            u32::from_str_radix(&s[range], 16).map_err(|_| ClientIdError::NotHex)
        };
        Ok(Self {
            ip: field(0..8)?,
            port: u16::try_from(field(8..12)?).map_err(|_| ClientIdError::NotHex)?,
            connection_id: field(12..20)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn php_examples() {
        // synthetic.json client_id_examples.
        for (s, ip, port, conn, addr) in [
            (
                "7f000001326400000001",
                0x7f00_0001,
                12900,
                1,
                "127.0.0.1:12900",
            ),
            (
                "0a00000507d0ffffffff",
                167_772_165,
                2000,
                u32::MAX,
                "10.0.0.5:2000",
            ),
            (
                "c0a801020b5500010000",
                3_232_235_778,
                2901,
                65536,
                "192.168.1.2:2901",
            ),
        ] {
            let id: ClientId = s.parse().unwrap();
            assert_eq!(
                id,
                ClientId {
                    ip,
                    port,
                    connection_id: conn
                }
            );
            assert_eq!(id.to_string(), s);
            assert_eq!(id.address(), addr);
        }
        let upper: ClientId = "7F000001326400000001".parse().unwrap();
        assert_eq!(upper.to_string(), "7f000001326400000001");
    }

    #[test]
    fn refusals() {
        assert_eq!("".parse::<ClientId>(), Err(ClientIdError::Length(0)));
        assert_eq!(
            "7f00000132640000000".parse::<ClientId>(),
            Err(ClientIdError::Length(19))
        );
        assert_eq!(
            "7f0000013264000000011".parse::<ClientId>(),
            Err(ClientIdError::Length(21))
        );
        assert_eq!(
            "7f00000132640000000g".parse::<ClientId>(),
            Err(ClientIdError::NotHex)
        );
        assert_eq!(
            "+f000001326400000001".parse::<ClientId>(),
            Err(ClientIdError::NotHex)
        );
        assert_eq!(
            " 7f00000132640000001".parse::<ClientId>(),
            Err(ClientIdError::NotHex)
        );
        // 20 bytes but multi-byte characters.
        assert_eq!(
            "é7f0000013264000001".parse::<ClientId>(),
            Err(ClientIdError::NotHex)
        );
    }

    proptest! {
        #[test]
        fn round_trip(ip in any::<u32>(), port in any::<u16>(), connection_id in any::<u32>()) {
            let id = ClientId { ip, port, connection_id };
            let s = id.to_string();
            prop_assert_eq!(s.len(), 20);
            prop_assert_eq!(s.parse::<ClientId>(), Ok(id));
            prop_assert_eq!(s.to_uppercase().parse::<ClientId>(), Ok(id));
        }
    }
}
