//! Starting a cluster of reference-app nodes, in-process or as processes of
//! the real binary, behind one trait the conformance suite drives.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use switchboard::NodeId;
use switchboard::core::MemoryBus;
use switchboard_server::config::{ClusterUrl, ServeConfig};
use switchboard_server::node::{self, Running};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running cluster whose nodes serve the reference app.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Number of nodes.
    fn size(&self) -> usize;
    /// WebSocket address of node `i % size`.
    fn ws(&self, i: usize) -> SocketAddr;
    /// TCP address of node `i % size`.
    fn tcp(&self, i: usize) -> SocketAddr;
    /// Node id of node `i % size`.
    fn node_id(&self, i: usize) -> String;
    /// Node id of the node a `kind` client of node `i` lands on (differs from
    /// [`Cluster::node_id`] where nodes serve one transport each).
    fn node_for(&self, i: usize, kind: crate::Kind) -> String {
        let _ = kind;
        self.node_id(i)
    }
    /// Stops every node.
    async fn shutdown(self: Box<Self>);
}

/// In-process cluster modes.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// One node, standalone backplane.
    Local,
    /// `n` nodes joined by the in-memory bus.
    Memory(usize),
}

/// Nodes running inside the test process.
#[derive(Debug)]
pub struct InProcess {
    pub nodes: Vec<Running>,
}

/// A configuration for a test node: loopback, ephemeral ports.
pub fn test_config(node: &str) -> ServeConfig {
    let mut cfg = ServeConfig::default();
    cfg.node_id = Some(NodeId::new(node).unwrap());
    cfg.ws = Some("127.0.0.1:0".into());
    cfg.tcp = Some("127.0.0.1:0".into());
    cfg.shutdown_timeout = std::time::Duration::from_secs(3);
    cfg
}

impl InProcess {
    /// Starts a cluster in `mode`, tweaking each node's configuration with `tweak`.
    pub async fn start_with(mode: Mode, tweak: impl Fn(&mut ServeConfig)) -> Result<Self> {
        let mut nodes = Vec::new();
        match mode {
            Mode::Local => {
                let mut cfg = test_config("n0");
                tweak(&mut cfg);
                nodes.push(node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?);
            }
            Mode::Memory(n) => {
                let bus = MemoryBus::new();
                for i in 0..n {
                    let mut cfg = test_config(&format!("n{i}"));
                    tweak(&mut cfg);
                    nodes.push(node::launch(&cfg, std::sync::Arc::new(bus.backplane())).await?);
                }
            }
        }
        Ok(Self { nodes })
    }

    /// Starts a cluster in `mode` with default settings.
    pub async fn start(mode: Mode) -> Result<Self> {
        Self::start_with(mode, |_| {}).await
    }

    /// Boxed, for the conformance suite.
    pub async fn boxed(mode: Mode) -> Result<Box<dyn Cluster>> {
        Ok(Box::new(Self::start(mode).await?))
    }

    /// `n` nodes in this process, named n0, n1, ..., on the broker at `url`
    /// (from [`crate::services`]) in `mode`, under a prefix of their own: for
    /// tests that need the nodes' hubs, which processes of the binary hide.
    pub async fn on_broker(url: &str, mode: &str, n: usize) -> Result<Self> {
        let cluster: ClusterUrl = format!(
            "{url}?mode={mode}&prefix={}",
            crate::services::unique_prefix(mode)
        )
        .parse()?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut cfg = test_config(&format!("n{i}"));
            cfg.cluster = cluster.clone();
            nodes.push(node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?);
        }
        Ok(Self { nodes })
    }
}

#[async_trait]
impl Cluster for InProcess {
    fn size(&self) -> usize {
        self.nodes.len()
    }
    fn ws(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].ws.unwrap()
    }
    fn tcp(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].tcp.unwrap()
    }
    fn node_id(&self, i: usize) -> String {
        self.nodes[i % self.nodes.len()].hub.node_id().to_string()
    }
    async fn shutdown(self: Box<Self>) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// One node running as a process of the real binary.
#[derive(Debug)]
pub struct ProcessNode {
    pub child: Child,
    pub node_id: String,
    pub ws: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    /// The server API, when started with `--api`.
    pub api: Option<SocketAddr>,
}

impl ProcessNode {
    /// The server API's address (the node must have been started with `--api`).
    pub fn api_addr(&self) -> SocketAddr {
        self.api.expect("the node printed its API address")
    }

    /// Calls `method` on the node's API with `key`; the answer's `result`,
    /// or an error naming the status and body of any other answer.
    pub async fn call(
        &self,
        key: &str,
        method: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let (status, v) = crate::http::api(self.api_addr(), Some(key), method, &body).await?;
        anyhow::ensure!(
            status == switchboard::http::StatusCode::OK,
            "{method} {body}: {status} {v}"
        );
        Ok(v)
    }

    /// Starts `bin serve` with `args` (ports default to ephemeral) and reads
    /// the addresses it prints.
    pub async fn spawn(bin: &Path, args: &[&str]) -> Result<Self> {
        Self::spawn_with_env(bin, args, &[]).await
    }

    /// Like [`ProcessNode::spawn`], with extra environment variables.
    pub async fn spawn_with_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_via(&[], bin, args, env).await
    }

    /// Like [`ProcessNode::spawn_with_env`], started through `prefix`, a
    /// command that runs the rest of its arguments (`ip netns exec NAME`:
    /// see [`crate::netns::NetNs::prefix`]). The prefix must exec the node
    /// rather than fork it, so that the process id is the node's.
    pub async fn spawn_via(
        prefix: &[&str],
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.envs(env.iter().copied());
        cmd.arg("serve");
        if !args.contains(&"--ws") {
            cmd.args(["--ws", "127.0.0.1:0"]);
        }
        if !args.contains(&"--tcp") {
            cmd.args(["--tcp", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let banner = read_banner(&mut child, |line| line.contains("tcp://")).await?;
        let node = banner.nodes.into_iter().next().unwrap_or_default();
        Ok(Self {
            child,
            node_id: node.id,
            ws: node.ws,
            tcp: node.tcp,
            api: node.api,
        })
    }

    /// The process id (0 once the process has been waited for).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> Result<std::process::ExitStatus> {
        terminate(&mut self.child).await
    }
}

/// Sends SIGTERM to `child` and waits for its exit status.
pub async fn terminate(child: &mut Child) -> Result<std::process::ExitStatus> {
    let Some(pid) = child.id() else {
        // Already waited for: `kill 0` would signal this whole process group.
        return Ok(child.wait().await?);
    };
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill failed");
    Ok(tokio::time::timeout(crate::STEP, child.wait()).await??)
}

/// A node as the binary's start-up output describes it.
#[derive(Debug, Clone, Default)]
pub struct PrintedNode {
    pub id: String,
    pub ws: Option<SocketAddr>,
    /// The console page on the WebSocket port.
    pub console: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    /// A gateway's inner (worker-facing) port.
    pub inner: Option<SocketAddr>,
    /// The server API's port.
    pub api: Option<SocketAddr>,
}

/// What the binary prints when it starts: a `switchboard node ID (...)` line
/// per node, each followed by indented `NAME  URL` lines; the demo ends with
/// a `page` line.
#[derive(Debug, Clone, Default)]
pub struct Banner {
    pub nodes: Vec<PrintedNode>,
    pub page: Option<SocketAddr>,
    /// A register's listen address.
    pub register: Option<SocketAddr>,
}

impl Banner {
    fn read_line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("switchboard register tcp://") {
            self.register = rest.split(' ').next().and_then(|a| a.parse().ok());
            return;
        }
        if let Some(rest) = line
            .strip_prefix("switchboard node ")
            .or_else(|| line.strip_prefix("switchboard worker "))
        {
            self.nodes.push(PrintedNode {
                id: rest.split(' ').next().unwrap_or_default().to_owned(),
                ..PrintedNode::default()
            });
            return;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(url)) = (words.next(), words.next()) else {
            return;
        };
        // `ws://127.0.0.1:9001/ws` -> 127.0.0.1:9001
        let Some(addr) = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|a| a.parse().ok())
        else {
            return;
        };
        let node = self.nodes.last_mut();
        match (name, node) {
            ("page", _) => self.page = Some(addr),
            ("websocket", Some(n)) => n.ws = Some(addr),
            ("console", Some(n)) => n.console = Some(addr),
            ("tcp", Some(n)) => n.tcp = Some(addr),
            ("inner", Some(n)) => n.inner = Some(addr),
            ("api", Some(n)) => n.api = Some(addr),
            _ => {}
        }
    }
}

/// Reads `child`'s start-up output up to the first line for which `last`
/// holds, then keeps draining it so the child never blocks on a full pipe.
pub async fn read_banner(child: &mut Child, last: impl Fn(&str) -> bool) -> Result<Banner> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Banner::default();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            banner.read_line(&line);
            if last(&line) {
                return Ok(());
            }
        }
        anyhow::bail!("the output ended before the addresses: {banner:?}")
    };
    tokio::time::timeout(crate::STEP, read)
        .await
        .context("the process did not print its addresses")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(banner)
}

/// Starts `bin` with `args` and reads its start-up output up to the first
/// line for which `last` holds.
pub async fn spawn_role(
    bin: &Path,
    args: &[&str],
    last: impl Fn(&str) -> bool,
) -> Result<(Child, Banner)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let banner = read_banner(&mut child, last)
        .await
        .with_context(|| format!("{args:?}"))?;
    Ok((child, banner))
}

/// `switchboard demo` running as a process: its nodes and its page.
#[derive(Debug)]
pub struct DemoProcess {
    pub child: Child,
    pub banner: Banner,
}

impl DemoProcess {
    /// Starts `bin demo --port 0` (plus `args`) and reads the addresses it prints.
    pub async fn spawn(bin: &Path, args: &[&str]) -> Result<Self> {
        let args: Vec<&str> = ["demo", "--port", "0"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let (child, banner) =
            spawn_role(bin, &args, |line| line.trim_start().starts_with("page ")).await?;
        Ok(Self { child, banner })
    }

    /// The page's address.
    pub fn page(&self) -> SocketAddr {
        self.banner.page.expect("the demo prints its page")
    }

    /// WebSocket address of node `i`.
    pub fn ws(&self, i: usize) -> SocketAddr {
        self.banner.nodes[i].ws.expect("the demo prints its nodes")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> Result<std::process::ExitStatus> {
        terminate(&mut self.child).await
    }
}

/// Nodes running as processes of the real binary.
#[derive(Debug)]
pub struct Process {
    pub nodes: Vec<ProcessNode>,
}

impl Process {
    /// One process per argument list, for the conformance suite.
    pub async fn boxed(bin: &str, nodes: &[&[&str]]) -> Result<Box<dyn Cluster>> {
        let mut started = Vec::new();
        for args in nodes {
            started.push(ProcessNode::spawn(bin.as_ref(), args).await?);
        }
        Ok(Box::new(Process { nodes: started }))
    }

    /// `n` processes on the shared Redis in `mode` (`pubsub` or `queue`),
    /// under a prefix of their own; an error if Redis is missing. `extra` is
    /// appended to the cluster URL's query.
    pub async fn redis(bin: &str, n: usize, mode: &str, extra: &str) -> Result<Box<dyn Cluster>> {
        Self::on(bin, n, &crate::services::redis_url()?, mode, extra).await
    }

    /// `n` processes on the shared RabbitMQ in `mode` (`fanout` or `routing`),
    /// with an exchange and queues of their own; an error if RabbitMQ is
    /// missing. `extra` is appended to the cluster URL's query.
    pub async fn amqp(bin: &str, n: usize, mode: &str, extra: &str) -> Result<Box<dyn Cluster>> {
        Self::on(bin, n, &crate::services::amqp_url()?, mode, extra).await
    }

    /// `n` processes on the shared NATS in `mode` (`core` or `jetstream`),
    /// under a subject prefix of their own; an error if NATS is missing.
    /// `extra` is appended to the cluster URL's query.
    pub async fn nats(bin: &str, n: usize, mode: &str, extra: &str) -> Result<Box<dyn Cluster>> {
        Self::on(bin, n, &crate::services::nats_url()?, mode, extra).await
    }

    /// `n` processes on a private Redis Cluster of their own (3 masters with
    /// a replica each) in `mode`; an error if `redis-server` is missing.
    /// `extra` is appended to the cluster URL's query.
    pub async fn redis_cluster(
        bin: &str,
        n: usize,
        mode: &str,
        extra: &str,
    ) -> Result<Box<dyn Cluster>> {
        let broker =
            tokio::task::spawn_blocking(crate::broker_clusters::RedisCluster::start).await??;
        let url = format!(
            "{}?mode={mode}&prefix={}{extra}",
            broker.url(),
            crate::services::unique_prefix(mode)
        );
        let nodes = Self::start_cluster(bin, n, &url).await?;
        Ok(Box::new(OnBroker { nodes, broker }))
    }

    /// `n` processes on the broker at `url`, under a prefix of their own.
    async fn on(
        bin: &str,
        n: usize,
        url: &str,
        mode: &str,
        extra: &str,
    ) -> Result<Box<dyn Cluster>> {
        let cluster = format!(
            "{url}?mode={mode}&prefix={}{extra}",
            crate::services::unique_prefix(mode)
        );
        Ok(Box::new(Self::start_cluster(bin, n, &cluster).await?))
    }

    /// Stops every node (SIGTERM, then waits for each).
    pub async fn stop(self) {
        Box::new(self).shutdown().await;
    }

    /// `n` processes with `--cluster URL`, named n0, n1, ...
    pub async fn start_cluster(bin: &str, n: usize, cluster: &str) -> Result<Process> {
        Self::start_cluster_with(bin, n, cluster, &[]).await
    }

    /// Two nodes on the shared Redis in pub/sub mode (node TTL 2 s), under a
    /// prefix of their own, each serving the server API with `key` on an
    /// ephemeral port, and started with `extra`.
    pub async fn redis_with_api(
        bin: &str,
        tag: &str,
        key: &str,
        extra: &[&str],
    ) -> Result<Process> {
        let url = crate::services::redis_url()?;
        Self::redis_with_api_on(bin, &url, tag, key, extra).await
    }

    /// Like [`Process::redis_with_api`], on the Redis at `url` (a private
    /// [`crate::services::RedisServer`], say).
    pub async fn redis_with_api_on(
        bin: &str,
        url: &str,
        tag: &str,
        key: &str,
        extra: &[&str],
    ) -> Result<Process> {
        let cluster = format!(
            "{url}?mode=pubsub&prefix={}&ttl=2",
            crate::services::unique_prefix(tag)
        );
        let mut args = vec!["--api", "127.0.0.1:0", "--api-key", key];
        args.extend_from_slice(extra);
        Self::start_cluster_with(bin, 2, &cluster, &args).await
    }

    /// Like [`Process::start_cluster`], with more flags for every node.
    pub async fn start_cluster_with(
        bin: &str,
        n: usize,
        cluster: &str,
        extra: &[&str],
    ) -> Result<Process> {
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = format!("n{i}");
            let mut args = vec!["--node-id", &id, "--cluster", cluster];
            args.extend_from_slice(extra);
            nodes.push(ProcessNode::spawn(bin.as_ref(), &args).await?);
        }
        Ok(Process { nodes })
    }
}

/// Nodes on a private broker that lives as long as they do.
pub struct OnBroker<B> {
    /// The nodes.
    pub nodes: Process,
    /// Their broker, stopped when this is dropped.
    pub broker: B,
}

#[async_trait]
impl<B: Send + Sync + 'static> Cluster for OnBroker<B> {
    fn size(&self) -> usize {
        self.nodes.size()
    }
    fn ws(&self, i: usize) -> SocketAddr {
        self.nodes.ws(i)
    }
    fn tcp(&self, i: usize) -> SocketAddr {
        self.nodes.tcp(i)
    }
    fn node_id(&self, i: usize) -> String {
        self.nodes.node_id(i)
    }
    async fn shutdown(self: Box<Self>) {
        Box::new(self.nodes).shutdown().await;
    }
}

#[async_trait]
impl Cluster for Process {
    fn size(&self) -> usize {
        self.nodes.len()
    }
    fn ws(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].ws.unwrap()
    }
    fn tcp(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].tcp.unwrap()
    }
    fn node_id(&self, i: usize) -> String {
        self.nodes[i % self.nodes.len()].node_id.clone()
    }
    async fn shutdown(self: Box<Self>) {
        for n in self.nodes {
            let _ = n.terminate().await;
        }
    }
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow!("no VmHWM"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmHWM"))?
        .parse()?;
    Ok(kb * 1024)
}
