//! Redis Cluster backplanes while a master dies under traffic: the master of
//! the receiving node's channel (pub/sub) or stream (queue), or the master of
//! the directory. Each test runs a Redis Cluster of its own (three masters
//! with a replica each, node timeout 2 s), two nodes of the real binary, a
//! sender on n0 pushing numbered frames to a user on n1, and kills one master
//! with SIGKILL in the middle of the traffic. Each prints what it measured:
//! how long the failover took, when delivery stopped and resumed, what was
//! lost and what the nodes counted, when `/ready` answered 503, and when the
//! receiving node's liveness had lapsed in the directory.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_test::broker_clusters::RedisCluster;
use switchboard_test::cluster::Process;
use switchboard_test::faults::{self, Outcome};
use switchboard_test::services::{http_get, unique_prefix};
use switchboard_test::{Client, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// How long delivery may take to come back once the cluster has promoted the
/// replica: the nodes' clients learn the new slot map, resubscribe or reopen
/// their stream reader, and rebuild their directory entries. A subscription
/// the cluster client does not move by itself is made again once the node
/// has not heard its own probe for a TTL.
const RESUME: Duration = Duration::from_secs(15);

/// How long the cluster may take to promote the killed master's replica
/// (3–5 s with the 2 s node timeout) before the test takes it for stuck.
const FAILOVER_CEILING: Duration = Duration::from_secs(20);

/// A node TTL that outlasts the failover. A node that cannot renew its
/// liveness for a TTL is dead to its peers: with the directory's master
/// dead for longer than that, every node is, and a peer collects the
/// entries of the others once it is back (see the tests with [`SHORT_TTL`]).
const TTL_BEYOND_FAILOVER: &str = "6";

/// A node TTL shorter than the failover, and than the response timeout of
/// the nodes' Redis commands (3 s).
const SHORT_TTL: &str = "2";

/// Which master a test kills.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Victim {
    /// The master of the receiving node's channel or stream (`P:ch:{n1}`,
    /// `P:q:{n1}`).
    Traffic,
    /// The master of the directory (`{P}:nodes`).
    Directory,
}

/// A Redis Cluster with two nodes on it.
struct Setup {
    broker: RedisCluster,
    /// The master to kill.
    master: usize,
    /// The key whose slot it serves.
    key: String,
    /// The directory's liveness set.
    nodes_key: String,
    /// A member that stays alive, to read the directory through.
    witness: usize,
    p: Process,
    sender: Client,
    receiver: Client,
}

/// A Redis Cluster, two nodes on it in `mode` with node TTL `ttl` (seconds),
/// a sender (TCP) on n0 and a receiver `u` (WebSocket) on n1.
///
/// The prefix is chosen so that each test kills one thing: for
/// [`Victim::Traffic`], a directory on another master than n1's channel or
/// stream; for [`Victim::Directory`], a directory on a master that carries
/// neither node's channel or stream.
async fn start(mode: &'static str, victim: Victim, ttl: &str) -> Setup {
    let (broker, prefix, master, key) = tokio::task::spawn_blocking(move || {
        let broker = RedisCluster::start()?;
        let kind = if mode == "queue" { "q" } else { "ch" };
        // A node's channel and stream are in the slot of its id, whatever
        // the prefix.
        let n0 = broker.master_of_key(&format!("x:{kind}:{{n0}}"))?;
        let n1 = broker.master_of_key(&format!("x:{kind}:{{n1}}"))?;
        for _ in 0..200 {
            let prefix = unique_prefix(&format!("{mode}-failover"));
            let nodes = format!("{{{prefix}}}:nodes");
            let directory = broker.master_of_key(&nodes)?;
            let (fits, key) = match victim {
                Victim::Traffic => (directory != n1, format!("{prefix}:{kind}:{{n1}}")),
                Victim::Directory => (directory != n1 && directory != n0, nodes),
            };
            if fits {
                let master = broker.master_of_key(&key)?;
                return anyhow::Ok((broker, prefix, master, key));
            }
        }
        anyhow::bail!("no prefix puts the directory where the test needs it")
    })
    .await
    .unwrap()
    .unwrap();
    let url = format!("{}?mode={mode}&prefix={prefix}&ttl={ttl}", broker.url());
    let (p, sender, receiver) = faults::two_nodes(BIN, &url, "s", "u").await.unwrap();
    let witness = broker
        .masters()
        .unwrap()
        .into_iter()
        .find(|&m| m != master)
        .unwrap();
    Setup {
        broker,
        master,
        key,
        nodes_key: format!("{{{prefix}}}:nodes"),
        witness,
        p,
        sender,
        receiver,
    }
}

/// A stretch of time, from the kill.
type Window = Option<(Duration, Duration)>;

fn show(w: &Window) -> String {
    match w {
        Some((a, b)) => format!("from +{a:.2?} to +{b:.2?}"),
        None => "never".to_owned(),
    }
}

/// Widens `w` to include `at`.
fn widen(w: &mut Window, at: Duration) {
    let (a, _) = w.get_or_insert((at, at));
    *w = Some((*a, at));
}

/// What was seen of the nodes every [`SAMPLE`] from the kill on.
#[derive(Default)]
struct Watched {
    /// For each node, when `/ready` answered 503, and the reasons it gave.
    unready: [(Window, BTreeSet<String>); 2],
    /// n1's backplane `received` counter: when it changed, and its value.
    received: Vec<(Duration, u64)>,
    /// When n1's liveness deadline (Redis clock) had passed, as the
    /// directory said.
    lapsed: Window,
}

impl Watched {
    /// The longest time n1 received nothing, from the last envelope before
    /// it to the first after it.
    fn longest_stall(&self) -> Window {
        self.received
            .windows(2)
            .map(|w| (w[0].0, w[1].0))
            .max_by_key(|(a, b)| *b - *a)
    }
}

/// How often the nodes are looked at.
const SAMPLE: Duration = Duration::from_millis(50);

/// Whether n1's liveness deadline has passed, asked of cluster member `port`
/// (following redirections); `None` while the directory does not answer.
async fn n1_lapsed(port: u16, nodes_key: &str) -> Option<bool> {
    const SCRIPT: &str = "local t = redis.call('TIME') \
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
         local d = redis.call('ZSCORE', KEYS[1], 'n1') \
         if d and tonumber(d) > now then return 0 end return 1";
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "-c",
            "-p",
            &port.to_string(),
            "EVAL",
            SCRIPT,
            "1",
            nodes_key,
        ])
        .output();
    let out = tokio::time::timeout(SAMPLE * 4, out).await.ok()?.ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Watches the nodes at `addrs` (n0, n1) and the directory through member
/// `port` until `stop`, relative to `from` (see [`Watched`]).
fn watch(
    addrs: [SocketAddr; 2],
    port: u16,
    nodes_key: String,
    from: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Watched> {
    tokio::spawn(async move {
        let mut w = Watched::default();
        while !stop.load(Ordering::Relaxed) {
            for (addr, (window, reasons)) in addrs.iter().zip(&mut w.unready) {
                // A node too busy to answer in time is not a 503: left out.
                let asked = tokio::time::timeout(SAMPLE, http_get(*addr, "/ready")).await;
                if let Ok(Ok((503, reason))) = asked {
                    widen(window, from.elapsed());
                    reasons.insert(reason.trim().to_owned());
                }
            }
            let stats = tokio::time::timeout(SAMPLE, http_get(addrs[1], "/stats")).await;
            if let Ok(Ok((200, body))) = stats {
                let stats: Value = serde_json::from_str(&body).unwrap();
                let n = stats["backplane"]["received"].as_u64().unwrap();
                if w.received.last().is_none_or(|&(_, last)| last != n) {
                    w.received.push((from.elapsed(), n));
                }
            }
            if n1_lapsed(port, &nodes_key).await == Some(true) {
                widen(&mut w.lapsed, from.elapsed());
            }
            tokio::time::sleep(SAMPLE).await;
        }
        w
    })
}

/// What a test measured across the kill.
struct Measured {
    out: Outcome,
    /// From the kill until every live member saw the replica promoted.
    failover: Duration,
    watched: Watched,
    /// The nodes' `/stats` after the traffic.
    stats: Vec<Value>,
}

impl Measured {
    fn counter(&self, node: usize, name: &str) -> u64 {
        self.stats[node]["backplane"][name].as_u64().unwrap()
    }

    /// A counter summed over both nodes.
    fn total(&self, name: &str) -> u64 {
        (0..self.stats.len()).map(|i| self.counter(i, name)).sum()
    }

    /// Distinct numbered pushes the receiver got.
    fn distinct(&self) -> u64 {
        self.out.got.iter().collect::<BTreeSet<_>>().len() as u64
    }

    /// Pushes sent and never received.
    fn lost(&self) -> u64 {
        self.out.sent - self.distinct()
    }

    /// Pushes the receiver got more than once.
    fn duplicates(&self) -> u64 {
        self.out.got.len() as u64 - self.distinct()
    }

    /// Pushes that arrived after one sent later than them.
    fn reordered(&self) -> usize {
        self.out.got.windows(2).filter(|w| w[0] > w[1]).count()
    }
}

/// Runs traffic from the sender to the receiver, kills the master and waits
/// for its failover in the middle of it (the traffic runs on throughout),
/// then measures (see [`Measured`]).
async fn kill_during_traffic(s: Setup) -> (Measured, Process, RedisCluster) {
    let Setup {
        mut broker,
        master,
        nodes_key,
        witness,
        p,
        sender,
        receiver,
        ..
    } = s;
    let stop = Arc::new(AtomicBool::new(false));
    let mut watcher = None;
    let mut failover = Duration::ZERO;
    let fault = async {
        let addrs = [p.nodes[0].ws.unwrap(), p.nodes[1].ws.unwrap()];
        let port = broker.port(witness);
        watcher = Some(watch(addrs, port, nodes_key, Instant::now(), stop.clone()));
        failover = tokio::task::block_in_place(|| {
            broker.kill(master);
            broker.wait_failover(master, FAILOVER_CEILING)
        })?;
        anyhow::Ok(())
    };
    let out = faults::across_fault(sender, receiver, fault, RESUME, &[&p.nodes[0], &p.nodes[1]])
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let watched = watcher.unwrap().await.unwrap();
    let mut stats = Vec::new();
    for n in &p.nodes {
        stats.push(faults::stats(n).await.unwrap());
    }
    let m = Measured {
        out,
        failover,
        watched,
        stats,
    };
    (m, p, broker)
}

/// Prints what a test measured, under `what`.
fn report(what: &str, key: &str, m: &Measured) {
    let counters = |i: usize| {
        format!(
            "published {}, publish_dropped {}, received {}, receive_dropped {}, duplicates {}, \
             expired {}, reconnects {}",
            m.counter(i, "published"),
            m.counter(i, "publish_dropped"),
            m.counter(i, "received"),
            m.counter(i, "receive_dropped"),
            m.counter(i, "duplicates"),
            m.counter(i, "expired"),
            m.counter(i, "reconnects"),
        )
    };
    let w = &m.watched;
    eprintln!(
        "{what} (killed the master of {key}): failover {:.2?}; n1 received nothing {}; a push \
         sent after the failover arrived {:.2?} after it; sent {}, received {} ({} distinct), \
         lost {}, duplicates delivered {}, reordered {}\n  n0: {}\n  n1: {}\n  /ready n0: 503 {} \
         {:?}\n  /ready n1: 503 {} {:?}\n  n1's liveness lapsed in the directory: {}",
        m.failover,
        show(&w.longest_stall()),
        m.out.recovery,
        m.out.sent,
        m.out.got.len(),
        m.distinct(),
        m.lost(),
        m.duplicates(),
        m.reordered(),
        counters(0),
        counters(1),
        show(&w.unready[0].0),
        w.unready[0].1,
        show(&w.unready[1].0),
        w.unready[1].1,
        show(&w.lapsed),
    );
}

/// Pub/sub across the kill of `victim`'s master, with node TTL `ttl`; checks
/// the promise of the mode: at most once, in order, and every loss counted.
async fn pubsub_across_a_kill(victim: Victim, ttl: &str) -> Measured {
    let s = start("pubsub", victim, ttl).await;
    let key = s.key.clone();
    let (m, p, _broker) = kill_during_traffic(s).await;
    report(
        &format!("pubsub, ttl {ttl}, {victim:?} master killed"),
        &key,
        &m,
    );

    // `across_fault` has checked that delivery resumed within `RESUME` of
    // the failover, and that both nodes answer `/ready` again.
    assert!(
        m.duplicates() == 0 && m.reordered() == 0,
        "at most once and in order: {} duplicates, {} reordered",
        m.duplicates(),
        m.reordered()
    );
    // The receiver counts only numbers it never saw; the sender counts
    // publishes that failed, which the dead master may have delivered all
    // the same, or whose numbers the receiver counts too.
    let (gaps, dropped) = (m.total("receive_dropped"), m.total("publish_dropped"));
    assert!(
        gaps <= m.lost(),
        "the receiver counted {gaps} missing, but {} were lost",
        m.lost()
    );
    assert!(
        m.lost() <= gaps + dropped,
        "{} lost, but only {gaps} counted by the receiver and {dropped} by the sender",
        m.lost()
    );
    Box::new(p).shutdown().await;
    m
}

/// Pub/sub, the master of n1's channel killed: what is published to it
/// until the failover is lost, and each loss is counted, by the sender (its
/// publish failed) or by the receiver (a gap in the sender's numbers once
/// delivery resumes, with more pushes after it).
///
/// n1 need not answer 503 meanwhile, so that is only printed: its
/// subscription looks fine to it until it has missed its own probes for a
/// TTL, and then it subscribes again at once; whether one of its commands
/// times out first depends on when it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_a_master_killed_during_traffic() {
    let m = pubsub_across_a_kill(Victim::Traffic, TTL_BEYOND_FAILOVER).await;
    assert!(m.lost() > 0, "a failover of n1's channel lost nothing");
}

/// Pub/sub, the master of the directory killed: heartbeats, route lookups
/// and directory writes wait for the replica to take over. The nodes keep
/// sending to the routes they know, to channels on other masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_the_directory_master_killed_during_traffic() {
    pubsub_across_a_kill(Victim::Directory, TTL_BEYOND_FAILOVER).await;
}

/// As [`pubsub_a_master_killed_during_traffic`], with a TTL shorter than
/// the response timeout. n1's heartbeat renews its liveness, on a live
/// master, then probes n1's own channel, on the dead one, and waits out the
/// 3 s response timeout before renewing again: n1's liveness lapses for
/// about two seconds, during which n0 sends it nothing and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_a_master_killed_under_a_short_ttl() {
    pubsub_across_a_kill(Victim::Traffic, SHORT_TTL).await;
}

/// As [`pubsub_the_directory_master_killed_during_traffic`], with a TTL
/// shorter than the failover: every node's liveness lapses while the
/// directory is away; the first node back takes the other for dead,
/// collects its entries and sends it nothing until it has renewed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "after the fixes for lapsed holders and for collecting after an outage, 2 runs \
            of 4 lost nothing during the traffic, but the push that ends it never arrived \
            within 10 s: a push lost after the directory's failover, not yet understood"]
async fn pubsub_the_directory_master_killed_under_a_short_ttl() {
    pubsub_across_a_kill(Victim::Directory, SHORT_TTL).await;
}

/// At most this many pushes may be lost in queue mode: those the dead
/// master acknowledged and had not yet passed to its replica. Replication is
/// asynchronous but immediate (the reply to the writer and the stream to the
/// replica leave in the same turn of the master's event loop), so only what
/// was written in the last moment before the kill is at risk, a few pushes
/// at this rate. Nothing else is lost: a failed write is retried.
const QUEUE_LOSS_BOUND: u64 = 50;

/// Queue mode, the master of n1's stream killed, with a TTL shorter than the
/// failover: n1's liveness may lapse, but a queue keeps collecting for a
/// node that looks dead (for `queue_age`). What the dead master acknowledged
/// and had not yet passed to its replica is gone from the promoted replica,
/// and nothing counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_a_master_killed_during_traffic() {
    let s = start("queue", Victim::Traffic, SHORT_TTL).await;
    let key = s.key.clone();
    let (m, p, _broker) = kill_during_traffic(s).await;
    report(
        &format!("queue, ttl {SHORT_TTL}, Traffic master killed"),
        &key,
        &m,
    );
    assert!(
        m.duplicates() == 0 && m.reordered() == 0,
        "at least once, duplicates dropped by envelope id, in order: {} duplicates, {} reordered",
        m.duplicates(),
        m.reordered()
    );
    assert!(
        m.lost() <= QUEUE_LOSS_BOUND,
        "{} lost: more than the dead master can have acknowledged without replicating",
        m.lost()
    );
    // n1's stream read fails after the response timeout (3 s), and n1 cannot
    // read again before the failover (3–5 s): it says so for that long.
    assert!(
        m.watched.unready[1].0.is_some(),
        "n1 never answered 503 while its stream's master was dead"
    );
    Box::new(p).shutdown().await;
}
