//! A network namespace for partition tests: a node runs inside it, its
//! broker outside, and the test cuts or degrades the link between them while
//! the node keeps serving its clients.
//!
//! A [`NetNs`] is joined to the root namespace by two veth pairs, each a /30
//! of a /29 block of 10.213.0.0/16 that no other live fixture holds:
//!
//! - the *broker link* (`.1` outside, `.2` inside): what [`NetNs::cut`] and
//!   [`NetNs::degrade`] impair. Brokers are reached across it through
//!   [`NetNs::forward`], a TCP forwarder in the test process listening on the
//!   outer address (brokers listen on 127.0.0.1, which the namespace cannot
//!   reach; RabbitMQ also lets `guest` in from loopback only).
//! - the *client link* (`.5` outside, `.6` inside, [`NetNs::inner`]): never
//!   impaired, so that the test's clients and its `/ready` and `/stats`
//!   probes still reach a node whose broker link is cut, as a node's clients
//!   do when it loses only its broker.
//!
//! How the link is impaired. A partition is modelled as loss on the wire:
//! a classic-BPF classifier at the *ingress* of both ends of the broker link
//! (tc `clsact`, `bpf da`) drops what arrives. Each TCP stack believes it
//! sent: nothing is refused, reset or reported, connections hang and
//! retransmit, new connections time out, as across a real partition. Not
//! `ip link set down`, which takes the routes away so that connects fail at
//! once with "network unreachable", nor a drop at egress, which TCP sees as
//! local congestion. Not `tc netem` either: kernels built without
//! `CONFIG_NET_SCH_NETEM` (this project's test machines) have no netem, but
//! they have `cls_bpf`. Random loss uses the same classifier with BPF's
//! random-number load; delay is added by the forwarder, which holds each
//! chunk it relays for the delay, each way (TCP's own round trip on the veth
//! stays short, so a lost segment is retransmitted after the 200 ms minimum
//! RTO rather than after a long one: the delay stacks on top of the losses'
//! stalls).
//!
//! Needs root (or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and iproute2's `ip`
//! and `tc`. Where a namespace cannot be made, [`NetNs::or_skip`] fails the
//! test under `CI=true` and skips it, loudly, elsewhere.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Names of this fixture's namespaces: `sbn-PID-N`.
const NS_PREFIX: &str = "sbn-";
/// /29 blocks in 10.213.0.0/16.
const BLOCKS: u32 = 8192;
/// The inside ends of the two links (names are per namespace).
const LINK_INSIDE: &str = "link0";
const CLIENT_INSIDE: &str = "client0";

/// Runs `program args`; an error with what it printed if it fails.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the namespaces of this fixture whose process is gone (a test
/// killed before its drop ran); their veth pairs go with them.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Another process may be removing it too.
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// The classic-BPF program (tc's `bytecode` notation) that drops a share
/// `loss` of the packets (0 to 1) and lets the rest through, in
/// direct-action mode (its return value is the verdict: 2 drops, 0 passes).
fn drop_program(loss: f64) -> String {
    if loss >= 1.0 {
        return "1,6 0 0 2".to_owned();
    }
    // `ld rand` (the ancillary load at SKF_AD_OFF + SKF_AD_RANDOM), then
    // drop when it exceeds the share of the 32-bit range that passes.
    let pass = ((1.0 - loss.max(0.0)) * f64::from(u32::MAX)) as u32;
    format!(
        "4,32 0 0 {},37 0 1 {pass},6 0 0 2,6 0 0 0",
        (-4096i32 + 56) as u32
    )
}

/// A network namespace joined to the root one by a broker link that the
/// test impairs and a client link that it never does. Dropping it deletes
/// the namespace and both links, and stops its forwarders.
pub struct NetNs {
    name: String,
    /// The outer end of the broker link.
    link_outside: String,
    /// The root namespace's address on the broker link: forwarders listen here.
    pub outside: Ipv4Addr,
    /// The namespace's address on the client link: nodes inside listen here.
    pub inner: Ipv4Addr,
    /// The delay each forwarder adds to each chunk it relays, each way (ms).
    delay_ms: Arc<AtomicU64>,
    forwarders: Mutex<Vec<AbortHandle>>,
    impaired: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NetNs({} via {}, inner {})",
            self.name, self.outside, self.inner
        )
    }
}

impl NetNs {
    /// Makes a namespace with its two links; an error naming what failed
    /// (not root, no iproute2, a kernel without veth or cls_bpf).
    pub fn new() -> Result<Self> {
        static CLEAN: Once = Once::new();
        static N: AtomicU32 = AtomicU32::new(0);
        CLEAN.call_once(remove_stale);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}{pid}-{n}");
        run("ip", &["netns", "add", &name])?;
        // From here on, a failure drops the namespace (and what is in it).
        let mut ns = NetNs {
            name,
            link_outside: String::new(),
            outside: Ipv4Addr::UNSPECIFIED,
            inner: Ipv4Addr::UNSPECIFIED,
            delay_ms: Arc::new(AtomicU64::new(0)),
            forwarders: Mutex::new(Vec::new()),
            impaired: false.into(),
        };
        // A block is claimed by creating its outer interface, which fails
        // when another live fixture holds that name: no two share addresses.
        let start = (pid.wrapping_mul(61) ^ n.wrapping_mul(8191)) % BLOCKS;
        let mut block = None;
        for k in 0..BLOCKS {
            let b = (start + k) % BLOCKS;
            let outside = format!("sbn{b}l");
            match run(
                "ip",
                &[
                    "link",
                    "add",
                    &outside,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    LINK_INSIDE,
                    "netns",
                    &ns.name,
                ],
            ) {
                Ok(()) => {
                    ns.link_outside = outside;
                    block = Some(b);
                    break;
                }
                Err(e) if e.to_string().contains("File exists") => continue,
                Err(e) => return Err(e),
            }
        }
        let block = block.context("every address block of 10.213.0.0/16 is taken")?;
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + block * 8;
        ns.outside = Ipv4Addr::from(base + 1);
        ns.inner = Ipv4Addr::from(base + 6);
        let client_outside = format!("sbn{block}c");
        let addr = |a: u32| format!("{}/30", Ipv4Addr::from(base + a));
        let name = ns.name.clone();
        run(
            "ip",
            &[
                "link",
                "add",
                &client_outside,
                "type",
                "veth",
                "peer",
                "name",
                CLIENT_INSIDE,
                "netns",
                &name,
            ],
        )?;
        for (dev, a) in [(&ns.link_outside, 1), (&client_outside, 5)] {
            run("ip", &["addr", "add", &addr(a), "dev", dev])?;
            run("ip", &["link", "set", dev, "up"])?;
        }
        for (dev, a) in [(LINK_INSIDE, 2), (CLIENT_INSIDE, 6)] {
            run("ip", &["-n", &name, "addr", "add", &addr(a), "dev", dev])?;
            run("ip", &["-n", &name, "link", "set", dev, "up"])?;
        }
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        // The classifiers' hooks, now, so that a kernel without them fails
        // here rather than in the middle of a test.
        run("tc", &["qdisc", "add", "dev", &ns.link_outside, "clsact"])?;
        run(
            "tc",
            &["-n", &name, "qdisc", "add", "dev", LINK_INSIDE, "clsact"],
        )?;
        Ok(ns)
    }

    /// [`NetNs::new`], or `None` with a line on stderr when this machine
    /// cannot make namespaces; under `CI=true` that is an error: a partition
    /// test never passes without having run there.
    pub fn or_skip() -> Result<Option<Self>> {
        match Self::new() {
            Ok(ns) => Ok(Some(ns)),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!(
                    "SKIPPED: this test needs network namespaces (root or CAP_NET_ADMIN, iproute2's \
                     ip and tc, veth and cls_bpf in the kernel), and cannot make one here: {e:#}. \
                     With CI=true it fails instead."
                );
                Ok(None)
            }
            Err(e) => Err(e.context(
                "a partition test needs network namespaces (root or CAP_NET_ADMIN, iproute2)",
            )),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The words that run a command inside the namespace (`ip netns exec
    /// NAME`), for [`crate::cluster::ProcessNode::spawn_via`]. `ip` execs
    /// the command, so its process id is the command's.
    pub fn prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// `program` to run inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Relays TCP connections made to the returned address (the outer end of
    /// the broker link) to `upstream` (a broker on 127.0.0.1, say), adding
    /// the delay of [`NetNs::degrade`]. Runs until the namespace is dropped.
    /// Needs a tokio runtime.
    pub async fn forward(&self, upstream: SocketAddr) -> Result<SocketAddr> {
        let listener = TcpListener::bind((self.outside, 0)).await?;
        let addr = listener.local_addr()?;
        let delay = self.delay_ms.clone();
        let task = tokio::spawn(async move {
            // Relays live in the set: aborting the listener ends them too.
            let mut relays = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((down, _)) = accepted else { continue };
                        relays.spawn(relay(down, upstream, delay.clone()));
                    }
                    Some(_) = relays.join_next(), if !relays.is_empty() => {}
                }
            }
        });
        self.forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task.abort_handle());
        Ok(addr)
    }

    /// Installs `program` at the ingress of both ends of the broker link.
    fn filter(&self, program: &str) -> Result<()> {
        let args = |dev| {
            [
                "filter", "replace", "dev", dev, "ingress", "pref", "1", "handle", "1", "bpf",
                "da", "bytecode", program,
            ]
        };
        run("tc", &args(&self.link_outside))?;
        let mut inside = vec!["-n", self.name.as_str()];
        inside.extend(args(LINK_INSIDE));
        run("tc", &inside)?;
        self.impaired.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Cuts the broker link: every packet is lost, both ways, silently.
    pub fn cut(&self) -> Result<()> {
        self.filter(&drop_program(1.0))
    }

    /// Degrades the broker link: `delay_ms` more each way, and `loss_pct`
    /// percent of the packets lost each way.
    pub fn degrade(&self, delay_ms: u64, loss_pct: f64) -> Result<()> {
        self.delay_ms.store(delay_ms, Ordering::Relaxed);
        self.filter(&drop_program(loss_pct / 100.0))
    }

    /// Restores the broker link: no loss, no delay.
    pub fn heal(&self) -> Result<()> {
        self.delay_ms.store(0, Ordering::Relaxed);
        if self.impaired.swap(false, Ordering::Relaxed) {
            run(
                "tc",
                &["filter", "del", "dev", &self.link_outside, "ingress"],
            )?;
            run(
                "tc",
                &[
                    "-n",
                    &self.name,
                    "filter",
                    "del",
                    "dev",
                    LINK_INSIDE,
                    "ingress",
                ],
            )?;
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for f in self
            .forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            f.abort();
        }
        // The inner ends go with the namespace, and their outer ends with them.
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "could not delete the network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// One relayed connection: both ways, each through a delay line.
async fn relay(down: TcpStream, upstream: SocketAddr, delay: Arc<AtomicU64>) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let (down_read, down_write) = down.into_split();
    let (up_read, up_write) = up.into_split();
    tokio::join!(
        pump(down_read, up_write, &delay),
        pump(up_read, down_write, &delay)
    );
}

/// Copies `from` to `to`, each chunk written `delay` after it was read;
/// passes the end of the stream on (a FIN), and stops when either side fails.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: &AtomicU64,
) {
    // Bounded: a side that does not read holds the other back, as TCP does.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Bytes)>(256);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    if tx.send((Instant::now(), chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async {
        while let Some((read_at, chunk)) = rx.recv().await {
            let wait = Duration::from_millis(delay.load(Ordering::Relaxed));
            tokio::time::sleep_until((read_at + wait).into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_program_drops_everything_or_a_share() {
        assert_eq!(drop_program(1.0), "1,6 0 0 2");
        assert_eq!(
            drop_program(0.05),
            format!(
                "4,32 0 0 4294963256,37 0 1 {},6 0 0 2,6 0 0 0",
                4_080_218_930u32
            )
        );
    }

    /// Loss on the wire: a connection across a cut hangs rather than fails,
    /// and works again once healed; the client link is never cut.
    #[tokio::test]
    async fn a_cut_link_swallows_connections_and_a_healed_one_carries_them() {
        let Some(ns) = NetNs::or_skip().unwrap() else {
            return;
        };
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let via = ns.forward(upstream).await.unwrap();
        // From inside: bash's /dev/tcp, with a deadline of its own.
        let reach = |secs: &str| {
            let mut cmd = ns.exec("timeout");
            cmd.args([secs, "bash", "-c"]).arg(format!(
                "exec 3<>/dev/tcp/{}/{} && echo hi >&3 && head -c3 <&3",
                via.ip(),
                via.port()
            ));
            // Not blocking the runtime: the forwarder runs on it.
            tokio::process::Command::from(cmd).output()
        };
        let out = reach("5").await.unwrap();
        assert_eq!(out.stdout, b"hi\n", "{out:?}");

        ns.cut().unwrap();
        let t = Instant::now();
        let out = reach("2").await.unwrap();
        assert!(
            !out.status.success() && t.elapsed() >= Duration::from_millis(1900),
            "across a cut a connect hangs until its deadline, not fails at once: {out:?} after {:?}",
            t.elapsed()
        );
        ns.heal().unwrap();
        let out = reach("5").await.unwrap();
        assert_eq!(out.stdout, b"hi\n", "{out:?}");
    }
}
