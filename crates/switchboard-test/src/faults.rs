//! Helpers for fault tests against processes of the real binary: a node's
//! counters and readiness, SIGKILL, numbered traffic that runs across a
//! fault (a broker restart, a lost connection) and reports what arrived, and
//! envelopes and sequenced bundles to publish onto a backplane by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use switchboard::core::bundle::Bundle;
use switchboard::core::{Body, Envelope, Frame, NodeId, Target};

use crate::client::Event;
use crate::cluster::{Process, ProcessNode};
use crate::services::http_get;
use crate::{Client, STEP};

/// The node's `/stats`.
pub async fn stats(node: &ProcessNode) -> Result<Value> {
    let (status, body) = http_get(node.ws.context("no ws")?, "/stats").await?;
    ensure!(status == 200, "/stats answered {status}");
    Ok(serde_json::from_str(&body)?)
}

/// One of the node's backplane counters.
pub async fn backplane(node: &ProcessNode, counter: &str) -> Result<u64> {
    stats(node).await?["backplane"][counter]
        .as_u64()
        .with_context(|| format!("no backplane counter {counter}"))
}

/// Checks every 20 ms until `check` gives a value (`Ok`), for at most
/// `within`; then fails with what the last check said instead (`Err`).
pub async fn poll<T, Miss: std::fmt::Display>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<std::result::Result<T, Miss>>,
) -> Result<T> {
    let t = Instant::now();
    loop {
        match check().await? {
            Ok(v) => return Ok(v),
            Err(miss) => ensure!(t.elapsed() < within, "{miss} after {within:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the node's backplane `counter` satisfies `done`; returns its
/// value then.
pub async fn wait_backplane(
    node: &ProcessNode,
    counter: &str,
    done: impl Fn(u64) -> bool,
    within: Duration,
) -> Result<u64> {
    poll(within, async || {
        let v = backplane(node, counter).await?;
        Ok(if done(v) {
            Ok(v)
        } else {
            Err(format!("node {}: {counter} still {v}", node.node_id))
        })
    })
    .await
}

/// Waits until the node's `/ready` answers 200; returns how long that took.
pub async fn wait_ready(node: &ProcessNode, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    let addr = node.ws.context("no ws")?;
    poll(within, async || {
        Ok(match http_get(addr, "/ready").await {
            Ok((200, _)) => Ok(t.elapsed()),
            _ => Err(format!("node {} not ready", node.node_id)),
        })
    })
    .await
}

/// Waits until the node's `/ready` answers 503; returns the reason it gives.
pub async fn wait_unready(node: &ProcessNode, within: Duration) -> Result<String> {
    let addr = node.ws.context("no ws")?;
    poll(within, async || {
        let (status, body) = http_get(addr, "/ready").await?;
        Ok(if status == 503 {
            Ok(body)
        } else {
            Err(format!("node {} still ready", node.node_id))
        })
    })
    .await
}

/// Kills the node's process with SIGKILL: no goodbye to anyone.
pub fn kill9(node: &ProcessNode) -> Result<()> {
    let pid = node.pid();
    // 0 would signal this whole process group.
    ensure!(pid != 0, "node {} has already exited", node.node_id);
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -KILL failed");
    Ok(())
}

/// Two nodes of the binary `bin` on `cluster`, a TCP client `sender` on the
/// first and a WebSocket client `receiver` on the second.
pub async fn two_nodes(
    bin: &str,
    cluster: &str,
    sender: &str,
    receiver: &str,
) -> Result<(Process, Client, Client)> {
    let p = Process::start_cluster(bin, 2, cluster).await?;
    let s = Client::tcp(p.nodes[0].tcp.context("no tcp")?, sender, None).await?;
    let r = Client::ws(p.nodes[1].ws.context("no ws")?, receiver, None).await?;
    Ok((p, s, r))
}

/// Pushes numbered frames from `sender` to `receiver`'s user, one every
/// 100 ms, until one arrives; returns how long that took and what arrived.
pub async fn push_until_delivered(
    sender: &mut Client,
    receiver: &mut Client,
    within: Duration,
) -> Result<(Duration, String)> {
    let t = Instant::now();
    for i in 0.. {
        let data = format!("probe{i}");
        sender
            .send(json!({"op":"to_user","uid":receiver.uid,"data":data}))
            .await?;
        if let Ok(Event::Text(f)) = receiver.next_event(Duration::from_millis(100)).await {
            return Ok((t.elapsed(), f));
        }
        ensure!(
            t.elapsed() < within,
            "nothing delivered to {} within {within:?}",
            receiver.uid
        );
    }
    unreachable!("the loop returns")
}

/// Asks `request` until the reply satisfies `done` (within `within`);
/// returns the reply and how long it took.
pub async fn ask_until(
    client: &mut Client,
    request: Value,
    done: impl Fn(&Value) -> bool,
    within: Duration,
) -> Result<(Value, Duration)> {
    let t = Instant::now();
    loop {
        let r = client.ask(request.clone()).await?;
        if done(&r) {
            return Ok((r, t.elapsed()));
        }
        ensure!(t.elapsed() < within, "still {r} after {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The frame traffic ends with. Each node handles a sender's pushes in order,
/// so once the receiver has it, every push before it has arrived or is lost
/// for good, and the receiver has counted the gaps before it.
const END: &str = "end";

/// Sends numbered pushes from `sender` to user `to`, one every 3 ms, until
/// `stop`, then [`END`]; `sent` counts the numbered ones.
fn traffic(
    mut sender: Client,
    to: String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<Client>> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            sender
                .send(json!({"op":"to_user","uid":to,"data":i.to_string()}))
                .await?;
            i += 1;
            sent.store(i, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        sender
            .send(json!({"op":"to_user","uid":to,"data":END}))
            .await?;
        Ok(sender)
    })
}

/// What arrived across a fault.
pub struct Outcome {
    /// The numbers the receiver got, in arrival order.
    pub got: Vec<u64>,
    /// How many pushes were sent.
    pub sent: u64,
    /// From the end of the fault to the first delivery of a push sent after it.
    pub recovery: Duration,
    /// The receiver, still connected.
    pub receiver: Client,
}

impl Outcome {
    /// Pushes sent but never received.
    pub fn lost(&self) -> u64 {
        self.sent - self.got.len() as u64
    }

    /// Whether every push arrived at most once, in order.
    pub fn in_order_without_duplicates(&self) -> bool {
        self.got.windows(2).all(|w| w[0] < w[1])
    }
}

/// Receives numbered frames into `got` until `done` holds for the last one
/// (or, with `None`, until [`END`]); fails after `within`.
async fn collect_until(
    receiver: &mut Client,
    got: &mut Vec<u64>,
    within: Duration,
    what: &str,
    done: impl Fn(Option<u64>, &[u64]) -> bool,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let left = within.saturating_sub(t.elapsed());
        let frame = match receiver.next_event(left).await {
            Ok(Event::Text(s)) => s,
            Ok(other) => anyhow::bail!("{what}: the receiver got {other:?}"),
            Err(_) => anyhow::bail!("{what}: not within {within:?}"),
        };
        let n = if frame == END {
            None
        } else {
            let n = frame.parse()?;
            got.push(n);
            Some(n)
        };
        if done(n, got) {
            return Ok(());
        }
        ensure!(n.is_some(), "{what}: the traffic ended first");
    }
}

/// Runs traffic from `sender` to `receiver`'s user, applies `fault` in the
/// middle, waits until a push sent after the fault arrives (within `resume`)
/// and a few more after it, ends the traffic, takes everything up to its end,
/// and waits for `nodes` to be ready again.
pub async fn across_fault(
    sender: Client,
    mut receiver: Client,
    fault: impl std::future::Future<Output = Result<()>>,
    resume: Duration,
    nodes: &[&ProcessNode],
) -> Result<Outcome> {
    // Pushes that must arrive before the fault, and again after the first
    // one that arrives after it.
    const FLOWING: usize = 20;
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let task = traffic(sender, receiver.uid.clone(), stop.clone(), sent.clone());
    let mut got = Vec::new();
    collect_until(
        &mut receiver,
        &mut got,
        STEP,
        "traffic before the fault",
        |_, got| got.len() >= FLOWING,
    )
    .await?;
    fault.await?;
    let after = Instant::now();
    let sent_at_fault = sent.load(Ordering::Relaxed);
    // Service resumes by itself: a push made after the fault arrives.
    collect_until(
        &mut receiver,
        &mut got,
        resume,
        "delivery after the fault",
        |n, _| n.is_some_and(|n| n > sent_at_fault),
    )
    .await?;
    let recovery = after.elapsed();
    let resumed = got.len();
    collect_until(
        &mut receiver,
        &mut got,
        STEP,
        "traffic after the fault",
        |_, got| got.len() >= resumed + FLOWING,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let sent = sent.load(Ordering::Relaxed);
    collect_until(
        &mut receiver,
        &mut got,
        STEP,
        "the end of the traffic",
        |n, _| n.is_none(),
    )
    .await?;
    for n in nodes {
        wait_ready(n, STEP).await?;
    }
    Ok(Outcome {
        got,
        sent,
        recovery,
        receiver,
    })
}

/// An encoded envelope from node `origin` (which need not exist) that pushes
/// `text` to user `uid`: what a peer would send, for tests that publish onto
/// a backplane by hand.
pub fn push_envelope(origin: &str, id: u64, uid: &str, text: &str) -> Result<Bytes> {
    Ok(Envelope {
        origin: NodeId::new(origin)?,
        id,
        body: Body::Push {
            target: Target::user(uid),
            frame: Frame::text(text),
        },
    }
    .encode())
}

/// A sequenced bundle as both pub/sub backplanes carry it (Redis pub/sub and
/// RabbitMQ alike): kind `3`, the sender's epoch (u64 BE), the number of the
/// first envelope on its stream (u64 BE; the others follow on), then each
/// envelope behind its length (u32 BE).
pub fn sequenced_bundle(epoch: u64, first: u64, envelopes: &[Bytes]) -> Vec<u8> {
    let mut b = Bundle::new(17, usize::MAX);
    for e in envelopes {
        b.push(e);
    }
    let header = b.header_mut();
    header[0] = 3;
    header[1..9].copy_from_slice(&epoch.to_be_bytes());
    header[9..17].copy_from_slice(&first.to_be_bytes());
    b.into_bytes()
}
