//! The gateway topology as processes of the real binary: a register,
//! gateways and workers, each one `switchboard <role>` process; and
//! [`Inner`], a test's own connection to a gateway's inner port, for acting
//! as a GatewayWorker worker or pusher would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use bytes::BytesMut;
use switchboard::ConnId;
use switchboard_gateway::protocol::register::RegisterMessage;
use switchboard_gateway::protocol::{Frame, cmd};
use switchboard_gateway::{Worker, WorkerConfig};
use switchboard_server::app::ReferenceApp;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::Client;
use crate::client::Kind;
use crate::cluster::{Cluster, spawn_role};

/// Sends a signal (`-TERM`, `-KILL`) to a child and waits for it.
pub async fn signal(child: &mut Child, sig: &str) -> Result<()> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .await?;
    }
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    Ok(())
}

/// A register process.
#[derive(Debug)]
pub struct RegisterProc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl RegisterProc {
    /// Starts a register on `listen` (`127.0.0.1:0` for any port).
    pub async fn start(bin: &Path, listen: &str, secret: &str) -> Result<Self> {
        let (child, banner) = spawn_role(
            bin,
            &["register", "--listen", listen, "--secret", secret],
            |l| l.starts_with("switchboard register"),
        )
        .await?;
        let addr = banner
            .register
            .ok_or_else(|| anyhow!("no address: {banner:?}"))?;
        Ok(Self { child, addr })
    }
}

/// A gateway process.
#[derive(Debug)]
pub struct GatewayProc {
    pub child: Child,
    pub node_id: String,
    pub ws: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub inner: SocketAddr,
}

impl GatewayProc {
    /// Starts a gateway with the listeners asked for and `extra` flags.
    pub async fn start(
        bin: &Path,
        register: SocketAddr,
        ws: bool,
        tcp: bool,
        extra: &[&str],
    ) -> Result<Self> {
        let reg = register.to_string();
        let mut args = vec!["gateway", "--register", &reg, "--start-port", "0"];
        if ws {
            args.extend(["--ws", "127.0.0.1:0"]);
        }
        if tcp {
            args.extend(["--tcp", "127.0.0.1:0"]);
        }
        args.extend(extra);
        let (child, banner) =
            spawn_role(bin, &args, |l| l.trim_start().starts_with("inner ")).await?;
        let node = banner
            .nodes
            .first()
            .ok_or_else(|| anyhow!("no node: {banner:?}"))?;
        Ok(Self {
            node_id: node.id.clone(),
            ws: node.ws,
            tcp: node.tcp,
            inner: node
                .inner
                .ok_or_else(|| anyhow!("no inner port: {banner:?}"))?,
            child,
        })
    }

    /// The gateway's `/stats` (needs a WebSocket listener).
    pub async fn stats(&self) -> Result<serde_json::Value> {
        let addr = self
            .http()
            .ok_or_else(|| anyhow!("gateway has no HTTP listener"))?;
        let (_, body) = crate::services::http_get(addr, "/stats").await?;
        Ok(serde_json::from_str(&body)?)
    }

    fn http(&self) -> Option<SocketAddr> {
        self.ws
    }

    /// Polls the gateway's role counters (`/stats`, `role`) until `done`
    /// holds for them, and returns them; fails after [`crate::STEP`] with
    /// the last counters seen and `what` was awaited.
    pub async fn wait_role(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + crate::STEP;
        loop {
            let role = self.stats().await?["role"].clone();
            if done(&role) {
                return Ok(role);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("gateway {}: still not {what}: {role}", self.node_id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A worker process.
#[derive(Debug)]
pub struct WorkerProc {
    pub child: Child,
    /// The server API, when started with `--api`.
    pub api: Option<SocketAddr>,
}

impl WorkerProc {
    /// Starts a worker with `extra` flags.
    pub async fn start(bin: &Path, register: SocketAddr, extra: &[&str]) -> Result<Self> {
        let reg = register.to_string();
        let mut args = vec!["worker", "--register", &reg];
        args.extend(extra);
        let serves_api = extra.contains(&"--api");
        let (child, banner) = spawn_role(bin, &args, |l| {
            if serves_api {
                l.contains("/api/")
            } else {
                l.starts_with("switchboard worker")
            }
        })
        .await?;
        let api = banner.nodes.first().and_then(|n| n.api);
        Ok(Self { child, api })
    }

    /// SIGTERM, and wait for a clean exit.
    pub async fn stop(mut self) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??)
    }
}

/// A register, gateways and workers.
#[derive(Debug)]
pub struct GatewayCluster {
    pub bin: PathBuf,
    pub register: RegisterProc,
    pub gateways: Vec<GatewayProc>,
    pub workers: Vec<WorkerProc>,
    pub secret: String,
}

/// Which listeners each gateway has.
#[derive(Debug, Clone, Copy)]
pub enum Listeners {
    /// WebSocket only.
    Ws,
    /// TCP only.
    Tcp,
    /// Both.
    Both,
}

impl GatewayCluster {
    /// Starts a register, one gateway per entry of `gateways` and `workers`
    /// workers, and waits until every worker is attached to every gateway.
    pub async fn start(
        bin: &str,
        gateways: &[Listeners],
        workers: usize,
        secret: &str,
    ) -> Result<Self> {
        let bin = PathBuf::from(bin);
        let register = RegisterProc::start(&bin, "127.0.0.1:0", secret).await?;
        let mut gws = Vec::new();
        for l in gateways {
            let (ws, tcp) = match l {
                Listeners::Ws => (true, false),
                Listeners::Tcp => (false, true),
                Listeners::Both => (true, true),
            };
            gws.push(
                GatewayProc::start(&bin, register.addr, ws, tcp, &["--secret", secret]).await?,
            );
        }
        let mut ws = Vec::new();
        for _ in 0..workers {
            ws.push(WorkerProc::start(&bin, register.addr, &["--secret", secret]).await?);
        }
        let c = Self {
            bin,
            register,
            gateways: gws,
            workers: ws,
            secret: secret.to_owned(),
        };
        c.wait_attached(workers).await?;
        Ok(c)
    }

    /// Starts a register and one gateway per entry of `gateways` as
    /// processes, and `workers` workers running the reference app in this
    /// process, so that a test holds their hubs (a worker process hides its
    /// hub); waits until every worker is attached to every gateway. The
    /// workers are the caller's to shut down.
    pub async fn start_with_workers_here(
        bin: &str,
        gateways: &[Listeners],
        workers: usize,
        secret: &str,
    ) -> Result<(Self, Vec<Worker>)> {
        let c = Self::start(bin, gateways, 0, secret).await?;
        let mut started = Vec::new();
        for i in 0..workers {
            // Keys tell a host's workers apart: the default, from the process
            // id, would make each worker here replace the one before.
            let cfg = WorkerConfig::new(c.register.addr.to_string())
                .secret(secret)
                .key(format!("test:{i}"));
            started.push(Worker::start(cfg, Arc::new(ReferenceApp::default())).await?);
        }
        c.wait_attached(workers).await?;
        Ok((c, started))
    }

    /// Boxed, for the conformance suite.
    pub async fn boxed(
        bin: &str,
        gateways: &[Listeners],
        workers: usize,
    ) -> Result<Box<dyn Cluster>> {
        Ok(Box::new(Self::start(bin, gateways, workers, "").await?))
    }

    /// Waits until every gateway has `n` workers attached (gateways without
    /// an HTTP listener are checked through the others' workers).
    pub async fn wait_attached(&self, n: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + crate::STEP;
        for g in &self.gateways {
            if g.ws.is_none() {
                continue;
            }
            loop {
                let workers = g
                    .stats()
                    .await
                    .ok()
                    .and_then(|s| s["role"]["workers"].as_u64());
                if workers == Some(n as u64) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "gateway {} has {workers:?} workers, expected {n}",
                        g.node_id
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Workers link every gateway they are told of within a second; give
        // TCP-only gateways, which have no /stats, the same second.
        if self.gateways.iter().any(|g| g.ws.is_none()) {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        Ok(())
    }

    fn with(&self, kind: Kind) -> Vec<&GatewayProc> {
        self.gateways
            .iter()
            .filter(|g| match kind {
                Kind::Ws => g.ws.is_some(),
                Kind::Tcp => g.tcp.is_some(),
            })
            .collect()
    }

    fn pick(&self, i: usize, kind: Kind) -> &GatewayProc {
        let g = self.with(kind);
        g[i % g.len()]
    }
}

#[async_trait]
impl Cluster for GatewayCluster {
    fn size(&self) -> usize {
        self.gateways.len()
    }
    fn ws(&self, i: usize) -> SocketAddr {
        self.pick(i, Kind::Ws).ws.unwrap()
    }
    fn tcp(&self, i: usize) -> SocketAddr {
        self.pick(i, Kind::Tcp).tcp.unwrap()
    }
    fn node_id(&self, i: usize) -> String {
        self.gateways[i % self.gateways.len()].node_id.clone()
    }
    fn node_for(&self, i: usize, kind: Kind) -> String {
        self.pick(i, kind).node_id.clone()
    }
    async fn shutdown(self: Box<Self>) {
        let mut me = *self;
        for w in me.workers.drain(..) {
            let _ = w.stop().await;
        }
        for g in &mut me.gateways {
            let _ = signal(&mut g.child, "-TERM").await;
        }
        let _ = signal(&mut me.register.child, "-TERM").await;
    }
}

/// One connection to a gateway's inner port, speaking as a GatewayWorker
/// pusher does: commands are carried out in the order they are written, and
/// a query's reply comes back on the same connection, after every command
/// written before it. So a reply, or a [`Inner::fence`] pushed to a client,
/// proves that everything written earlier has been carried out.
#[derive(Debug)]
pub struct Inner {
    stream: TcpStream,
}

/// The gateway-local connection id (`connection_id` of a frame) of a client.
pub fn conn_no(c: &Client) -> Result<u32> {
    let id: ConnId = c.conn.parse()?;
    Ok(u32::try_from(id.seq())?)
}

static FENCES: AtomicU64 = AtomicU64::new(0);

impl Inner {
    /// Connects to `g`'s inner port, authorizing with `secret` when it is set.
    pub async fn connect(g: &GatewayProc, secret: &str) -> Result<Self> {
        let mut stream = TcpStream::connect(g.inner).await?;
        stream.set_nodelay(true)?;
        if !secret.is_empty() {
            let mut b = BytesMut::new();
            Frame::gateway_client_connect(secret).encode(&mut b);
            stream.write_all(&b).await?;
        }
        Ok(Self { stream })
    }

    /// Writes one command (a frame toward the gateway).
    pub async fn send(&mut self, f: &Frame) -> Result<()> {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        Ok(self.stream.write_all(&b).await?)
    }

    /// Writes a query and returns the reply's payload as it came: the bytes
    /// of PHP `serialize()` output, unparsed, so that a reply can be
    /// compared byte for byte.
    pub async fn ask(&mut self, f: &Frame) -> Result<Vec<u8>> {
        self.send(f).await?;
        let read = async {
            let len = self.stream.read_u32().await? as usize;
            let mut payload = vec![0; len];
            self.stream.read_exact(&mut payload).await?;
            anyhow::Ok(payload)
        };
        tokio::time::timeout(crate::STEP, read)
            .await
            .map_err(|_| anyhow!("no reply from the gateway within {:?}", crate::STEP))?
    }

    /// Pushes a fresh fence to `c` (a client of this gateway) and returns
    /// every text frame `c` received before it. Pushes to one connection keep
    /// their order, so anything an earlier command sent to `c` is in the
    /// list; anything it did not send never will be.
    pub async fn fence(&mut self, c: &mut Client) -> Result<Vec<String>> {
        let fence = format!("inner-fence-{}", FENCES.fetch_add(1, Ordering::Relaxed));
        self.send(&Frame::to_gateway(
            cmd::SEND_TO_ONE,
            conn_no(c)?,
            "",
            fence.clone(),
        ))
        .await?;
        let mut got = Vec::new();
        loop {
            let t = c.recv().await?;
            if t == fence {
                return Ok(got);
            }
            got.push(t);
        }
    }
}

/// Accepts connections on a register's address until one asks for the
/// gateway list (`worker_connect`) and returns that one, its request read;
/// gateways registering meanwhile are read and let go. A test holding the
/// listener plays the register: it answers the worker with
/// [`RegisterMessage::BroadcastAddresses`] lines of its choosing.
pub async fn accept_worker(listener: &TcpListener) -> Result<TcpStream> {
    let wait = async {
        loop {
            let (s, _) = listener.accept().await?;
            let mut s = BufReader::new(s);
            let mut line = String::new();
            // Every process sends its line at once on connecting.
            if tokio::time::timeout(crate::STEP, s.read_line(&mut line))
                .await
                .is_err()
            {
                continue;
            }
            if let Ok(RegisterMessage::WorkerConnect { .. }) =
                RegisterMessage::decode(line.as_bytes())
            {
                // Nothing follows the request until the register answers.
                return anyhow::Ok(s.into_inner());
            }
        }
    };
    tokio::time::timeout(crate::STEP, wait)
        .await
        .map_err(|_| anyhow!("no worker asked the register for gateways"))?
}

/// Stands in for a register that is down: listens on its address, answers
/// nothing, and returns once a worker asks for the gateway list: that
/// worker is up and, with no register to answer it, has no way to learn of
/// a gateway. The address is free again on return.
pub async fn await_worker_at_dead_register(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    accept_worker(&listener).await.map(drop)
}
