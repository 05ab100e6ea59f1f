//! Helpers for fault tests against processes of the real binary: a node's
//! counters and readiness, SIGKILL, and numbered traffic that runs across a
//! fault (a broker restart, a lost connection) and reports what arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::Client;
use crate::client::Event;
use crate::cluster::{Process, ProcessNode};
use crate::services::http_get;

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

/// Waits until the node's `/ready` answers 200; returns how long that took.
pub async fn wait_ready(node: &ProcessNode, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(node.ws.context("no ws")?, "/ready").await {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < within,
            "node {} not ready within {within:?}",
            node.node_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the node's `/ready` answers 503; returns the reason it gives.
pub async fn wait_unready(node: &ProcessNode, within: Duration) -> Result<String> {
    let t = Instant::now();
    loop {
        let (status, body) = http_get(node.ws.context("no ws")?, "/ready").await?;
        if status == 503 {
            return Ok(body);
        }
        ensure!(
            t.elapsed() < within,
            "node {} still ready after {within:?}",
            node.node_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Sends numbered pushes from `sender` to user `to`, one every 3 ms, until
/// `stop`; `sent` counts them.
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

async fn collect(receiver: &mut Client, got: &mut Vec<u64>, for_: Duration) -> Result<()> {
    let until = Instant::now() + for_;
    while Instant::now() < until {
        if let Ok(Event::Text(s)) = receiver.next_event(Duration::from_millis(50)).await {
            got.push(s.parse()?);
        }
    }
    Ok(())
}

/// Runs traffic from `sender` to `receiver`'s user, applies `fault` in the
/// middle, waits until a push sent after the fault arrives (within `resume`),
/// drains, and waits for `nodes` to be ready again.
pub async fn across_fault(
    sender: Client,
    mut receiver: Client,
    fault: impl std::future::Future<Output = Result<()>>,
    resume: Duration,
    nodes: &[&ProcessNode],
) -> Result<Outcome> {
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let task = traffic(sender, receiver.uid.clone(), stop.clone(), sent.clone());
    let mut got = Vec::new();
    // Traffic flows before the fault.
    collect(&mut receiver, &mut got, Duration::from_millis(400)).await?;
    ensure!(!got.is_empty(), "no traffic before the fault");
    fault.await?;
    let after = Instant::now();
    let sent_at_fault = sent.load(Ordering::Relaxed);
    // Service resumes by itself: a push made after the fault arrives.
    let recovery = loop {
        if let Ok(Event::Text(s)) = receiver.next_event(Duration::from_millis(50)).await {
            let n: u64 = s.parse()?;
            got.push(n);
            if n > sent_at_fault {
                break after.elapsed();
            }
        }
        ensure!(
            after.elapsed() < resume,
            "no delivery within {resume:?} after the fault"
        );
    };
    collect(&mut receiver, &mut got, Duration::from_millis(500)).await?;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let sent = sent.load(Ordering::Relaxed);
    // Drain what is still in flight.
    while let Ok(Event::Text(s)) = receiver.next_event(Duration::from_millis(1500)).await {
        got.push(s.parse()?);
    }
    for n in nodes {
        wait_ready(n, Duration::from_secs(10)).await?;
    }
    Ok(Outcome {
        got,
        sent,
        recovery,
        receiver,
    })
}
