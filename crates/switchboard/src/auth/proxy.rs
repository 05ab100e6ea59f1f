//! A connect proxy: the node asks the application's backend, over HTTP,
//! whether to accept each connection, and as whom.
//!
//! The node POSTs the connection's facts as JSON:
//!
//! ```json
//! {"conn":"n1.6f","node":"n1","transport":"websocket","remote_addr":"10.0.0.7:51234",
//!  "path":"/ws","query":"room=4","headers":{"authorization":"Bearer ...","cookie":"..."},
//!  "hello":null}
//! ```
//!
//! (`hello`: the TCP hello as JSON, or as a string when it is not JSON.) A
//! `200` answer with `{"uid":"alice","groups":["lobby"],"session":{...},"can":[...]}`
//! accepts it, as the claims of a token would (`docs/SECURITY.md`). Any
//! other status refuses it, with the answer's `reason` (a JSON field, or the
//! body as text) when there is one; so does no answer within the timeout, or
//! too many connections already waiting for one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::{Claims, Identity, identity};
use crate::handler::{ConnectInfo, Reject, Transport};

/// Largest answer read from the backend.
const MAX_ANSWER: usize = 64 * 1024;

/// Where and how to ask.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// The backend's address (`http://` only: a backend on the node's
    /// private network).
    pub addr: SocketAddr,
    /// The host header to send.
    pub host: String,
    /// The path to POST to.
    pub path: String,
    /// How long an answer may take.
    pub timeout: Duration,
    /// Connections waiting for an answer at once, at most; more are refused.
    pub concurrency: usize,
    /// Request headers passed on, lower-case names.
    pub headers: Vec<String>,
}

impl ProxyConfig {
    /// Reads `http://HOST:PORT/PATH`; the host must be an IP address or
    /// resolve now.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("connect proxy {url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .map_err(|e| format!("connect proxy {url:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("connect proxy {url:?}: no address"))?;
        Ok(Self {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
            timeout: Duration::from_secs(5),
            concurrency: 64,
            headers: [
                "authorization",
                "cookie",
                "origin",
                "user-agent",
                "x-forwarded-for",
            ]
            .map(str::to_owned)
            .to_vec(),
        })
    }
}

/// Asks the backend; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnectProxy {
    cfg: Arc<ProxyConfig>,
    slots: Arc<Semaphore>,
}

/// Why the proxy refused a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The backend said no.
    #[error("refused by the connect proxy: {reason}")]
    Refused {
        /// The backend's status.
        status: u16,
        /// Its reason.
        reason: String,
    },
    /// The backend could not be asked, or did not answer in time.
    #[error("the connect proxy is unavailable: {0}")]
    Unavailable(String),
    /// The backend's answer is not an identity.
    #[error("the connect proxy answered badly: {0}")]
    BadAnswer(String),
}

impl ProxyError {
    /// The refusal of the connection: the backend's 401 or 403 as it was,
    /// 403 for another refusal, 503 when the backend could not answer.
    pub fn reject(&self) -> Reject {
        let status = match self {
            ProxyError::Refused { status: 401, .. } => http::StatusCode::UNAUTHORIZED,
            ProxyError::Refused { .. } => http::StatusCode::FORBIDDEN,
            ProxyError::Unavailable(_) | ProxyError::BadAnswer(_) => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
        };
        Reject::new(self.to_string()).status(status)
    }
}

#[derive(Deserialize)]
struct Answer {
    uid: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    session: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    can: Vec<String>,
}

impl ConnectProxy {
    /// A proxy with these settings.
    pub fn new(cfg: ProxyConfig) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            cfg: Arc::new(cfg),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Asks whether to accept `info`, and as whom.
    pub async fn check(&self, info: &ConnectInfo) -> Result<Identity, ProxyError> {
        let Ok(_slot) = self.slots.try_acquire() else {
            return Err(ProxyError::Unavailable(format!(
                "{} connections are already waiting for it",
                self.cfg.concurrency
            )));
        };
        let body = self.facts(info).to_string();
        let (status, answer) = tokio::time::timeout(self.cfg.timeout, self.post(body))
            .await
            .map_err(|_| {
                ProxyError::Unavailable(format!("no answer within {:?}", self.cfg.timeout))
            })??;
        if status != 200 {
            let reason = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).trim().to_owned());
            let reason = if reason.is_empty() {
                format!("status {status}")
            } else {
                reason
            };
            return Err(ProxyError::Refused { status, reason });
        }
        let a: Answer = serde_json::from_slice(&answer)
            .map_err(|e| ProxyError::BadAnswer(format!("expected {{\"uid\":...}}: {e}")))?;
        identity(Claims {
            sub: a.uid,
            groups: a.groups,
            session: a.session,
            can: a.can,
            exp: None,
            nbf: None,
        })
        .map_err(|e| ProxyError::BadAnswer(e.to_string()))
    }

    fn facts(&self, info: &ConnectInfo) -> serde_json::Value {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .cfg
            .headers
            .iter()
            .filter_map(|name| {
                let v = info.headers.get(name.as_str())?.to_str().ok()?;
                Some((name.clone(), json!(v)))
            })
            .collect();
        let hello = info.hello.as_ref().map(|h| {
            serde_json::from_slice::<serde_json::Value>(h.data())
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(h.data())))
        });
        json!({
            "conn": info.conn.to_string(),
            "node": info.conn.node().as_str(),
            "transport": match info.transport {
                Transport::Tcp => "tcp",
                _ => "websocket",
            },
            "remote_addr": info.peer.map(|p| p.to_string()),
            "path": info.path,
            "query": info.query,
            "headers": headers,
            "hello": hello,
        })
    }

    async fn post(&self, body: String) -> Result<(u16, Bytes), ProxyError> {
        let down = |e: &dyn std::fmt::Display| ProxyError::Unavailable(e.to_string());
        let stream = tokio::net::TcpStream::connect(self.cfg.addr)
            .await
            .map_err(|e| down(&format!("connecting to {}: {e}", self.cfg.addr)))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| down(&e))?;
        let req = http::Request::post(self.cfg.path.as_str())
            .header(http::header::HOST, self.cfg.host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| down(&e))?;
        let response = sender.send_request(req);
        // One exchange per connection: driving the connection beside the
        // response leaves no task behind.
        drop(sender);
        let read = async {
            let response = response.await.map_err(|e| down(&e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| down(&format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let (answer, _) = tokio::join!(read, conn);
        answer
    }
}
