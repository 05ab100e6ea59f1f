//! A bench worker process: opens its share of the clients, records what they
//! receive, and reports to the coordinator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;

use super::client::{self, Conn, Reader, Writer};
use super::proto::{Cmd, Ev, Scenario, Spec};

type Hist = Arc<Mutex<Histogram<u64>>>;

fn new_hist() -> Hist {
    // 1 µs to 10 minutes, 3 significant digits.
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
    ))
}

/// Writes a histogram to a temporary file and returns its path.
pub fn save(h: &Histogram<u64>, tag: &str) -> Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let path = std::env::temp_dir().join(format!(
        "sb-bench-{}-{tag}-{}.hist",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&path, buf)?;
    Ok(path.to_string_lossy().into_owned())
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    duplicates: AtomicU64,
    sent: AtomicU64,
    closed: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

/// Reads a receiver's messages until it closes, recording each timed one.
async fn receive(mut reader: Reader, messages: u64, hist: Hist, c: Arc<Counters>) {
    let mut seen = vec![0u64; (messages as usize).div_ceil(64)];
    while let Some(msg) = reader.next().await {
        let Ok(text) = msg else { break };
        let Some((seq, sent_ns)) = client::parse_payload(&text) else {
            continue;
        };
        let now = client::now_ns();
        if seq >= messages {
            continue;
        }
        let (w, b) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if seen[w] & b != 0 {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        seen[w] |= b;
        let _ = hist
            .lock()
            .map(|mut h| h.saturating_record(now.saturating_sub(sent_ns) / 1000));
        c.first_ns.fetch_min(now, Ordering::Relaxed);
        c.last_ns.fetch_max(now, Ordering::Relaxed);
        c.received.fetch_add(1, Ordering::Relaxed);
    }
    c.closed.fetch_add(1, Ordering::Relaxed);
}

/// Drains a connection that receives nothing timed (keeps it open, answers pings).
async fn drain(mut reader: Reader, c: Arc<Counters>) {
    while let Some(Ok(_)) = reader.next().await {}
    c.closed.fetch_add(1, Ordering::Relaxed);
}

async fn send(mut w: Writer, to: String, spec: Spec, c: Arc<Counters>) -> Result<()> {
    if spec.sender_rate > 0.0 {
        let period = Duration::from_secs_f64(1.0 / spec.sender_rate);
        // Spread the senders' phases over one period.
        let phase = period.mul_f64(rand::random::<f64>());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..spec.messages {
            tick.tick().await;
            let data = client::payload(seq, spec.size);
            w.send(&json!({"op": "to_user", "uid": to, "data": data}).to_string())
                .await?;
            c.sent.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        for seq in 0..spec.messages {
            let data = client::payload(seq, spec.size);
            w.feed(&json!({"op": "to_user", "uid": to, "data": data}).to_string())
                .await?;
            c.sent.fetch_add(1, Ordering::Relaxed);
        }
        w.flush().await?;
    }
    // Keep the connection open until the process ends.
    std::future::pending::<()>().await;
    Ok(())
}

fn emit(ev: &Ev) {
    let line = serde_json::to_string(ev).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The worker's main loop (`switchboard bench-worker`).
pub async fn run() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let hist = new_hist();
    let counters = Arc::new(Counters {
        first_ns: AtomicU64::new(u64::MAX),
        ..Counters::default()
    });
    let mut senders: Vec<(Writer, String)> = Vec::new();
    let mut spec: Option<Spec> = None;
    let mut expected = 0u64;
    // Connections are held here until the process ends.
    let mut held: Vec<Writer> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let cmd: Cmd =
            serde_json::from_str(&line).with_context(|| format!("bad command {line}"))?;
        match cmd {
            Cmd::Open { spec: s } => {
                let connect_hist = new_hist();
                let sem = Arc::new(Semaphore::new(s.in_flight.max(1)));
                let mut tasks = tokio::task::JoinSet::new();
                let n = s.nodes.len();
                for k in 0..s.count {
                    let i = s.first + k;
                    let source = s.sources[i % s.sources.len()];
                    let mut plan: Vec<(String, Option<String>, usize, bool)> = Vec::new();
                    match s.scenario {
                        Scenario::Fanout => plan.push((
                            format!("{}-m{i}", s.run),
                            Some(format!("{}-g", s.run)),
                            i % n,
                            true,
                        )),
                        Scenario::P2p => {
                            plan.push((format!("{}-r{i}", s.run), None, (i + 1) % n, true));
                            plan.push((format!("{}-s{i}", s.run), None, i % n, false));
                        }
                        Scenario::Idle
                        | Scenario::Connect
                        | Scenario::Floor
                        | Scenario::Relay
                        | Scenario::Accept => {
                            plan.push((format!("{}-c{i}", s.run), None, i % n, false))
                        }
                    }
                    for (uid, group, node, receiver) in plan {
                        let (sem, endpoint, ch) =
                            (sem.clone(), s.nodes[node].clone(), connect_hist.clone());
                        let secret = s.jwt_secret.clone();
                        tasks.spawn(async move {
                            let _permit = sem.acquire_owned().await;
                            let t = Instant::now();
                            let r = client::connect(
                                &endpoint,
                                source,
                                &uid,
                                group.as_deref(),
                                secret.as_deref(),
                            )
                            .await;
                            if r.is_ok() {
                                let _ = ch.lock().map(|mut h| {
                                    h.saturating_record(t.elapsed().as_micros() as u64)
                                });
                            }
                            (i, receiver, r)
                        });
                    }
                }
                let (mut opened, mut failed, mut first_error) = (0u64, 0u64, None);
                while let Some(r) = tasks.join_next().await {
                    let Ok((i, receiver, r)) = r else { continue };
                    match r {
                        Ok(Conn { reader, writer, .. }) => {
                            opened += 1;
                            let c = counters.clone();
                            if receiver {
                                tokio::spawn(receive(reader, s.messages, hist.clone(), c));
                                held.push(writer);
                            } else {
                                tokio::spawn(drain(reader, c));
                                if s.scenario == Scenario::P2p {
                                    senders.push((writer, format!("{}-r{i}", s.run)));
                                } else {
                                    held.push(writer);
                                }
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                expected = match s.scenario {
                    Scenario::Fanout | Scenario::P2p => s.count as u64 * s.messages,
                    _ => 0,
                };
                let h = connect_hist
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_else(|p| p.into_inner().clone());
                emit(&Ev::Ready {
                    opened,
                    failed,
                    first_error,
                    connect_hist: save(&h, "connect")?,
                });
                spec = Some(s);
            }
            Cmd::Go => {
                if let Some(s) = &spec {
                    for (w, to) in senders.drain(..) {
                        tokio::spawn(send(w, to, s.clone(), counters.clone()));
                    }
                }
            }
            Cmd::Finish { quiet_ms } => {
                let quiet = Duration::from_millis(quiet_ms);
                let mut last = counters.received.load(Ordering::Relaxed);
                let mut since = Instant::now();
                let mut report = Instant::now();
                loop {
                    let got = counters.received.load(Ordering::Relaxed);
                    if got >= expected {
                        break;
                    }
                    if got != last {
                        last = got;
                        since = Instant::now();
                    } else if since.elapsed() >= quiet {
                        break;
                    }
                    if report.elapsed() >= Duration::from_millis(500) {
                        emit(&Ev::Progress { received: got });
                        report = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let h = hist
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_else(|p| p.into_inner().clone());
                let c = &counters;
                emit(&Ev::Result {
                    sent: c.sent.load(Ordering::Relaxed),
                    received: c.received.load(Ordering::Relaxed),
                    duplicates: c.duplicates.load(Ordering::Relaxed),
                    expected,
                    hist: save(&h, "latency")?,
                    first_ns: c.first_ns.load(Ordering::Relaxed),
                    last_ns: c.last_ns.load(Ordering::Relaxed),
                    closed: c.closed.load(Ordering::Relaxed),
                });
            }
        }
    }
    // Stdin closed: the coordinator is done.
    drop(held);
    let _ = tokio::io::stdout().flush().await;
    Ok(())
}
