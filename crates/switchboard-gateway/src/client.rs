//! Pushing and asking from any process, like GatewayWorker's `GatewayClient`.
//!
//! [`Pusher`] finds the gateways through the register and writes
//! GatewayWorker commands to their inner ports: pushes to every gateway (or
//! only the one that holds a connection), queries to every gateway with the
//! replies merged. A gateway that cannot be reached or does not answer in
//! time is named in the answer's `missing` list rather than silently left
//! out.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use switchboard::core::{Answer, ConnId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::protocol::cmd;
use crate::protocol::frame::{Frame as GwFrame, Header};
use crate::protocol::php::{self, Value};
use crate::protocol::query::{Id, IdList, SendToGroup};

/// A push or query from outside the cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The register could not be asked.
    #[error("cannot get the gateway list from the register at {register}")]
    Register {
        /// The register's address.
        register: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection id names no gateway.
    #[error("{0} is not a gateway connection id")]
    NotAGatewayConn(String),
}

/// How long the register's gateway list is reused (GatewayWorker: 1 s).
const ADDRESS_CACHE: Duration = Duration::from_secs(1);

/// Pushes to and asks about the clients of a gateway cluster.
#[derive(Debug)]
pub struct Pusher {
    register: String,
    secret: String,
    timeout: Duration,
    cache: Mutex<Option<(Instant, Vec<String>)>>,
}

fn frame(c: u8, conn: u32, ext_data: Bytes, body: Bytes) -> GwFrame {
    GwFrame {
        header: Header {
            cmd: c,
            connection_id: conn,
            flag: cmd::FLAG_BODY_IS_SCALAR,
            ..Header::default()
        },
        ext_data,
        body,
    }
}

impl Pusher {
    /// A pusher using the register at `register` (`host:port`).
    pub fn new(register: impl Into<String>) -> Self {
        Self {
            register: register.into(),
            secret: String::new(),
            timeout: Duration::from_secs(5),
            cache: Mutex::new(None),
        }
    }

    /// The shared secret of the cluster.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// How long a gateway may take to answer (default 5 s, as GatewayWorker).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The gateways' inner addresses, from the register.
    pub async fn gateways(&self) -> Result<Vec<String>, PushError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, list)) = &*cache
            && at.elapsed() < ADDRESS_CACHE
        {
            return Ok(list.clone());
        }
        let list = crate::register_link::lookup(&self.register, &self.secret, self.timeout)
            .await
            .map_err(|source| PushError::Register {
                register: self.register.clone(),
                source,
            })?;
        *cache = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// The request bytes for one gateway: the auth frame first with a secret,
    /// as GatewayWorker does on every buffer.
    fn request(&self, f: &GwFrame) -> Bytes {
        let mut out = BytesMut::new();
        if !self.secret.is_empty() {
            GwFrame::gateway_client_connect(&self.secret).encode(&mut out);
        }
        f.encode(&mut out);
        out.freeze()
    }

    async fn write(&self, address: &str, bytes: &[u8]) -> std::io::Result<()> {
        let go = async {
            let mut s = TcpStream::connect(address).await?;
            s.write_all(bytes).await?;
            s.shutdown().await
        };
        tokio::time::timeout(self.timeout, go)
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)?
    }

    async fn ask(&self, address: &str, bytes: &[u8]) -> std::io::Result<Value> {
        let go = async {
            let mut s = TcpStream::connect(address).await?;
            s.write_all(bytes).await?;
            let len = s.read_u32().await? as usize;
            if len > 64 << 20 {
                return Err(std::io::Error::other("reply too large"));
            }
            let mut payload = vec![0; len];
            s.read_exact(&mut payload).await?;
            php::unserialize(&payload).map_err(std::io::Error::other)
        };
        tokio::time::timeout(self.timeout, go)
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)?
    }

    /// Sends one command to every gateway; returns the gateways it could not
    /// be written to.
    async fn broadcast(&self, f: GwFrame) -> Result<Answer<usize>, PushError> {
        let bytes = self.request(&f);
        let gateways = self.gateways().await?;
        let mut sent = 0;
        let mut missing = Vec::new();
        let writes = gateways.iter().map(|a| self.write(a, &bytes));
        for (a, r) in gateways
            .iter()
            .zip(futures_util::future::join_all(writes).await)
        {
            match r {
                Ok(()) => sent += 1,
                Err(_) => missing.extend(crate::gateway_node(a)),
            }
        }
        Ok(Answer {
            value: sent,
            missing,
        })
    }

    /// Asks every gateway and folds the answers with `fold`.
    async fn gather<T>(
        &self,
        f: GwFrame,
        init: T,
        mut fold: impl FnMut(T, &str, Value) -> T,
    ) -> Result<Answer<T>, PushError> {
        let bytes = self.request(&f);
        let gateways = self.gateways().await?;
        let asks = gateways.iter().map(|a| self.ask(a, &bytes));
        let mut acc = init;
        let mut missing = Vec::new();
        for (a, r) in gateways
            .iter()
            .zip(futures_util::future::join_all(asks).await)
        {
            match r {
                Ok(v) => acc = fold(acc, a, v),
                Err(_) => missing.extend(crate::gateway_node(a)),
            }
        }
        Ok(Answer {
            value: acc,
            missing,
        })
    }

    /// Pushes `data` to every client. Returns how many gateways took it.
    pub async fn to_all(&self, data: impl Into<Bytes>) -> Result<Answer<usize>, PushError> {
        self.broadcast(frame(cmd::SEND_TO_ALL, 0, Bytes::new(), data.into()))
            .await
    }

    /// Pushes `data` to every connection of these users.
    pub async fn to_users(
        &self,
        uids: &[&str],
        data: impl Into<Bytes>,
    ) -> Result<Answer<usize>, PushError> {
        let ext = Bytes::from(IdList(uids.iter().map(|u| Id::from(*u)).collect()).encode());
        self.broadcast(frame(cmd::SEND_TO_UID, 0, ext, data.into()))
            .await
    }

    /// Pushes `data` to every member of a group.
    pub async fn to_group(
        &self,
        group: &str,
        data: impl Into<Bytes>,
    ) -> Result<Answer<usize>, PushError> {
        let ext = SendToGroup {
            groups: vec![Id::from(group)],
            exclude: None,
        };
        let ext = Bytes::from(ext.encode());
        self.broadcast(frame(cmd::SEND_TO_GROUP, 0, ext, data.into()))
            .await
    }

    /// Pushes `data` to one connection (a GatewayWorker client id).
    pub async fn to_conn(&self, conn: &ConnId, data: impl Into<Bytes>) -> Result<bool, PushError> {
        let addr = conn
            .node()
            .gateway_addr()
            .ok_or_else(|| PushError::NotAGatewayConn(conn.to_string()))?;
        let f = frame(
            cmd::SEND_TO_ONE,
            conn.seq() as u32,
            Bytes::new(),
            data.into(),
        );
        Ok(self
            .write(&addr.to_string(), &self.request(&f))
            .await
            .is_ok())
    }

    /// Whether a user has a connection on any gateway.
    pub async fn is_online(&self, uid: &str) -> Result<Answer<bool>, PushError> {
        let f = frame(
            cmd::GET_CLIENT_ID_BY_UID,
            0,
            Bytes::copy_from_slice(uid.as_bytes()),
            Bytes::new(),
        );
        self.gather(f, false, |acc, _, v| {
            acc || matches!(v, Value::Array(a) if !a.is_empty())
        })
        .await
    }

    /// How many connections are in a group, over every gateway.
    pub async fn group_count(&self, group: &str) -> Result<Answer<u64>, PushError> {
        let f = frame(
            cmd::GET_CLIENT_COUNT_BY_GROUP,
            0,
            Bytes::copy_from_slice(group.as_bytes()),
            Bytes::new(),
        );
        self.gather(f, 0u64, |acc, _, v| match v {
            Value::Int(n) => acc + n.max(0) as u64,
            _ => acc,
        })
        .await
    }

    /// The connections of a user, over every gateway.
    pub async fn user_conns(&self, uid: &str) -> Result<Answer<Vec<ConnId>>, PushError> {
        let f = frame(
            cmd::GET_CLIENT_ID_BY_UID,
            0,
            Bytes::copy_from_slice(uid.as_bytes()),
            Bytes::new(),
        );
        self.gather(f, Vec::new(), |mut acc, address, v| {
            if let (Some(node), Value::Array(a)) = (crate::gateway_node(address), v) {
                for (_, id) in a.iter() {
                    if let Value::Int(id) = id {
                        acc.push(ConnId::new(node.clone(), *id as u64));
                    }
                }
            }
            acc
        })
        .await
    }
}
