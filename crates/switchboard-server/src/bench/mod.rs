//! `switchboard bench`: drives any server that implements `docs/CLIENT-PROTOCOL.md`
//! through the scenarios of `docs/BENCHMARK-TARGETS.md`, and reports throughput,
//! latency percentiles, losses, duplicates, and (given their process ids) the
//! servers' CPU time per delivery and memory per connection.
//!
//! The coordinator spawns worker processes of the same binary
//! (`switchboard bench-worker`), each holding at most `--per-proc` sockets,
//! since one process may hold only so many files, and spreads their sockets
//! over several source addresses (127.0.0.1, 127.0.0.2, ...).

pub mod client;
pub mod floor;
pub mod procfs;
pub mod proto;
pub mod worker;

use std::io::Write;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use client::Endpoint;
use proto::{Cmd, Ev, Scenario, Spec};

/// Flags of `switchboard bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The nodes, comma-separated: `ws://127.0.0.1:9001/ws,ws://127.0.0.1:9002/ws` or `tcp://...`
    /// (every scenario but `floor`).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<Endpoint>,
    /// Group members (fanout), sender→receiver pairs (p2p), or connections (idle, connect).
    #[arg(long, default_value_t = 2000)]
    pub conns: usize,
    /// Messages: pushes to the group (fanout) or per pair (p2p).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Messages per second in total; 0 sends them all at once.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Size of each pushed data string, in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Connections being opened at once, in total.
    #[arg(long, default_value_t = 200)]
    pub in_flight: usize,
    /// Source addresses for client sockets, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4"
    )]
    pub sources: Vec<IpAddr>,
    /// Sockets per worker process at most.
    #[arg(long, default_value_t = 15_000)]
    pub per_proc: usize,
    /// Server process ids, for CPU and memory figures.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Broker process ids (Redis, RabbitMQ), counted with the servers' CPU.
    #[arg(long, value_delimiter = ',')]
    pub broker_pids: Vec<u32>,
    /// Connect with tokens signed by this HS256 secret, for a node started
    /// with --jwt-secret (`connect` then measures token verification too).
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// A label for the JSON line (the mode being measured).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Stop waiting when nothing arrived for this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub quiet_ms: u64,
    /// Idle: seconds to let memory settle before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Floor: frames per write (1 is what a paced fan-out costs; more shows
    /// what coalescing saves).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<Ev>,
}

impl Worker {
    async fn spawn() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("bench-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning a bench worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        // The coordinator reads each worker's events as they come; an
        // unbounded channel is fine here: a worker sends a handful of lines.
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Ev>(&line) {
                    Ok(ev) => {
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("bench: bad worker line {line:?}: {e}"),
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            events,
        })
    }

    async fn send(&mut self, cmd: &Cmd) -> Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        Ok(())
    }
}

fn load_hist(path: &str) -> Result<Histogram<u64>> {
    let bytes = std::fs::read(path)?;
    let _ = std::fs::remove_file(path);
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram {path}: {e:?}"))
}

fn cpu(pids: &[u32]) -> Option<u64> {
    procfs::total(pids, procfs::cpu_ns)
}

fn progress(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\x1b[2K{text}");
    let _ = e.flush();
}

/// Runs a benchmark and prints a table and one JSON line to stdout.
#[allow(clippy::print_stdout)]
pub async fn run(a: BenchArgs) -> Result<()> {
    if matches!(
        a.scenario,
        Scenario::Floor | Scenario::Relay | Scenario::Accept
    ) {
        let f = floor::Floor {
            conns: a.conns,
            messages: a.messages.unwrap_or(100),
            rate: a.rate,
            size: a.size,
            batch: a.batch,
        };
        let (scenario, in_flight) = (a.scenario, a.in_flight);
        let mut out = tokio::task::spawn_blocking(move || match scenario {
            Scenario::Relay => floor::relay(f),
            Scenario::Accept => floor::accept(f.conns, in_flight),
            _ => floor::run(f),
        })
        .await??;
        out["label"] = json!(a.label);
        print_table(&out);
        println!("{out}");
        return Ok(());
    }
    if a.nodes.is_empty() || a.sources.is_empty() {
        bail!("need at least one node and one source address");
    }
    let messages = a.messages.unwrap_or(match a.scenario {
        Scenario::P2p => 100,
        _ => 200,
    });
    let sockets_per_unit = if a.scenario == Scenario::P2p { 2 } else { 1 };
    let procs = (a.conns * sockets_per_unit).div_ceil(a.per_proc).max(1);
    let run = format!("b{:x}", rand::random::<u32>());
    let all_pids: Vec<u32> = a
        .server_pids
        .iter()
        .chain(&a.broker_pids)
        .copied()
        .collect();
    let rss0 = procfs::total(&a.server_pids, procfs::rss_bytes);
    let broker_rss0 = procfs::total(&a.broker_pids, procfs::rss_bytes);

    let mut workers = Vec::new();
    for _ in 0..procs {
        workers.push(Worker::spawn().await?);
    }
    let per = a.conns.div_ceil(procs);
    let sender_rate = match a.scenario {
        Scenario::P2p if a.rate > 0.0 => a.rate / a.conns as f64,
        _ => 0.0,
    };
    let cpu_before_open = cpu(&all_pids);
    let broker_before_open = cpu(&a.broker_pids);
    let t_open = Instant::now();
    for (w, worker) in workers.iter_mut().enumerate() {
        let first = w * per;
        let count = per.min(a.conns.saturating_sub(first));
        let spec = Spec {
            scenario: a.scenario,
            run: run.clone(),
            first,
            count,
            nodes: a.nodes.clone(),
            sources: a.sources.clone(),
            in_flight: a.in_flight.div_ceil(procs),
            messages,
            sender_rate,
            size: a.size,
            jwt_secret: a.jwt_secret.clone(),
        };
        worker.send(&Cmd::Open { spec }).await?;
    }
    progress(&format!(
        "{:?}: opening {} connections in {procs} processes",
        a.scenario,
        a.conns * sockets_per_unit
    ));
    let mut connect_hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut opened, mut failed, mut first_error) = (0u64, 0u64, None);
    for w in &mut workers {
        match w.events.recv().await {
            Some(Ev::Ready {
                opened: o,
                failed: f,
                first_error: e,
                connect_hist: h,
            }) => {
                opened += o;
                failed += f;
                if first_error.is_none() {
                    first_error = e;
                }
                connect_hist.add(load_hist(&h)?)?;
            }
            other => bail!("worker did not get ready: {other:?}"),
        }
    }
    let open_time = t_open.elapsed();
    let cpu_after_open = cpu(&all_pids);
    if failed > 0 {
        eprintln!(
            "\nbench: {failed} connections failed; first error: {}",
            first_error.unwrap_or_default()
        );
    }

    let mut out = json!({
        "scenario": a.scenario,
        "label": a.label,
        "conns": a.conns,
        "opened": opened,
        "failed": failed,
        "procs": procs,
        "size": a.size,
    });

    match a.scenario {
        Scenario::Idle => {
            tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
            let rss1 = procfs::total(&a.server_pids, procfs::rss_bytes);
            if let (Some(r0), Some(r1)) = (rss0, rss1) {
                out["rss_before"] = json!(r0);
                out["rss_after"] = json!(r1);
                out["rss_bytes_per_conn"] =
                    json!((r1.saturating_sub(r0)) as f64 / opened.max(1) as f64);
            }
            // What the broker keeps per connection (directory entries,
            // subscriptions): a lower bound, as allocators keep freed memory.
            let broker_rss1 = procfs::total(&a.broker_pids, procfs::rss_bytes);
            if let (Some(r0), Some(r1)) = (broker_rss0, broker_rss1)
                && !a.broker_pids.is_empty()
            {
                out["broker_rss_bytes_per_conn"] =
                    json!((r1.saturating_sub(r0)) as f64 / opened.max(1) as f64);
            }
        }
        Scenario::Connect => {
            out["open_s"] = json!(open_time.as_secs_f64());
            out["conns_per_s"] = json!(opened as f64 / open_time.as_secs_f64());
            out["connect_us"] = percentiles(&connect_hist);
            if let (Some(b0), Some(b1)) = (broker_before_open, cpu(&a.broker_pids))
                && !a.broker_pids.is_empty()
            {
                out["broker_cpu_us_per_conn"] =
                    json!((b1 - b0) as f64 / 1000.0 / opened.max(1) as f64);
            }
            if let (Some(c0), Some(c1)) = (cpu_before_open, cpu_after_open) {
                out["server_cpu_us"] = json!((c1 - c0) as f64 / 1000.0);
                out["cpu_us_per_conn"] = json!((c1 - c0) as f64 / 1000.0 / opened.max(1) as f64);
            }
        }
        Scenario::Floor | Scenario::Relay | Scenario::Accept => {
            unreachable!("measured without a server, above")
        }
        Scenario::Fanout | Scenario::P2p => {
            let cpu0 = cpu(&all_pids);
            let broker0 = cpu(&a.broker_pids);
            let t0 = client::now_ns();
            if a.scenario == Scenario::Fanout {
                let mut sender = client::connect(
                    &a.nodes[0],
                    a.sources[0],
                    &format!("{run}-sender"),
                    None,
                    a.jwt_secret.as_deref(),
                )
                .await?;
                let group = format!("{run}-g");
                if a.rate > 0.0 {
                    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
                    for seq in 0..messages {
                        tick.tick().await;
                        let data = client::payload(seq, a.size);
                        sender
                            .writer
                            .send(&json!({"op":"to_group","group":group,"data":data}).to_string())
                            .await?;
                    }
                } else {
                    for seq in 0..messages {
                        let data = client::payload(seq, a.size);
                        sender
                            .writer
                            .feed(&json!({"op":"to_group","group":group,"data":data}).to_string())
                            .await?;
                    }
                    sender.writer.flush().await?;
                }
                // Keep the sender open until the results are in.
                std::mem::forget(sender);
            } else {
                for w in &mut workers {
                    w.send(&Cmd::Go).await?;
                }
            }
            for w in &mut workers {
                w.send(&Cmd::Finish {
                    quiet_ms: a.quiet_ms,
                })
                .await?;
            }
            let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let (mut sent, mut received, mut dups, mut expected, mut closed) =
                (0u64, 0u64, 0u64, 0u64, 0u64);
            let mut last_ns = 0u64;
            let mut done = vec![false; workers.len()];
            let mut progress_of = vec![0u64; workers.len()];
            let total_expected = a.conns as u64 * messages;
            while done.iter().any(|d| !d) {
                for (i, w) in workers.iter_mut().enumerate() {
                    if done[i] {
                        continue;
                    }
                    while let Ok(ev) = w.events.try_recv() {
                        match ev {
                            Ev::Progress { received } => progress_of[i] = received,
                            Ev::Result {
                                sent: s,
                                received: r,
                                duplicates: d,
                                expected: e,
                                hist,
                                last_ns: l,
                                closed: c,
                                ..
                            } => {
                                sent += s;
                                received += r;
                                dups += d;
                                expected += e;
                                closed += c;
                                last_ns = last_ns.max(l);
                                latency.add(load_hist(&hist)?)?;
                                progress_of[i] = r;
                                done[i] = true;
                            }
                            Ev::Ready { .. } => {}
                        }
                    }
                }
                let got: u64 = progress_of.iter().sum();
                let secs = (client::now_ns() - t0) as f64 / 1e9;
                progress(&format!(
                    "{:?}: {got}/{total_expected} delivered, {:.0}/s",
                    a.scenario,
                    got as f64 / secs.max(1e-9)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let cpu1 = cpu(&all_pids);
            let broker1 = cpu(&a.broker_pids);
            let secs = (last_ns.saturating_sub(t0)) as f64 / 1e9;
            out["messages"] = json!(messages);
            out["rate"] = json!(a.rate);
            out["expected"] = json!(expected);
            out["deliveries"] = json!(received);
            out["lost"] = json!(expected.saturating_sub(received));
            out["duplicates"] = json!(dups);
            out["closed_by_server"] = json!(closed);
            if a.scenario == Scenario::P2p {
                out["sent"] = json!(sent);
            }
            out["duration_s"] = json!(secs);
            out["deliveries_per_s"] = json!(received as f64 / secs.max(1e-9));
            out["latency_us"] = percentiles(&latency);
            if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                out["server_cpu_us"] = json!((c1 - c0) as f64 / 1000.0);
                out["cpu_us_per_delivery"] =
                    json!((c1 - c0) as f64 / 1000.0 / received.max(1) as f64);
            }
            // The broker's part of it: what outgrowing one broker is about.
            if let (Some(b0), Some(b1)) = (broker0, broker1)
                && !a.broker_pids.is_empty()
            {
                out["broker_cpu_us_per_delivery"] =
                    json!((b1 - b0) as f64 / 1000.0 / received.max(1) as f64);
            }
        }
    }
    progress("");
    eprintln!();
    for w in workers.iter_mut() {
        let _ = w.stdin.shutdown().await;
    }
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
    }
    print_table(&out);
    println!("{out}");
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

#[allow(clippy::print_stdout)]
fn print_table(v: &serde_json::Value) {
    let Some(obj) = v.as_object() else { return };
    println!(
        "{:<24} {}",
        "scenario",
        v["scenario"].as_str().unwrap_or_default()
    );
    for (k, val) in obj {
        if k == "scenario" {
            continue;
        }
        let shown = match val {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() != 0.0 => format!("{f:.3}"),
                _ => n.to_string(),
            },
            serde_json::Value::Object(o) => o
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("  "),
            other => other.to_string(),
        };
        println!("{k:<24} {shown}");
    }
}
