//! The load tool's client: connects to a node of a server that speaks
//! `docs/CLIENT-PROTOCOL.md`, over WebSocket or TCP, from a chosen source address.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Where clients connect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    /// `ws://HOST:PORT/PATH`.
    Ws {
        /// Address.
        addr: SocketAddr,
        /// Path, `/ws` by default.
        path: String,
    },
    /// `tcp://HOST:PORT` (line framing).
    Tcp {
        /// Address.
        addr: SocketAddr,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("ws://") {
            let (host, path) = rest
                .split_once('/')
                .map_or((rest, "/ws".to_owned()), |(h, p)| (h, format!("/{p}")));
            Ok(Endpoint::Ws {
                addr: host
                    .parse()
                    .with_context(|| format!("bad address in {s}"))?,
                path,
            })
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(Endpoint::Tcp {
                addr: rest
                    .parse()
                    .with_context(|| format!("bad address in {s}"))?,
            })
        } else {
            bail!("endpoint {s:?}: use ws://HOST:PORT/PATH or tcp://HOST:PORT")
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The receiving half of a client.
pub enum Reader {
    /// WebSocket.
    Ws(SplitStream<Ws>),
    /// TCP, line framing.
    Tcp(BufReader<OwnedReadHalf>, String),
}

/// The sending half of a client.
pub enum Writer {
    /// WebSocket.
    Ws(SplitSink<Ws, Message>),
    /// TCP, line framing.
    Tcp(OwnedWriteHalf, Vec<u8>),
}

/// Nanoseconds since the epoch: the clock every process of the machine shares.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Reader {
    /// The next text message; `None` when the connection ends.
    pub async fn next(&mut self) -> Option<Result<String>> {
        match self {
            Reader::Ws(s) => loop {
                match s.next().await? {
                    Ok(Message::Text(t)) => return Some(Ok(t.as_str().to_owned())),
                    Ok(Message::Binary(b)) => {
                        return Some(Ok(String::from_utf8_lossy(&b).into_owned()));
                    }
                    Ok(Message::Close(_)) => return None,
                    Ok(_) => continue,
                    Err(e) => return Some(Err(e.into())),
                }
            },
            Reader::Tcp(r, line) => {
                line.clear();
                match r.read_line(line).await {
                    Ok(0) => None,
                    Ok(_) => {
                        if line.ends_with('\n') {
                            line.pop();
                        }
                        Some(Ok(std::mem::take(line)))
                    }
                    Err(e) => Some(Err(e.into())),
                }
            }
        }
    }
}

impl Writer {
    /// Sends one text message.
    pub async fn send(&mut self, text: &str) -> Result<()> {
        match self {
            Writer::Ws(s) => s.send(Message::text(text)).await?,
            Writer::Tcp(w, buf) => {
                buf.clear();
                buf.extend_from_slice(text.as_bytes());
                buf.push(b'\n');
                w.write_all(buf).await?;
            }
        }
        Ok(())
    }

    /// Queues one text message without flushing (WebSocket), for bursts.
    pub async fn feed(&mut self, text: &str) -> Result<()> {
        match self {
            Writer::Ws(s) => s.feed(Message::text(text)).await?,
            Writer::Tcp(..) => self.send(text).await?,
        }
        Ok(())
    }

    /// Flushes what `feed` queued.
    pub async fn flush(&mut self) -> Result<()> {
        if let Writer::Ws(s) = self {
            s.flush().await?;
        }
        Ok(())
    }
}

/// A connected client and what its welcome said.
pub struct Conn {
    /// Receiving half.
    pub reader: Reader,
    /// Sending half.
    pub writer: Writer,
    /// Its connection id.
    pub conn: String,
}

/// Connects as `uid` (in `group`) from `source`, and reads the welcome.
pub async fn connect(
    endpoint: &Endpoint,
    source: IpAddr,
    uid: &str,
    group: Option<&str>,
    jwt_secret: Option<&str>,
) -> Result<Conn> {
    // A node with authentication on takes a token instead of `uid`: one for
    // this uid and group, allowed everything the scenarios do.
    let token = jwt_secret.map(|secret| {
        let claims = switchboard::auth::Claims {
            sub: uid.to_owned(),
            groups: group.map(str::to_owned).into_iter().collect(),
            can: vec!["*".to_owned()],
            exp: Some(switchboard::auth::now_secs() + 24 * 3600),
            ..Default::default()
        };
        switchboard::auth::mint_hs256(&claims, secret)
    });
    let addr = match endpoint {
        Endpoint::Ws { addr, .. } | Endpoint::Tcp { addr } => *addr,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding to {source}"))?;
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut reader, writer) = match endpoint {
        Endpoint::Ws { path, .. } => {
            let mut url = match &token {
                Some(t) => format!("ws://{addr}{path}?token={t}"),
                None => format!("ws://{addr}{path}?uid={uid}"),
            };
            if let Some(g) = group.filter(|_| token.is_none()) {
                url.push_str("&group=");
                url.push_str(g);
            }
            // Small buffers: the tool holds tens of thousands of connections.
            let cfg = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await?;
            let (w, r) = ws.split();
            (Reader::Ws(r), Writer::Ws(w))
        }
        Endpoint::Tcp { .. } => {
            let (r, mut w) = stream.into_split();
            let mut hello = json!({"op": "hello", "uid": uid});
            if let Some(g) = group {
                hello["group"] = json!(g);
            }
            if let Some(t) = &token {
                hello = json!({"op": "hello", "token": t});
            }
            w.write_all(format!("{hello}\n").as_bytes()).await?;
            (
                Reader::Tcp(BufReader::with_capacity(1024, r), String::new()),
                Writer::Tcp(w, Vec::new()),
            )
        }
    };
    let welcome = reader
        .next()
        .await
        .ok_or_else(|| anyhow!("closed before the welcome"))??;
    let v: serde_json::Value =
        serde_json::from_str(&welcome).with_context(|| format!("bad welcome {welcome:?}"))?;
    if v["op"] != "welcome" {
        bail!("first frame is not a welcome: {welcome}");
    }
    let conn = v["conn"].as_str().unwrap_or_default().to_owned();
    Ok(Conn {
        reader,
        writer,
        conn,
    })
}

/// The payload of a timed message: `SEQ NANOS ` padded with `x` to `size` bytes.
pub fn payload(seq: u64, size: usize) -> String {
    let mut s = format!("{seq} {} ", now_ns());
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Reads `SEQ NANOS` from a timed message, as pushed (verbatim) or as
/// recorded (`{"op":"push","stream":...,"pos":...,"data":"SEQ NANOS ..."}`,
/// when the nodes run with `--history-record`).
pub fn parse_payload(s: &str) -> Option<(u64, u64)> {
    if s.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        return parse_payload(v.get("data")?.as_str()?);
    }
    let mut it = s.splitn(3, ' ');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_payloads() {
        assert_eq!(
            "ws://127.0.0.1:9001/ws".parse::<Endpoint>().unwrap(),
            Endpoint::Ws {
                addr: "127.0.0.1:9001".parse().unwrap(),
                path: "/ws".into()
            }
        );
        assert!(matches!(
            "tcp://127.0.0.1:9101".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp { .. }
        ));
        assert!("http://x".parse::<Endpoint>().is_err());
        let p = payload(42, 64);
        assert_eq!(p.len(), 64);
        let (seq, ns) = parse_payload(&p).unwrap();
        assert_eq!(seq, 42);
        assert!(ns > 0);
        assert_eq!(parse_payload("x"), None);
        let recorded =
            serde_json::json!({"op": "push", "stream": "user:u", "pos": "1-a", "data": p})
                .to_string();
        assert_eq!(parse_payload(&recorded), Some((seq, ns)));
    }
}
