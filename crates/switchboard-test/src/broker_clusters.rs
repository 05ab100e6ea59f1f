//! Private broker clusters, for tests that kill and restart their members: a
//! Redis Cluster of three masters with a replica each ([`RedisCluster`]), and
//! NATS servers with JetStream, routed to each other ([`NatsCluster`]).
//!
//! They follow the private brokers of [`crate::services`]: every member runs
//! on free loopback ports and in a directory of its own, where its output is
//! kept across restarts; a start that fails says the tail of each member's
//! output in its error, and so does the drop of a cluster whose test fails.
//! A missing binary is a failure, never a silent pass.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::services::{
    BrokerLog, REDIS_CEILING, clean_up, nats_answers, redis_answers, require, unique_prefix,
    wait_until_ready,
};

/// The lowest port the system gives the local end of an outgoing
/// connection (`ip_local_port_range`), where it says.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where the ports of cluster members are chosen from, up to the
/// ephemeral range: above the ports of well-known services.
const PORT_FLOOR: u16 = 10_000;

/// Loopback ports free a moment ago, all different, and below the range the
/// system takes the local ports of outgoing connections from. A member's
/// port is unbound between its choice and the member's bind, and while the
/// member is killed; in that range, any outgoing connection (between the
/// members, or another test's) could take it meanwhile and keep the member
/// from starting. Each is held until all are chosen, since ports chosen one
/// at a time may repeat.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    use std::hash::BuildHasher;
    let mut held = Vec::with_capacity(n);
    match ephemeral_low() {
        Some(low) if low >= PORT_FLOOR + 1000 => {
            let random = std::hash::RandomState::new();
            let span = u64::from(low - PORT_FLOOR);
            let mut tries: u64 = 0;
            while held.len() < n {
                tries += 1;
                if tries > 10_000 {
                    bail!(
                        "found only {} free ports between {PORT_FLOOR} and {low}",
                        held.len()
                    );
                }
                let p = PORT_FLOOR + u16::try_from(random.hash_one(tries) % span)?;
                if let Ok(l) = TcpListener::bind(("127.0.0.1", p)) {
                    held.push(l);
                }
            }
        }
        // No range known, or no room below it: the system's choice.
        _ => {
            for _ in 0..n {
                held.push(TcpListener::bind("127.0.0.1:0")?);
            }
        }
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Starts a cluster with `start`, and again on other ports (three times at
/// most) when a member could not bind one: a port is free when it is
/// chosen, but another test may bind it before the member does.
fn with_fresh_ports<T>(what: &str, start: impl Fn() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        let e = match start() {
            Err(e) if attempt < 3 => e,
            started => return started,
        };
        let text = format!("{e:#}");
        if !text.to_lowercase().contains("address already in use") {
            return Err(e);
        }
        // The member's own line of its output says which port.
        let taken = text
            .lines()
            .find(|l| l.to_lowercase().contains("address already in use"))
            .unwrap_or_default();
        eprintln!("{what}: start {attempt} found a port taken ({taken}); starting again on others");
        attempt += 1;
    }
}

/// How often a cluster is asked whether it has settled. Each question starts
/// processes or connections to every member, so not as often as a single
/// broker is asked.
const POLL: Duration = Duration::from_millis(100);

/// A cluster whose members may exit under a test.
trait Members {
    /// A member that was started and has exited since: its index and status.
    fn exited(&mut self) -> Option<(usize, ExitStatus)>;

    /// The tail of every member's output, each under a heading.
    fn reports(&self) -> String;
}

/// Waits until `settled` is fine with the cluster, asking every [`POLL`];
/// gives up at once when a member exits, and after `ceiling` otherwise,
/// with what `settled` last said was missing and every member's output.
fn settle<C: Members>(
    c: &mut C,
    what: &str,
    ceiling: Duration,
    settled: impl Fn(&C) -> std::result::Result<(), String>,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let missing = match settled(c) {
            Ok(()) => return Ok(t.elapsed()),
            Err(missing) => missing,
        };
        if let Some((i, status)) = c.exited() {
            bail!(
                "{what}: member {i} exited ({status}) while waiting for it\n{}",
                c.reports()
            );
        }
        if t.elapsed() > ceiling {
            bail!(
                "{what}: not within {ceiling:?} ({missing})\n{}",
                c.reports()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Kills a member's process (SIGKILL: no goodbye to anyone) and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Whether a member that should run has exited.
fn has_exited(child: &mut Option<Child>) -> Option<ExitStatus> {
    child.as_mut().and_then(|c| c.try_wait().ok().flatten())
}

/// Nodes of a [`RedisCluster`]: three masters and a replica of each.
const REDIS_NODES: usize = 6;

/// The hash slots of Redis Cluster.
const SLOTS: u16 = 16384;

/// How long a Redis Cluster may take to form, or to agree again after a
/// restart, before it is taken for stuck. It takes about two seconds (most
/// of it `redis-cli --cluster create` waiting for the nodes to meet); the
/// ceiling only bounds a hang, below the time after which nextest ends a
/// test (`.config/nextest.toml`), so that the test fails with the output.
const REDIS_CLUSTER_CEILING: Duration = Duration::from_secs(30);

/// One `redis-server` of a [`RedisCluster`].
struct RedisNode {
    port: u16,
    /// The cluster bus port, chosen as the others are rather than left at
    /// the port + 10000, which nothing has checked is free.
    bus_port: u16,
    dir: PathBuf,
    log: BrokerLog,
    child: Option<Child>,
    /// When it was last killed, and the slots it served then (none for a
    /// replica): what [`RedisCluster::wait_failover`] waits for.
    killed: Option<(Instant, Vec<(u16, u16)>)>,
}

/// A node as one member of the cluster sees it (a line of `CLUSTER NODES`).
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: Option<u16>,
    flags: Vec<String>,
    /// Slot ranges it serves, both ends included.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        // `127.0.0.1:PORT@BUSPORT[,HOSTNAME]`; `:0@0` while it is unknown.
        let port = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .filter(|&p| p != 0);
        let slots = f[8..]
            .iter()
            // `[SLOT->-ID]` and `[SLOT-<-ID]` are slots on the move, not served.
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        Some(Self {
            id: f[0].to_owned(),
            port,
            flags: f[2].split(',').map(str::to_owned).collect(),
            slots,
        })
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Marked as failing, by this member alone (`fail?`) or by the cluster.
    fn failing(&self) -> bool {
        self.has("fail") || self.has("fail?")
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// Slot ranges with the id of the node that serves each, sorted: who serves
/// what as one member sees it.
type SlotMap = Vec<(u16, u16, String)>;

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of
/// the key, or of its hash tag (what is between the first `{` and the next
/// `}`, if that is not empty), modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// Runs `redis-cli` against the node on `port`, with `input` on its stdin
/// (commands, one a line, sent over one connection); what it printed. An
/// error reply is an error.
fn redis_cli(port: u16, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-e"])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting redis-cli")?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "redis-cli -p {port} {args:?} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// The `field:value` lines of an `INFO`-like reply.
fn info_fields(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .collect()
}

/// A real Redis Cluster on loopback (and on an address it announces, see
/// [`RedisCluster::start_announcing`]): three masters, each with one replica,
/// six `redis-server` processes on free ports, each in its own directory
/// (with its `nodes.conf`, which a restart keeps). Nothing is persisted: a
/// killed node comes back empty, and gets its data from its master.
///
/// A test may kill and restart any node, and wait for the cluster to fail
/// a killed master over to its replica.
pub struct RedisCluster {
    nodes: Vec<RedisNode>,
    /// The directory of the nodes' directories.
    root: PathBuf,
    node_timeout_ms: u64,
    /// The address the nodes announce to each other and to clients
    /// (`CLUSTER SLOTS`, `MOVED`), where every node is reached.
    announce: IpAddr,
    /// The masters as the cluster was created.
    created_masters: Vec<usize>,
}

impl Members for RedisCluster {
    fn exited(&mut self) -> Option<(usize, ExitStatus)> {
        self.nodes
            .iter_mut()
            .enumerate()
            .find_map(|(i, n)| has_exited(&mut n.child).map(|s| (i, s)))
    }

    fn reports(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.nodes[i].log.report(&self.name(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl RedisCluster {
    /// Starts one with a node timeout of 2 s, and returns once every node
    /// takes the cluster for complete ([`RedisCluster::start_with`]).
    pub fn start() -> Result<Self> {
        Self::start_with(2000)
    }

    /// Starts one whose nodes take a peer for failed after `node_timeout_ms`
    /// without an answer (`cluster-node-timeout`, which sets how soon a
    /// killed master is failed over). Returns once every node reports
    /// `cluster_state:ok` and knows all six, every replica's link to its
    /// master is up, and all nodes agree on who serves which slot; an error
    /// with every node's output if that does not happen within 30 s, and if
    /// `redis-server` or `redis-cli` is missing.
    pub fn start_with(node_timeout_ms: u64) -> Result<Self> {
        Self::start_on(node_timeout_ms, Ipv4Addr::LOCALHOST.into())
    }

    /// Starts one ([`RedisCluster::start`]) whose nodes listen on `ip` as
    /// well as on loopback, and announce `ip`: clients that cannot reach the
    /// loopback of this machine (a process in a network namespace of its
    /// own) reach every node at the addresses the cluster gives out, and so
    /// do clients on this machine. Loopback stays for the fixture's own
    /// `redis-cli`. `ip` must be an address of this machine.
    pub fn start_announcing(ip: IpAddr) -> Result<Self> {
        Self::start_on(2000, ip)
    }

    fn start_on(node_timeout_ms: u64, announce: IpAddr) -> Result<Self> {
        for binary in ["redis-server", "redis-cli"] {
            let found = Command::new(binary)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            require(&format!("{binary} (the binary)"), found)?;
        }
        with_fresh_ports("a Redis Cluster", || {
            Self::start_once(node_timeout_ms, announce)
        })
    }

    fn start_once(node_timeout_ms: u64, announce: IpAddr) -> Result<Self> {
        let root = std::env::temp_dir().join(unique_prefix("redis-cluster"));
        let ports = free_ports(2 * REDIS_NODES)?;
        let mut nodes = Vec::with_capacity(REDIS_NODES);
        for i in 0..REDIS_NODES {
            let dir = root.join(format!("node{i}"));
            std::fs::create_dir_all(&dir)?;
            nodes.push(RedisNode {
                port: ports[i],
                bus_port: ports[REDIS_NODES + i],
                log: BrokerLog::new(&dir),
                dir,
                child: None,
                killed: None,
            });
        }
        // Owned before anything can fail, so that a failed start kills
        // what it started.
        let mut c = Self {
            nodes,
            root,
            node_timeout_ms,
            announce,
            created_masters: Vec::new(),
        };
        for i in 0..REDIS_NODES {
            c.spawn(i)?;
        }
        // The announced addresses: the nodes meet each other at these.
        let addrs: Vec<String> = (0..REDIS_NODES).map(|i| c.addr(i)).collect();
        let mut create = Command::new("redis-cli");
        create
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null());
        let out = create
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                c.reports()
            );
        }
        settle(
            &mut c,
            "a Redis Cluster forming",
            REDIS_CLUSTER_CEILING,
            Self::agreed,
        )?;
        let view = c.view_of_live()?;
        c.created_masters = c.masters_in(&view);
        if c.created_masters.len() != 3 {
            bail!(
                "a Redis Cluster formed with masters {:?}, not three\n{}",
                c.created_masters,
                c.reports()
            );
        }
        Ok(c)
    }

    /// `IP:PORT` of node `i`, at the address it announces.
    fn addr(&self, i: usize) -> String {
        SocketAddr::new(self.announce, self.nodes[i].port).to_string()
    }

    fn name(&self, i: usize) -> String {
        format!(
            "redis-server {i} of a cluster, on port {}",
            self.nodes[i].port
        )
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let timeout = self.node_timeout_ms.to_string();
        let name = self.name(i);
        let announce = self.announce;
        let n = &mut self.nodes[i];
        let out = n.log.next_start()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &n.port.to_string(), "--bind", "127.0.0.1"]);
        if !announce.is_loopback() {
            // Listening there too, bus included, and giving that address
            // out; protected mode would turn away every client that does
            // not come from loopback (there is no password).
            cmd.arg(announce.to_string())
                .args(["--cluster-announce-ip", &announce.to_string()])
                .args(["--protected-mode", "no"]);
        }
        cmd.args(["--cluster-port", &n.bus_port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &timeout])
            .args(["--appendonly", "no", "--save", ""])
            // A replica's full sync would otherwise wait 5 s for others to
            // share the transfer with: at every start and every rejoin.
            .args(["--repl-diskless-sync-delay", "0"])
            // `nodes.conf` too is kept in it: relative to the directory.
            .arg("--dir")
            .arg(&n.dir)
            // Without a log file it logs to its stdout, kept with its stderr
            // (where a refused option is reported) in its directory.
            .args(["--logfile", ""])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = n
            .child
            .insert(cmd.spawn().context("starting redis-server")?);
        let addr = format!("127.0.0.1:{}", n.port);
        if let Err(not_up) = wait_until_ready(child, REDIS_CEILING, || redis_answers(&addr)) {
            kill_child(&mut n.child);
            bail!("{name} {not_up}\n{}", n.log.report(&name));
        }
        Ok(())
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.running(i))
    }

    /// The node of a port, as `CLUSTER NODES` names it.
    fn index_of(&self, line: &NodeLine) -> Option<usize> {
        self.nodes.iter().position(|n| Some(n.port) == line.port)
    }

    /// `CLUSTER NODES` as node `i` sees the cluster.
    fn view(&self, i: usize) -> Result<Vec<NodeLine>> {
        Ok(redis_cli(self.nodes[i].port, &["cluster", "nodes"], None)?
            .lines()
            .filter_map(NodeLine::parse)
            .collect())
    }

    /// The view of the first live node that answers.
    fn view_of_live(&self) -> Result<Vec<NodeLine>> {
        let mut last = None;
        for i in self.live() {
            match self.view(i) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node of the Redis Cluster runs")))
    }

    /// Masters serving slots and not marked as failing, in a view.
    fn masters_in(&self, view: &[NodeLine]) -> Vec<usize> {
        let mut m: Vec<usize> = view
            .iter()
            .filter(|l| l.has("master") && !l.failing() && !l.slots.is_empty())
            .filter_map(|l| self.index_of(l))
            .collect();
        m.sort_unstable();
        m
    }

    /// Live node `i` reports `cluster_state:ok` and knows all nodes?
    fn state_ok(&self, i: usize) -> std::result::Result<(), String> {
        let info = redis_cli(self.nodes[i].port, &["cluster", "info"], None)
            .map_err(|e| format!("node {i}: {e:#}"))?;
        let f = info_fields(&info);
        let state = f.get("cluster_state").copied().unwrap_or("?");
        let known = f.get("cluster_known_nodes").copied().unwrap_or("?");
        if state != "ok" || known != REDIS_NODES.to_string() {
            return Err(format!(
                "node {i}: cluster_state:{state}, cluster_known_nodes:{known}"
            ));
        }
        Ok(())
    }

    /// Every live node takes the cluster for complete, sees no live node as
    /// failing, has its replication link up if it is a replica, and all
    /// agree on who serves which slot.
    fn agreed(&self) -> std::result::Result<(), String> {
        let mut first: Option<(usize, SlotMap)> = None;
        for i in self.live() {
            self.state_ok(i)?;
            let view = self.view(i).map_err(|e| format!("node {i}: {e:#}"))?;
            for l in &view {
                if let Some(j) = self.index_of(l)
                    && self.running(j)
                    && (l.failing() || l.has("handshake") || l.has("noaddr"))
                {
                    return Err(format!("node {i} sees node {j} as {}", l.flags.join(",")));
                }
            }
            let me = view
                .iter()
                .find(|l| l.has("myself"))
                .ok_or_else(|| format!("node {i} does not list itself"))?;
            if me.has("slave") {
                let repl = redis_cli(self.nodes[i].port, &["info", "replication"], None)
                    .map_err(|e| format!("node {i}: {e:#}"))?;
                let link = info_fields(&repl)
                    .get("master_link_status")
                    .copied()
                    .unwrap_or("?")
                    .to_owned();
                if link != "up" {
                    return Err(format!("replica {i}: master_link_status:{link}"));
                }
            }
            let mut owners: SlotMap = view
                .iter()
                .flat_map(|l| l.slots.iter().map(|&(a, b)| (a, b, l.id.clone())))
                .collect();
            owners.sort_unstable();
            match &first {
                None => first = Some((i, owners)),
                Some((j, theirs)) if *theirs != owners => {
                    return Err(format!(
                        "nodes {j} and {i} disagree on who serves which slot"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// `redis-cluster://IP:P1,IP:P2,IP:P3`: the three masters as the cluster
    /// was created (a client finds the rest), at the address they announce
    /// (127.0.0.1 unless started with [`RedisCluster::start_announcing`]).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.created_masters.iter().map(|&i| self.addr(i)).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// `redis://IP:P` of every node, masters and replicas, by index, at the
    /// address they announce.
    pub fn seeds(&self) -> Vec<String> {
        (0..self.nodes.len())
            .map(|i| format!("redis://{}", self.addr(i)))
            .collect()
    }

    /// The client port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The node that serves the slot of `key` now, as the first live node
    /// sees it.
    pub fn master_of_key(&self, key: &str) -> Result<usize> {
        let slot = key_slot(key.as_bytes());
        let view = self.view_of_live()?;
        view.iter()
            .filter(|l| l.has("master") && l.serves(slot))
            .find_map(|l| self.index_of(l))
            .with_context(|| format!("no node serves slot {slot} (of key {key:?})"))
    }

    /// The masters now, as the first live node sees them (`CLUSTER NODES`):
    /// the nodes that serve slots and are not marked as failing. A killed
    /// master is among them until the cluster has noticed.
    pub fn masters(&self) -> Result<Vec<usize>> {
        Ok(self.masters_in(&self.view_of_live()?))
    }

    /// Runs `redis-cli ARGS` against node `i` (`-c` among `args` follows
    /// redirections to the node that serves a key); what it printed, or an
    /// error for an error reply.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        redis_cli(self.nodes[i].port, args, None)
    }

    /// Runs `commands` over one connection to node `i`, following
    /// redirections: a `WAIT` after a write waits for the replicas of the
    /// node that took it. The replies, one a line (without the lines that
    /// `redis-cli` adds about redirections).
    pub fn cli_pipe(&self, i: usize, commands: &[&str]) -> Result<String> {
        let input = commands
            .iter()
            .map(|c| format!("{c}\n"))
            .collect::<String>();
        let out = redis_cli(self.nodes[i].port, &["-c"], Some(&input))?;
        Ok(out
            .lines()
            .filter(|l| !l.starts_with("-> Redirected"))
            .map(|l| format!("{l}\n"))
            .collect())
    }

    /// Kills node `i` (SIGKILL: no goodbye to clients or peers), noting the
    /// slots it served for [`RedisCluster::wait_failover`].
    pub fn kill(&mut self, i: usize) {
        if !self.running(i) {
            return;
        }
        // Asked of the node itself, the last moment it can answer.
        let slots = self
            .view(i)
            .ok()
            .and_then(|v| v.into_iter().find(|l| l.has("myself")))
            .filter(|l| l.has("master"))
            .map(|l| l.slots)
            .unwrap_or_default();
        kill_child(&mut self.nodes[i].child);
        self.nodes[i].killed = Some((Instant::now(), slots));
    }

    /// Starts node `i` again after [`RedisCluster::kill`], on the same ports
    /// and directory: it rejoins the cluster under its old identity, as a
    /// replica if its slots were failed over meanwhile. Returns once the
    /// live nodes agree again, as [`RedisCluster::start_with`] does.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        kill_child(&mut self.nodes[i].child);
        self.spawn(i)?;
        settle(
            self,
            &format!("node {i} rejoining a Redis Cluster"),
            REDIS_CLUSTER_CEILING,
            Self::agreed,
        )?;
        Ok(())
    }

    /// Waits until every slot the killed master `killed` served is served
    /// by another live master (its replica, promoted) in the view of every
    /// live node, and every live node reports `cluster_state:ok`. Returns
    /// how long that took since the kill; an error with every node's output
    /// if it takes longer than `ceiling` from now, and if `killed` was not
    /// a master serving slots when it was killed.
    pub fn wait_failover(&self, killed: usize, ceiling: Duration) -> Result<Duration> {
        let Some((at, slots)) = &self.nodes[killed].killed else {
            bail!("node {killed} of the Redis Cluster was not killed");
        };
        if self.running(killed) {
            bail!("node {killed} of the Redis Cluster was killed, but has been restarted since");
        }
        if slots.is_empty() {
            bail!("node {killed} of the Redis Cluster served no slots when it was killed");
        }
        let failed_over = || -> std::result::Result<(), String> {
            for i in self.live() {
                self.state_ok(i)?;
                let view = self.view(i).map_err(|e| format!("node {i}: {e:#}"))?;
                // A promoted replica takes all its master's slots at once:
                // the first of each range stands for the range.
                for &(a, _) in slots {
                    let owner = view
                        .iter()
                        .find(|l| l.has("master") && l.serves(a))
                        .ok_or_else(|| format!("node {i} sees no master of slot {a}"))?;
                    match self.index_of(owner) {
                        Some(j) if j != killed && self.running(j) && !owner.failing() => {}
                        _ => return Err(format!("node {i} sees slot {a} served by {}", owner.id)),
                    }
                }
            }
            Ok(())
        };
        let t = Instant::now();
        loop {
            let missing = match failed_over() {
                Ok(()) => return Ok(at.elapsed()),
                Err(missing) => missing,
            };
            if t.elapsed() > ceiling {
                bail!(
                    "slots {slots:?} of node {killed} were not failed over within {ceiling:?} \
                     ({missing})\n{}",
                    self.reports()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            kill_child(&mut n.child);
        }
        for i in 0..self.nodes.len() {
            clean_up(&self.name(i), &self.nodes[i].log, &self.nodes[i].dir);
        }
        // Gone only if every node's directory is: a failed test keeps them.
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// How long NATS servers may take to route to each other and elect a
/// JetStream meta leader before they are taken for stuck. It takes well
/// under a second (a few seconds when the leader was killed); the ceiling
/// only bounds a hang, below the time after which nextest ends a test.
const NATS_CEILING: Duration = Duration::from_secs(30);

/// `nats-server` on the path, or where Debian's package puts it
/// (`/usr/sbin`, not on every user's path).
fn nats_server() -> PathBuf {
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        PathBuf::from("nats-server")
    } else {
        PathBuf::from("/usr/sbin/nats-server")
    }
}

/// A plain HTTP/1.0 GET of `path` on a loopback port: the body of a 200
/// answer, or `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_owned())
}

/// One `nats-server` of a [`NatsCluster`].
struct NatsNode {
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    dir: PathBuf,
    log: BrokerLog,
    child: Option<Child>,
}

/// `nats-server` processes with JetStream, routed to each other as one
/// cluster (or a single server, for `n == 1`), each on free client, route
/// and monitoring ports and in a directory of its own, which holds its
/// JetStream store. A test may kill and restart any of them.
pub struct NatsCluster {
    nodes: Vec<NatsNode>,
    root: PathBuf,
    program: PathBuf,
    cluster_name: String,
}

impl Members for NatsCluster {
    fn exited(&mut self) -> Option<(usize, ExitStatus)> {
        self.nodes
            .iter_mut()
            .enumerate()
            .find_map(|(i, n)| has_exited(&mut n.child).map(|s| (i, s)))
    }

    fn reports(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.nodes[i].log.report(&self.name(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl NatsCluster {
    /// Starts `n` servers. Returns once each answers on its monitoring port
    /// and greets clients and, for more than one, each has a route to every
    /// other and knows the same JetStream meta leader; an error with every
    /// server's output if that does not happen within 30 s, and if
    /// `nats-server` is missing.
    pub fn start(n: usize) -> Result<Self> {
        if n == 0 {
            bail!("a NATS cluster of no servers");
        }
        let program = nats_server();
        let found = Command::new(&program)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        require("nats-server (the binary)", found)?;
        with_fresh_ports("a NATS cluster", || Self::start_once(n, &program))
    }

    fn start_once(n: usize, program: &Path) -> Result<Self> {
        let name = unique_prefix("nats");
        let root = std::env::temp_dir().join(&name);
        let ports = free_ports(3 * n)?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let dir = root.join(format!("server{i}"));
            std::fs::create_dir_all(&dir)?;
            nodes.push(NatsNode {
                client_port: ports[i],
                cluster_port: ports[n + i],
                monitor_port: ports[2 * n + i],
                log: BrokerLog::new(&dir),
                dir,
                child: None,
            });
        }
        // Owned before anything can fail, so that a failed start kills
        // what it started.
        let mut c = Self {
            nodes,
            root,
            program: program.to_owned(),
            cluster_name: name,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        settle(
            &mut c,
            "a NATS cluster forming",
            NATS_CEILING,
            Self::settled,
        )?;
        Ok(c)
    }

    fn name(&self, i: usize) -> String {
        format!(
            "nats-server {i} of a cluster, on port {}",
            self.nodes[i].client_port
        )
    }

    /// Starts server `i`, without waiting for it: its peers route to it
    /// only once all have started.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let routes: Vec<String> = (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.nodes[j].cluster_port))
            .collect();
        let n = &mut self.nodes[i];
        let out = n.log.next_start()?;
        let mut cmd = Command::new(&self.program);
        cmd.args(["-a", "127.0.0.1", "-p", &n.client_port.to_string()])
            .args(["-m", &n.monitor_port.to_string()])
            // A stable name: JetStream knows a peer by it, so a restarted
            // server rejoins as itself (the default is new at every start).
            .args(["-n", &format!("s{i}")])
            .arg("-js")
            .arg("-sd")
            .arg(n.dir.join("store"))
            .stdin(Stdio::null())
            // It logs to its stderr, kept with its stdout in its directory.
            .stdout(out.try_clone()?)
            .stderr(out);
        if !routes.is_empty() {
            cmd.args(["--cluster_name", &self.cluster_name])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", n.cluster_port)])
                .args(["--routes", &routes.join(",")]);
        }
        n.child = Some(cmd.spawn().context("starting nats-server")?);
        Ok(())
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Every live server answers `/varz` and greets clients; with peers,
    /// each has a route to every other live one, and all know the same
    /// JetStream meta leader.
    fn settled(&self) -> std::result::Result<(), String> {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.running(i)).collect();
        let mut leaders = Vec::new();
        for &i in &live {
            self.monitor(i, "/varz")
                .map_err(|_| format!("server {i} does not answer /varz yet"))?;
            // It serves its monitoring port before it listens for clients.
            if !nats_answers(&format!("127.0.0.1:{}", self.nodes[i].client_port)) {
                return Err(format!("server {i} does not greet clients yet"));
            }
            if self.nodes.len() == 1 {
                continue;
            }
            let routes = self.num_routes(i).map_err(|e| format!("{e:#}"))?;
            if routes != live.len() - 1 {
                return Err(format!("server {i} has {routes} routes"));
            }
            let jsz = self.monitor(i, "/jsz").map_err(|e| format!("{e:#}"))?;
            let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if leader.is_empty() {
                return Err(format!("server {i} knows no JetStream meta leader"));
            }
            leaders.push(leader.to_owned());
        }
        if leaders.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "the servers know different meta leaders: {leaders:?}"
            ));
        }
        Ok(())
    }

    /// `nats://127.0.0.1:P1,127.0.0.1:P2,...`: every server's client port.
    pub fn url(&self) -> String {
        let ports: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client_port))
            .collect();
        format!("nats://{}", ports.join(","))
    }

    /// The client port of server `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.nodes[i].client_port
    }

    /// The monitoring port of server `i`.
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor_port
    }

    /// The JSON of a monitoring endpoint of server `i` (`/varz`, `/routez`,
    /// `/jsz`, ...).
    pub fn monitor(&self, i: usize, path: &str) -> Result<serde_json::Value> {
        let body = http_get(self.nodes[i].monitor_port, path)
            .with_context(|| format!("{} does not answer {path}", self.name(i)))?;
        serde_json::from_str(&body).with_context(|| format!("{path} of {}", self.name(i)))
    }

    /// How many routes server `i` has now (`num_routes` of `/routez`).
    pub fn num_routes(&self, i: usize) -> Result<usize> {
        let routez = self.monitor(i, "/routez")?;
        let n = routez["num_routes"]
            .as_u64()
            .with_context(|| format!("/routez of {} without num_routes", self.name(i)))?;
        Ok(usize::try_from(n)?)
    }

    /// Kills server `i` (SIGKILL: no goodbye to clients or peers).
    pub fn kill(&mut self, i: usize) {
        kill_child(&mut self.nodes[i].child);
    }

    /// Starts server `i` again after [`NatsCluster::kill`], on the same
    /// ports, name and store. Returns once the live servers have settled
    /// again, as [`NatsCluster::start`] does.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        kill_child(&mut self.nodes[i].child);
        self.spawn(i)?;
        settle(
            self,
            &format!("server {i} rejoining a NATS cluster"),
            NATS_CEILING,
            Self::settled,
        )?;
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            kill_child(&mut n.child);
        }
        for i in 0..self.nodes.len() {
            clean_up(&self.name(i), &self.nodes[i].log, &self.nodes[i].dir);
        }
        // Gone only if every server's directory is: a failed test keeps them.
        let _ = std::fs::remove_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_follow_the_cluster_specification() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo"), 12182);
        // The hash tag is hashed alone, unless it is empty.
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn a_line_of_cluster_nodes_is_read() {
        let l = NodeLine::parse(
            "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host \
             slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected",
        )
        .expect("a replica's line");
        assert_eq!(l.port, Some(30004));
        assert!(l.has("slave") && !l.failing() && l.slots.is_empty());
        let l = NodeLine::parse(
            "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 \
             myself,master,fail? - 0 0 1 connected 0-5460 7000 [5461->-abc]",
        )
        .expect("a master's line");
        assert_eq!(l.slots, vec![(0, 5460), (7000, 7000)]);
        assert!(l.has("myself") && l.failing() && l.serves(7000) && !l.serves(5461));
        assert_eq!(
            NodeLine::parse("abc :0@0 handshake - 0 0 0 connected").map(|l| l.port),
            Some(None)
        );
    }
}
