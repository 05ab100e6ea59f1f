//! Test clients speaking the reference app's protocol over WebSocket or TCP.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::STEP;

/// Which transport a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Tcp,
}

/// A socket, or TLS over one.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket underneath.
    fn tcp(&self) -> &TcpStream;
}

impl Duplex for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Duplex for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

type Ws = WebSocketStream<Box<dyn Duplex>>;

/// The WebSocket handshake of `req` on a connection to `addr`, over TLS
/// trusting `tls`'s roots when given; within [`STEP`].
async fn ws_open(
    addr: SocketAddr,
    req: impl IntoClientRequest + Unpin,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Ws> {
    let stream: Box<dyn Duplex> = match tls {
        Some(tls) => Box::new(tls_connect(addr, tls).await?),
        None => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    };
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, stream))
        .await
        .context("ws connect timed out")??;
    Ok(ws)
}

type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn WriteSide>;

/// The writing half of a TCP client's connection.
trait WriteSide: AsyncWrite + Unpin + Send {
    /// Sets `SO_LINGER` to zero and lets go of the half without shutting
    /// the socket's writing down (no FIN): the socket closes, with a reset,
    /// when the reading half is dropped too. An error where the half does
    /// not reach the socket.
    fn reset(self: Box<Self>) -> Result<()>;
}

impl WriteSide for tokio::net::tcp::OwnedWriteHalf {
    fn reset(self: Box<Self>) -> Result<()> {
        let tcp: &TcpStream = (*self).as_ref();
        tcp.set_zero_linger().context("setting SO_LINGER to zero")?;
        // Dropped, the half would shut the writing down first: a FIN.
        (*self).forget();
        Ok(())
    }
}

/// TLS split in halves: neither reaches the socket.
impl WriteSide for tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>> {
    fn reset(self: Box<Self>) -> Result<()> {
        bail!("a TCP client over TLS cannot reach its socket to reset it")
    }
}

enum Io {
    Ws(Box<Ws>),
    /// A socket or TLS over one.
    Tcp {
        read: Reader,
        write: Writer,
    },
}

/// A TLS client configuration that trusts only the CA certificates of this
/// PEM.
pub fn tls_trusting(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A TLS handshake with `addr`, checking its certificate for its IP address
/// against `tls`'s roots.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let connect = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream);
    Ok(tokio::time::timeout(STEP, connect)
        .await
        .context("TLS handshake timed out")??)
}

fn split_tcp(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (BufReader::new(Box::new(r)), Box::new(w))
}

/// A connected, welcomed client.
pub struct Client {
    io: Io,
    /// The connection id from the welcome frame.
    pub conn: String,
    /// The node from the welcome frame.
    pub node: String,
    /// The user id it connected as.
    pub uid: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({} {} on {})", self.uid, self.conn, self.node)
    }
}

/// What a client saw next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Text(String),
    Binary(Vec<u8>),
    /// Closed, with the WebSocket close code when there was one.
    Closed(Option<u16>),
}

/// The upgrade request for `/ws?{query}` with extra headers.
fn ws_request(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<http::Request<()>> {
    let mut req = format!("ws://{addr}/ws?{query}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes())?,
            http::HeaderValue::from_str(v)?,
        );
    }
    Ok(req)
}

impl Client {
    /// Connects over WebSocket as `uid` (optionally in `group`) and reads the welcome.
    pub async fn ws(addr: SocketAddr, uid: &str, group: Option<&str>) -> Result<Client> {
        let mut url = format!("ws://{addr}/ws?uid={uid}");
        if let Some(g) = group {
            url.push_str(&format!("&group={g}"));
        }
        let ws = ws_open(addr, url, None).await?;
        Self::welcomed(Io::Ws(Box::new(ws)), uid).await
    }

    /// Connects over WebSocket to `/ws?{query}` (a token, say) and reads the
    /// welcome; the uid is the one the welcome names.
    pub async fn ws_query(addr: SocketAddr, query: &str) -> Result<Client> {
        let url = format!("ws://{addr}/ws?{query}");
        let ws = ws_open(addr, url, None).await?;
        Self::welcomed(Io::Ws(Box::new(ws)), "").await
    }

    /// Connects over WebSocket to `/ws?{query}` with extra request headers,
    /// and reads the welcome.
    pub async fn ws_with_headers(
        addr: SocketAddr,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client> {
        let req = ws_request(addr, query, headers)?;
        let ws = ws_open(addr, req, None).await?;
        Self::welcomed(Io::Ws(Box::new(ws)), "").await
    }

    /// Asks for a WebSocket at `/ws?{query}` with extra headers, expecting a
    /// refusal: its HTTP status and body. An error if it was accepted.
    pub async fn ws_refused(
        addr: SocketAddr,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String)> {
        let req = ws_request(addr, query, headers)?;
        match ws_open(addr, req, None).await {
            Ok(_) => bail!("the WebSocket was accepted"),
            Err(e) => match e.downcast::<tokio_tungstenite::tungstenite::Error>()? {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    Ok((resp.status().as_u16(), body))
                }
                other => Err(other.into()),
            },
        }
    }

    /// Connects over `wss://` as `uid`, trusting `tls`'s roots, and reads
    /// the welcome.
    pub async fn wss(
        addr: SocketAddr,
        uid: &str,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Client> {
        let url = format!("wss://{addr}/ws?uid={uid}");
        let ws = ws_open(addr, url, Some(tls)).await?;
        Self::welcomed(Io::Ws(Box::new(ws)), uid).await
    }

    /// Connects over TCP and TLS, trusting `tls`'s roots, with a hello line
    /// as `uid`, and reads the welcome.
    pub async fn tcp_tls(
        addr: SocketAddr,
        uid: &str,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Client> {
        let (r, mut w) = tokio::io::split(tls_connect(addr, tls).await?);
        let hello = json!({"op": "hello", "uid": uid});
        w.write_all(format!("{hello}\n").as_bytes()).await?;
        Self::welcomed(
            Io::Tcp {
                read: BufReader::new(Box::new(r)),
                write: Box::new(w),
            },
            uid,
        )
        .await
    }

    /// Connects over TCP, sends `hello` as its first line, and reads the
    /// welcome; the uid is the one the welcome names.
    pub async fn tcp_hello(addr: SocketAddr, hello: &Value) -> Result<Client> {
        let (read, write) = Self::tcp_send_hello(addr, hello).await?;
        Self::welcomed(Io::Tcp { read, write }, "").await
    }

    /// Connects over TCP and sends `hello`, expecting a refusal: the line it
    /// got before the server closed. An error if it was welcomed.
    pub async fn tcp_refused(addr: SocketAddr, hello: &Value) -> Result<Value> {
        let (mut read, _write) = Self::tcp_send_hello(addr, hello).await?;
        let mut line = String::new();
        tokio::time::timeout(STEP, read.read_line(&mut line))
            .await
            .context("no answer to the hello")??;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{line:?}"))?;
        if v["op"] == "welcome" {
            bail!("the hello was welcomed: {v}");
        }
        let mut rest = String::new();
        let n = tokio::time::timeout(STEP, read.read_line(&mut rest))
            .await
            .context("not closed after the refusal")??;
        if n != 0 {
            bail!("more after the refusal: {rest:?}");
        }
        Ok(v)
    }

    async fn tcp_send_hello(addr: SocketAddr, hello: &Value) -> Result<(Reader, Writer)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, mut w) = split_tcp(stream);
        w.write_all(format!("{hello}\n").as_bytes()).await?;
        Ok((r, w))
    }

    /// Connects over WebSocket at a non-default path.
    pub async fn connect_path(addr: SocketAddr, path: &str, uid: &str) -> Result<Client> {
        let url = format!("ws://{addr}{path}?uid={uid}");
        let ws = ws_open(addr, url, None).await?;
        Self::welcomed(Io::Ws(Box::new(ws)), uid).await
    }

    /// Connects over TCP with a hello line and reads the welcome.
    pub async fn tcp(addr: SocketAddr, uid: &str, group: Option<&str>) -> Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = split_tcp(stream);
        let mut hello = json!({"op": "hello", "uid": uid});
        if let Some(g) = group {
            hello["group"] = json!(g);
        }
        write.write_all(format!("{hello}\n").as_bytes()).await?;
        Self::welcomed(Io::Tcp { read, write }, uid).await
    }

    /// Connects with the given transport.
    pub async fn connect(
        kind: Kind,
        addr: SocketAddr,
        uid: &str,
        group: Option<&str>,
    ) -> Result<Client> {
        match kind {
            Kind::Ws => Self::ws(addr, uid, group).await,
            Kind::Tcp => Self::tcp(addr, uid, group).await,
        }
    }

    async fn welcomed(io: Io, uid: &str) -> Result<Client> {
        let mut c = Client {
            io,
            conn: String::new(),
            node: String::new(),
            uid: uid.to_owned(),
        };
        let w = c.recv_json().await.context("reading the welcome")?;
        if w["op"] != "welcome" {
            bail!("first frame is not a welcome: {w}");
        }
        c.conn = w["conn"]
            .as_str()
            .ok_or_else(|| anyhow!("welcome without conn: {w}"))?
            .to_owned();
        c.node = w["node"]
            .as_str()
            .ok_or_else(|| anyhow!("welcome without node: {w}"))?
            .to_owned();
        if let Some(uid) = w["uid"].as_str() {
            c.uid = uid.to_owned();
        }
        Ok(c)
    }

    /// Sends one raw text message (a frame, or a line on TCP).
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        match &mut self.io {
            Io::Ws(ws) => ws.send(Message::text(text)).await?,
            Io::Tcp { write, .. } => {
                let mut line = Vec::with_capacity(text.len() + 1);
                line.extend_from_slice(text.as_bytes());
                line.push(b'\n');
                write.write_all(&line).await?;
            }
        }
        Ok(())
    }

    /// Sends one raw message of bytes (a binary frame, or raw bytes on TCP).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.io {
            Io::Ws(ws) => ws.send(Message::binary(bytes.to_vec())).await?,
            Io::Tcp { write, .. } => write.write_all(bytes).await?,
        }
        Ok(())
    }

    /// Sends a JSON request.
    pub async fn send(&mut self, v: Value) -> Result<()> {
        self.send_text(&v.to_string()).await
    }

    /// The next event, within `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Result<Event> {
        let fut = async {
            match &mut self.io {
                Io::Ws(ws) => loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => return Ok(Event::Text(t.to_string())),
                        Some(Ok(Message::Binary(b))) => return Ok(Event::Binary(b.to_vec())),
                        Some(Ok(Message::Close(cf))) => {
                            return Ok(Event::Closed(cf.map(|c| c.code.into())));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Ok(Event::Closed(None)),
                    }
                },
                Io::Tcp { read, .. } => {
                    let mut line = String::new();
                    match read.read_line(&mut line).await {
                        Ok(0) | Err(_) => Ok(Event::Closed(None)),
                        Ok(_) => {
                            if line.ends_with('\n') {
                                line.pop();
                            }
                            Ok(Event::Text(line))
                        }
                    }
                }
            }
        };
        tokio::time::timeout(wait, fut)
            .await
            .map_err(|_| anyhow!("{self:?}: nothing within {wait:?}"))?
    }

    /// The next text frame; fails on anything else or after [`STEP`].
    pub async fn recv(&mut self) -> Result<String> {
        match self.next_event(STEP).await? {
            Event::Text(t) => Ok(t),
            other => bail!("{self:?}: expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame as JSON.
    pub async fn recv_json(&mut self) -> Result<Value> {
        let t = self.recv().await?;
        serde_json::from_str(&t).with_context(|| format!("not JSON: {t:?}"))
    }

    /// Sends a request and returns the next frame as JSON (for replies).
    pub async fn ask(&mut self, v: Value) -> Result<Value> {
        self.send(v).await?;
        self.recv_json().await
    }

    /// Asserts nothing arrives within `wait` (a weak check; prefer fences).
    pub async fn expect_silence(&mut self, wait: Duration) -> Result<()> {
        match self.next_event(wait).await {
            Err(_) => Ok(()),
            Ok(e) => bail!("{self:?}: expected nothing, got {e:?}"),
        }
    }

    /// Waits for the connection to be closed by the server; returns the close code.
    pub async fn expect_closed(&mut self, wait: Duration) -> Result<Option<u16>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                Event::Closed(code) => return Ok(code),
                _ => continue,
            }
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        match self.io {
            Io::Ws(mut ws) => {
                let _ = ws.send(Message::Close(None)).await;
                // Read until the server's close reply, so the close is clean.
                let _ = tokio::time::timeout(STEP, async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            }
            Io::Tcp { mut write, .. } => {
                let _ = write.shutdown().await;
            }
        }
    }

    /// Drops the connection without any close handshake (abrupt disconnect).
    pub fn abort(self) {
        drop(self);
    }

    /// Resets the connection: with `SO_LINGER` at zero, closing the socket
    /// sends the server a TCP RST (no FIN, no close frame), and whatever the
    /// server sent that the client had not read yet is discarded, as when a
    /// client's network fails under it. An error for a TCP client over TLS
    /// (its halves do not reach the socket); the connection is dropped all
    /// the same.
    pub fn reset(self) -> Result<()> {
        let who = format!("{self:?}");
        match self.io {
            Io::Ws(ws) => ws
                .get_ref()
                .tcp()
                .set_zero_linger()
                .context("setting SO_LINGER to zero"),
            // The reading half goes last, and closes the socket.
            Io::Tcp { write, .. } => write.reset(),
        }
        .with_context(|| format!("{who}: resetting"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const WELCOME: &str = r#"{"op":"welcome","conn":"c1","node":"n0"}"#;

    /// What a server reading from a client that resets gets: a reset, not an
    /// end of stream.
    #[tokio::test]
    async fn a_reset_reaches_the_server_as_a_reset_over_tcp_and_websocket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = String::new();
            let mut r = BufReader::new(&mut s);
            r.read_line(&mut hello).await.unwrap();
            s.write_all(format!("{WELCOME}\n").as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            s.read(&mut buf).await
        });
        let c = Client::tcp(addr, "u", None).await.unwrap();
        c.reset().unwrap();
        let read = server.await.unwrap();
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            ws.send(Message::text(WELCOME)).await.unwrap();
            ws.next().await
        });
        let c = Client::ws(addr, "u", None).await.unwrap();
        c.reset().unwrap();
        match server.await.unwrap() {
            Some(Err(tokio_tungstenite::tungstenite::Error::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
            }
            other => panic!("the server read {other:?}, not a reset"),
        }
    }
}
