//! Streams with history under faults, against real processes of the binary
//! on Redis pub/sub: a client whose connection is reset, or whose node is
//! killed, in the middle of a stream of recorded pushes recovers on the
//! other node every message once and in order; across a restart of a Redis
//! without persistence nothing accepted is lost without the client being
//! told (`recovered:false`); and a TCP client recovers through its hello.
//!
//! Each test prints what it measured (replayed and live entries, losses and
//! notices, recovery times) for the record.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_test::client::Event;
use switchboard_test::cluster::{Process, ProcessNode};
use switchboard_test::http::api;
use switchboard_test::services::RedisServer;
use switchboard_test::{Client, STEP};

const KEY: &str = "a-test-api-key-0123456789";

/// Entries kept per stream: far more than any test pushes, so that only the
/// fault under test can make a recovery fall short.
const HISTORY_SIZE: &str = "5000";

/// The pushers' pace: one request every 5 ms (200/s), each answered before
/// the next.
const PACE: Duration = Duration::from_millis(5);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// A position, `<offset>-<epoch hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    offset: u64,
    epoch: u64,
}

impl Pos {
    fn parse(s: &str) -> Result<Self> {
        let (offset, epoch) = s
            .split_once('-')
            .with_context(|| format!("position {s:?}"))?;
        Ok(Pos {
            offset: offset.parse().with_context(|| format!("position {s:?}"))?,
            epoch: u64::from_str_radix(epoch, 16).with_context(|| format!("position {s:?}"))?,
        })
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{:x}", self.offset, self.epoch)
    }
}

/// One push the pusher made: message `m{n}`, when its request was sent, and
/// its position if the API accepted it (200).
#[derive(Debug, Clone)]
struct Push {
    n: u64,
    sent_at: Instant,
    pos: Option<Pos>,
}

/// What a pusher did.
#[derive(Debug, Default)]
struct Pushed {
    pushes: Vec<Push>,
    /// The first few answers other than 200, for the report.
    refusals: Vec<String>,
}

impl Pushed {
    fn accepted(&self) -> impl Iterator<Item = &Push> {
        self.pushes.iter().filter(|p| p.pos.is_some())
    }

    fn refused(&self) -> usize {
        self.pushes.len() - self.accepted().count()
    }
}

/// Records `data` to alice through the API at `api_addr`: its position, or
/// what the API answered instead.
async fn record(api_addr: SocketAddr, data: &str) -> Result<std::result::Result<Pos, String>> {
    let body = json!({"users": ["alice"], "data": data, "history": true});
    Ok(match api(api_addr, Some(KEY), "push", &body).await {
        Ok((status, v)) if status == 200 => {
            let pos = v["result"]["positions"]["user:alice"]
                .as_str()
                .with_context(|| format!("no position in {v}"))?;
            Ok(Pos::parse(pos)?)
        }
        Ok((status, v)) => Err(format!("{status} {v}")),
        Err(e) => Err(format!("{e:#}")),
    })
}

/// Pushes recorded messages `m0`, `m1`, ... to alice through the API at
/// `api_addr`, one every [`PACE`], for `run`; `refused` counts the pushes
/// the API did not accept as they happen.
fn pusher(
    api_addr: SocketAddr,
    run: Duration,
    refused: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<Pushed>> {
    tokio::spawn(async move {
        let mut out = Pushed::default();
        let mut tick = tokio::time::interval(PACE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start = Instant::now();
        for n in 0.. {
            tick.tick().await;
            if start.elapsed() >= run {
                break;
            }
            let sent_at = Instant::now();
            let pos = match record(api_addr, &format!("m{n}")).await? {
                Ok(pos) => Some(pos),
                Err(refusal) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    if out.refusals.len() < 3 {
                        out.refusals.push(format!("m{n}: {refusal}"));
                    }
                    None
                }
            };
            out.pushes.push(Push { n, sent_at, pos });
        }
        Ok(out)
    })
}

/// A frame alice got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    /// Recorded message `m{n}` at `pos`.
    Entry { n: u64, pos: Pos },
    /// A recorded fence, which ends a test's traffic.
    Fence(Pos),
    /// `{"op":"recovered","stream":"user:alice","recovered":...}`.
    Recovered(bool),
}

/// Reads one frame of alice's as a [`Got`]; an error on anything else.
fn parse_frame(text: &str) -> Result<Got> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("not JSON: {text:?}"))?;
    ensure!(
        v["stream"] == "user:alice",
        "a frame of another stream: {v}"
    );
    match v["op"].as_str() {
        Some("push") => {
            let pos = Pos::parse(v["pos"].as_str().context("no pos")?)?;
            let data = v["data"]
                .as_str()
                .with_context(|| format!("no data: {v}"))?;
            if data.starts_with("fence") {
                return Ok(Got::Fence(pos));
            }
            let n = data
                .strip_prefix('m')
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("unexpected data: {v}"))?;
            Ok(Got::Entry { n, pos })
        }
        Some("recovered") => Ok(Got::Recovered(
            v["recovered"].as_bool().with_context(|| format!("{v}"))?,
        )),
        _ => bail!("unexpected frame: {v}"),
    }
}

/// What arrived next: a frame, a close, or nothing within `wait` (`None`).
async fn next(c: &mut Client, wait: Duration) -> Result<Option<std::result::Result<Got, Event>>> {
    match c.next_event(wait).await {
        Ok(Event::Text(t)) => Ok(Some(Ok(parse_frame(&t)?))),
        Ok(other) => Ok(Some(Err(other))),
        Err(_) => Ok(None),
    }
}

/// The next frame, within [`STEP`]; an error on a close or silence.
async fn frame(c: &mut Client) -> Result<Got> {
    match next(c, STEP).await? {
        Some(Ok(got)) => Ok(got),
        Some(Err(e)) => bail!("{c:?}: {e:?} where a frame was expected"),
        None => bail!("{c:?}: no frame within {STEP:?}"),
    }
}

/// Message numbers and positions of the entries among `got`.
fn entries(got: &[Got]) -> Vec<(u64, Pos)> {
    got.iter()
        .filter_map(|g| match *g {
            Got::Entry { n, pos } => Some((n, pos)),
            _ => None,
        })
        .collect()
}

/// How alice loses her connection to node 2.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Her TCP connection is reset (RST, nothing read after it).
    Reset,
    /// Node 2's process is killed (SIGKILL).
    KillNode,
}

/// Alice on node 2 gets recorded messages pushed through node 1's API; a
/// second in, `fault` takes her connection; two seconds later she reconnects
/// to node 1 recovering from the last entry she got. She must get every
/// message the API accepted exactly once, in order, at the positions the API
/// gave, with her replay, then `recovered:true`, then live entries.
async fn recover_on_the_other_node(tag: &str, fault: Fault) -> Result<()> {
    const RUN: Duration = Duration::from_secs(4);
    const BEFORE: Duration = Duration::from_secs(1);
    const AWAY: Duration = Duration::from_secs(2);
    let mut p = Process::redis_with_api(bin(), tag, KEY, &["--history-size", HISTORY_SIZE]).await?;
    let (n1_api, n1_ws) = (p.nodes[0].api_addr(), p.nodes[0].ws.unwrap());
    let mut alice = Client::ws(p.nodes[1].ws.unwrap(), "alice", None).await?;
    let t0 = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let pushing = pusher(n1_api, RUN, refused.clone());

    // Before the fault: whatever arrives in the first second.
    let mut before = Vec::new();
    while let Some(left) = BEFORE.checked_sub(t0.elapsed()) {
        match next(&mut alice, left).await? {
            Some(Ok(got)) => before.push(got),
            Some(Err(e)) => bail!("before the fault, alice got {e:?}"),
            None => break,
        }
    }
    let fault_at = Instant::now();
    match fault {
        Fault::Reset => alice.reset()?,
        Fault::KillNode => {
            p.nodes[1].child.kill().await?;
            // What she reads until she sees the connection end, she got.
            loop {
                match next(&mut alice, STEP).await? {
                    Some(Ok(got)) => before.push(got),
                    Some(Err(Event::Closed(_))) => break,
                    Some(Err(e)) => bail!("after the kill, alice got {e:?}"),
                    None => bail!("alice's connection outlived her node by {STEP:?}"),
                }
            }
        }
    }
    let got_before = entries(&before);
    ensure!(
        got_before.len() == before.len(),
        "before the fault, alice got more than entries: {before:?}"
    );
    let &(last_n, last) = got_before
        .last()
        .context("alice got nothing before the fault")?;

    tokio::time::sleep(AWAY.saturating_sub(fault_at.elapsed())).await;
    let reconnect = Instant::now();
    let mut alice =
        Client::ws_query(n1_ws, &format!("uid=alice&recover=user:alice@{last}")).await?;
    let mut replay = Vec::new();
    let recovered = loop {
        match frame(&mut alice).await? {
            Got::Entry { n, pos } => replay.push((n, pos)),
            Got::Recovered(ok) => break ok,
            other => bail!("in the replay, alice got {other:?}"),
        }
    };
    let recovery = reconnect.elapsed();
    ensure!(
        recovered,
        "recovering from m{last_n} at {last} answered recovered:false after {} replayed",
        replay.len()
    );

    let pushed = pushing.await??;
    ensure!(
        pushed.refused() == 0,
        "the API refused {} of {} pushes: {:?}",
        pushed.refused(),
        pushed.pushes.len(),
        pushed.refusals
    );
    // A fence after the last push: the stream is delivered in order, so once
    // alice has it, she has had every entry before it.
    let fence = record(n1_api, "fence")
        .await?
        .map_err(|e| anyhow::anyhow!("the fence was refused: {e}"))?;
    let mut live = Vec::new();
    loop {
        match frame(&mut alice).await? {
            Got::Entry { n, pos } => live.push((n, pos)),
            Got::Fence(pos) => {
                ensure!(pos == fence, "the fence at {pos}, the API said {fence}");
                break;
            }
            other => bail!("after the replay, alice got {other:?}"),
        }
    }

    let expected: Vec<(u64, Pos)> = pushed.accepted().map(|p| (p.n, p.pos.unwrap())).collect();
    let got: Vec<(u64, Pos)> = got_before
        .iter()
        .chain(&replay)
        .chain(&live)
        .copied()
        .collect();
    eprintln!(
        "{fault:?}: {} pushes accepted; alice got {} before the fault (last m{last_n} at {last}), \
         {} replayed on reconnecting (recovered:true {recovery:?} after connecting) and {} live",
        expected.len(),
        got_before.len(),
        replay.len(),
        live.len(),
    );
    report_difference(&expected, &got)?;
    ensure!(
        got.windows(2)
            .all(|w| w[0].1.epoch == w[1].1.epoch && w[0].1.offset < w[1].1.offset),
        "positions not strictly increasing"
    );
    ensure!(
        !replay.is_empty(),
        "nothing replayed, though alice was away {AWAY:?}"
    );
    ensure!(
        !live.is_empty(),
        "nothing live after the replay: the pushes ended before alice came back"
    );
    alice.close().await;
    p.stop().await;
    Ok(())
}

/// Fails, saying where they part, unless alice got exactly `expected`.
fn report_difference(expected: &[(u64, Pos)], got: &[(u64, Pos)]) -> Result<()> {
    if expected == got {
        return Ok(());
    }
    let at = expected
        .iter()
        .zip(got)
        .position(|(e, g)| e != g)
        .unwrap_or(expected.len().min(got.len()));
    let window = |v: &[(u64, Pos)]| -> Vec<String> {
        v[at.saturating_sub(3)..(at + 4).min(v.len())]
            .iter()
            .map(|(n, p)| format!("m{n}@{p}"))
            .collect()
    };
    let mut seen = HashSet::new();
    let twice: Vec<u64> = got
        .iter()
        .filter(|(n, _)| !seen.insert(*n))
        .map(|(n, _)| *n)
        .collect();
    let got_ns: HashSet<u64> = got.iter().map(|(n, _)| *n).collect();
    let missing: Vec<u64> = expected
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !got_ns.contains(n))
        .collect();
    bail!(
        "alice got {} entries, {} were accepted; they part at index {at}: expected {:?}, got {:?}; \
         missing {} {:?}; got twice {:?}",
        got.len(),
        expected.len(),
        window(expected),
        window(got),
        missing.len(),
        &missing[..missing.len().min(20)],
        &twice[..twice.len().min(20)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_stream_recovers_on_the_other_node_every_message_once_in_order()
-> Result<()> {
    recover_on_the_other_node("histf-reset", Fault::Reset).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_node_is_killed_recovers_on_the_other_node() -> Result<()> {
    recover_on_the_other_node("histf-kill", Fault::KillNode).await
}

/// A frame alice got, and when.
#[derive(Debug, Clone, Copy)]
struct Seen {
    got: Got,
    at: Instant,
}

/// Alice on `node`'s WebSocket: takes every frame until a fence, and when
/// her connection ends, reconnects to the same node recovering from the
/// last entry she got. Returns what she saw and how often she reconnected.
async fn follow(node: SocketAddr, mut alice: Client) -> Result<(Vec<Seen>, u32)> {
    let mut seen: Vec<Seen> = Vec::new();
    let mut reconnects = 0;
    loop {
        match next(&mut alice, STEP).await? {
            Some(Ok(got)) => {
                seen.push(Seen {
                    got,
                    at: Instant::now(),
                });
                if matches!(got, Got::Fence(_)) {
                    return Ok((seen, reconnects));
                }
            }
            Some(Err(Event::Closed(code))) => {
                let last = seen.iter().rev().find_map(|s| match s.got {
                    Got::Entry { pos, .. } | Got::Fence(pos) => Some(pos),
                    Got::Recovered(_) => None,
                });
                let query = match last {
                    Some(pos) => format!("uid=alice&recover=user:alice@{pos}"),
                    None => "uid=alice".to_owned(),
                };
                eprintln!("alice's connection closed ({code:?}); reconnecting with {query}");
                let t = Instant::now();
                alice = loop {
                    match Client::ws_query(node, &query).await {
                        Ok(c) => break c,
                        Err(e) if t.elapsed() < STEP => {
                            eprintln!("alice cannot reconnect yet: {e:#}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e.context("alice could not reconnect")),
                    }
                };
                reconnects += 1;
            }
            Some(Err(e)) => bail!("alice got {e:?}"),
            None => bail!("alice got nothing for {STEP:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing_silently() -> Result<()> {
    const RUN: Duration = Duration::from_secs(6);
    // Traffic flows this long before Redis goes down.
    const BEFORE: Duration = Duration::from_secs(2);
    // Redis stays down until the API has refused this many pushes.
    const REFUSED: u64 = 3;
    let mut rs = RedisServer::start(false)?;
    let p = Process::redis_with_api_on(
        bin(),
        &rs.url(),
        "histf-restart",
        KEY,
        &["--history-size", HISTORY_SIZE],
    )
    .await?;
    let (n1, n2): (&ProcessNode, &ProcessNode) = (&p.nodes[0], &p.nodes[1]);
    let n2_ws = n2.ws.unwrap();
    let alice = Client::ws(n2_ws, "alice", None).await?;
    let mut following = tokio::spawn(follow(n2_ws, alice));
    let refused = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let pushing = pusher(n1.api_addr(), RUN, refused.clone());

    tokio::time::sleep(BEFORE).await;
    ensure!(
        refused.load(Ordering::Relaxed) == 0,
        "pushes refused before the fault"
    );
    let killed_at = t0.elapsed();
    tokio::task::block_in_place(|| rs.kill());
    // Down until the API has refused pushes for it.
    let down = Instant::now();
    while refused.load(Ordering::Relaxed) < REFUSED {
        ensure!(
            down.elapsed() < STEP,
            "fewer than {REFUSED} pushes refused within {STEP:?} of Redis going down"
        );
        ensure!(!pushing.is_finished(), "the pusher ended first");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| rs.restart())?;
    let restarted = Instant::now();
    let downtime = down.elapsed();
    let pushed = pushing.await??;
    let ended = Instant::now();

    // Fences until one reaches alice: the stream is delivered in order (or
    // its losses announced), so then she has had all there is to have.
    let mut fences = 0;
    let (seen, reconnects) = loop {
        ensure!(
            ended.elapsed() < STEP,
            "no fence reached alice within {STEP:?} of the end of the pushes"
        );
        let _ = record(n1.api_addr(), &format!("fence{fences}")).await?;
        fences += 1;
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(500), &mut following).await {
            break done??;
        }
    };
    let fence_wait = ended.elapsed();

    let accepted: HashMap<u64, &Push> = pushed.accepted().map(|p| (p.n, p)).collect();
    let received: Vec<u64> = seen
        .iter()
        .filter_map(|s| match s.got {
            Got::Entry { n, .. } => Some(n),
            _ => None,
        })
        .collect();
    let notices: Vec<Instant> = seen
        .iter()
        .filter(|s| s.got == Got::Recovered(false))
        .map(|s| s.at)
        .collect();
    let mut once = HashSet::new();
    let twice: Vec<u64> = received
        .iter()
        .copied()
        .filter(|n| !once.insert(*n))
        .collect();
    let mut lost: Vec<&Push> = accepted
        .values()
        .copied()
        .filter(|p| !once.contains(&p.n))
        .collect();
    lost.sort_by_key(|p| p.n);
    let refused_delivered = received
        .iter()
        .filter(|n| !accepted.contains_key(n))
        .count();
    eprintln!(
        "redis restart {killed_at:?} into the pushes, down {downtime:?}: {} pushes, {} accepted, \
         {} refused (first: {:?}); alice got {} entries ({} of them refused yet recorded); \
         {} accepted lost: {}; recovered:false frames {} (at {}), recovered:true {}; \
         reconnects {reconnects}; {fences} fence(s), the first to arrive {fence_wait:?} after \
         the end of the pushes (times relative to the restart)",
        pushed.pushes.len(),
        accepted.len(),
        pushed.refused(),
        pushed.refusals.first(),
        received.len(),
        refused_delivered,
        lost.len(),
        describe_runs(&lost, restarted),
        notices.len(),
        notices
            .iter()
            .map(|&t| since(restarted, t))
            .collect::<Vec<_>>()
            .join(", "),
        seen.iter()
            .filter(|s| s.got == Got::Recovered(true))
            .count(),
    );
    ensure!(twice.is_empty(), "alice got these twice: {twice:?}");
    ensure!(
        received.windows(2).all(|w| w[0] < w[1]),
        "alice got messages out of order: {received:?}"
    );
    ensure!(pushed.refused() > 0, "no push was refused: no fault seen");
    // Every accepted message alice did not get was accepted (its request
    // sent, even) before she was told she had lost some.
    if let Some(unannounced) = lost
        .iter()
        .find(|p| notices.last().is_none_or(|&last| p.sent_at >= last))
    {
        bail!(
            "m{} (accepted at {}) never reached alice, and she was told of no loss after it was pushed ({} notices)",
            unannounced.n,
            unannounced.pos.unwrap(),
            notices.len()
        );
    }
    p.stop().await;
    Ok(())
}

/// `t` relative to `origin`, signed, in milliseconds.
fn since(origin: Instant, t: Instant) -> String {
    match t.checked_duration_since(origin) {
        Some(d) => format!("+{}ms", d.as_millis()),
        None => format!("-{}ms", (origin - t).as_millis()),
    }
}

/// Runs of consecutive messages among `pushes` (in order): their numbers,
/// positions, and when their requests were sent relative to `origin`.
fn describe_runs(pushes: &[&Push], origin: Instant) -> String {
    let mut runs: Vec<(&Push, &Push)> = Vec::new();
    for &p in pushes {
        match runs.last_mut() {
            Some((_, last)) if last.n + 1 == p.n => *last = p,
            _ => runs.push((p, p)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|(a, b)| {
            format!(
                "m{}..=m{} (at {}..={}, sent {}..={})",
                a.n,
                b.n,
                a.pos.unwrap(),
                b.pos.unwrap(),
                since(origin, a.sent_at),
                since(origin, b.sent_at)
            )
        })
        .collect();
    if runs.is_empty() {
        "none".to_owned()
    } else {
        runs.join(", ")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_recovers_through_its_hello() -> Result<()> {
    let p = Process::redis_with_api(bin(), "histf-tcp", KEY, &[]).await?;
    let (n1, n2) = (p.nodes[0].api_addr(), p.nodes[1].tcp.unwrap());
    let mut pushed = Vec::new();
    for n in 1..=3 {
        let pos = record(n1, &format!("m{n}"))
            .await?
            .map_err(anyhow::Error::msg)?;
        pushed.push((n, pos));
    }
    let (_, from) = pushed[0];
    let mut alice = Client::tcp_hello(
        n2,
        &json!({"op": "hello", "uid": "alice", "recover": [format!("user:alice@{from}")]}),
    )
    .await?;
    assert_eq!(alice.uid, "alice");
    for &(n, pos) in &pushed[1..] {
        assert_eq!(frame(&mut alice).await?, Got::Entry { n, pos });
    }
    assert_eq!(frame(&mut alice).await?, Got::Recovered(true));
    // Then live, once.
    let pos = record(n1, "m4").await?.map_err(anyhow::Error::msg)?;
    assert_eq!(frame(&mut alice).await?, Got::Entry { n: 4, pos });
    alice.close().await;
    p.stop().await;
    Ok(())
}
