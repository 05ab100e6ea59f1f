//! `switchboard bench floor`: what the kernel alone charges for the writes a
//! delivery needs, on this machine, now.
//!
//! A writer thread writes one small WebSocket-framed message to each of N
//! loopback sockets per round (or `batch` of them in one write), paced like
//! the fan-out scenarios; a reader thread with its own runtime reads them as
//! the load tool would. The writer's CPU time per frame is the floor under
//! any server's CPU per delivery: a server does at least this, plus its own
//! work. Measuring it beside a run tells how much of a figure is the kernel's
//! (on a virtual machine, mostly waking the reader on the other core).
//!
//! `relay` measures the other floor, the one under traffic too sparse to
//! batch: a thread with an event loop that is woken for each message, reads
//! it from one socket and writes it to another, as every process a message
//! passes through (a node, a broker) must at least do.
//!
//! `accept` measures the floor under a new connection: a single-threaded
//! event loop that accepts, reads a WebSocket upgrade request and answers with
//! a canned `101` and welcome frame in one write, with no parsing, hashing or
//! state of its own; what it costs is the kernel's and the event loop's.

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// Sockets written to.
    pub conns: usize,
    /// Frames per socket.
    pub messages: u64,
    /// Rounds per second (one frame per socket each); 0 writes back to back.
    pub rate: f64,
    /// Payload bytes per frame.
    pub size: usize,
    /// Frames per write.
    pub batch: usize,
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> Result<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .context("this system has no per-thread schedstat")
}

/// One single-threaded event loop: each end of a measurement runs on its own.
fn event_loop() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Reads `bytes` from `s`, or until it ends; returns how many it read.
async fn drain(s: &mut tokio::net::TcpStream, bytes: usize) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < bytes {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

fn frame(size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size + 4);
    f.push(0x81);
    if size < 126 {
        f.push(size as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(size.min(u16::MAX as usize) as u16).to_be_bytes());
    }
    f.extend(std::iter::repeat_n(b'x', size.min(u16::MAX as usize)));
    f
}

/// Runs the measurement (blocking: call it off the async runtime).
pub fn run(f: Floor) -> Result<serde_json::Value> {
    if f.conns == 0 || f.messages == 0 || f.batch == 0 {
        bail!("floor needs --conns, --messages and --batch above 0");
    }
    if f.conns > 9_000 {
        bail!("floor holds both ends of each socket in this process: at most 9,000 --conns");
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let one = frame(f.size);
    let rounds = f.messages.div_ceil(f.batch as u64);
    let per_socket = (rounds * f.batch as u64) as usize * one.len();

    // The reader: its own thread and runtime, one task per socket.
    let remaining = Arc::new(AtomicUsize::new(f.conns));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = {
        let remaining = remaining.clone();
        std::thread::spawn(move || -> Result<()> {
            let rt = event_loop()?;
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(f.conns);
                for _ in 0..f.conns {
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    let remaining = remaining.clone();
                    tasks.push(tokio::spawn(async move {
                        drain(&mut s, per_socket).await;
                        remaining.fetch_sub(1, Ordering::AcqRel);
                    }));
                }
                let _ = ready_tx.send(());
                for t in tasks {
                    let _ = t.await;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
    };
    let mut sockets = Vec::with_capacity(f.conns);
    for _ in 0..f.conns {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        sockets.push(s);
    }
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the reader did not connect")?;
    std::thread::sleep(Duration::from_millis(200));

    let write = one.repeat(f.batch);
    let interval = (f.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / f.rate));
    let cpu0 = thread_cpu_ns()?;
    let t0 = Instant::now();
    let mut next = t0;
    for _ in 0..rounds {
        for s in &mut sockets {
            (&*s).write_all(&write)?;
        }
        if let Some(i) = interval {
            next += i;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let cpu1 = thread_cpu_ns()?;
    let elapsed = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while remaining.load(Ordering::Acquire) > 0 {
        if Instant::now() > deadline {
            bail!("the reader did not get every frame");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(sockets);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    let writes = rounds * f.conns as u64;
    let frames = writes * f.batch as u64;
    let cpu_us = (cpu1 - cpu0) as f64 / 1000.0;
    Ok(json!({
        "scenario": "floor",
        "conns": f.conns,
        "messages": rounds * f.batch as u64,
        "rate": f.rate,
        "size": f.size,
        "batch": f.batch,
        "writes": writes,
        "deliveries": frames,
        "duration_s": elapsed.as_secs_f64(),
        "writer_cpu_us": cpu_us,
        "cpu_us_per_write": cpu_us / writes as f64,
        "cpu_us_per_delivery": cpu_us / frames as f64,
    }))
}

/// Runs the relay measurement (blocking: call it off the async runtime):
/// `messages` frames per socket pair, `rate` frames per second in total, one
/// at a time round-robin over the pairs, relayed by a single-threaded event
/// loop. Reports the relay thread's CPU per message.
pub fn relay(f: Floor) -> Result<serde_json::Value> {
    if f.conns == 0 || f.messages == 0 {
        bail!("relay needs --conns and --messages above 0");
    }
    if f.conns > 4_000 {
        bail!("relay holds four sockets per pair in this process: at most 4,000 --conns");
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let pair = || -> Result<(std::net::TcpStream, std::net::TcpStream)> {
        let a = std::net::TcpStream::connect(addr)?;
        let (b, _) = listener.accept()?;
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        Ok((a, b))
    };
    let (mut inputs, mut relayed, mut outputs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..f.conns {
        let (w, r) = pair()?;
        let (rw, sink) = pair()?;
        r.set_nonblocking(true)?;
        rw.set_nonblocking(true)?;
        sink.set_nonblocking(true)?;
        inputs.push(w);
        relayed.push((r, rw));
        outputs.push(sink);
    }
    let one = frame(f.size);
    let per_socket = f.messages as usize * one.len();
    let total = f.messages * f.conns as u64;

    // Each end in its own thread, each thread one event loop.
    let relay = std::thread::spawn({
        let rt = event_loop()?;
        move || -> Result<u64> {
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(relayed.len());
                for (r, w) in relayed {
                    let mut r = tokio::net::TcpStream::from_std(r)?;
                    let mut w = tokio::net::TcpStream::from_std(w)?;
                    tasks.push(tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let mut buf = vec![0u8; 4096];
                        let mut got = 0;
                        while got < per_socket {
                            match r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    got += n;
                                    if w.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }));
                }
                // Counted from here: the pairs are idle until the sender starts.
                let cpu0 = thread_cpu_ns()?;
                for t in tasks {
                    let _ = t.await;
                }
                let cpu1 = thread_cpu_ns()?;
                Ok(cpu1 - cpu0)
            })
        }
    });
    let sink = std::thread::spawn({
        let rt = event_loop()?;
        move || -> Result<()> {
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(outputs.len());
                for s in outputs {
                    let mut s = tokio::net::TcpStream::from_std(s)?;
                    tasks.push(tokio::spawn(async move { drain(&mut s, per_socket).await }));
                }
                for t in tasks {
                    if t.await? < per_socket {
                        bail!("the sink did not get every frame");
                    }
                }
                Ok(())
            })
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    let interval = (f.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / f.rate));
    let t0 = Instant::now();
    let mut next = t0;
    for _ in 0..f.messages {
        for s in &mut inputs {
            (&*s).write_all(&one)?;
            if let Some(i) = interval {
                next += i;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    let cpu_ns = relay
        .join()
        .map_err(|_| anyhow::anyhow!("the relay panicked"))??;
    let elapsed = t0.elapsed();
    sink.join()
        .map_err(|_| anyhow::anyhow!("the sink panicked"))??;
    let cpu_us = cpu_ns as f64 / 1000.0;
    Ok(json!({
        "scenario": "relay",
        "conns": f.conns,
        "messages": f.messages,
        "rate": f.rate,
        "size": f.size,
        "deliveries": total,
        "duration_s": elapsed.as_secs_f64(),
        "relay_cpu_us": cpu_us,
        "cpu_us_per_delivery": cpu_us / total as f64,
    }))
}

/// A WebSocket upgrade request as the load tool sends it.
const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// A `101` and a welcome frame of the reference application's size.
fn accepted() -> Vec<u8> {
    let mut r = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        .to_vec();
    r.extend(frame(90));
    r
}

/// Runs the accept measurement (blocking: call it off the async runtime):
/// `conns` connections opened, `in_flight` at a time, each kept open once
/// answered. Reports the accepting thread's CPU per connection.
pub fn accept(conns: usize, in_flight: usize) -> Result<serde_json::Value> {
    use tokio::io::AsyncWriteExt;
    if conns == 0 || in_flight == 0 {
        bail!("accept needs --conns and --in-flight above 0");
    }
    if conns > 9_000 {
        bail!("accept holds both ends of each socket in this process: at most 9,000 --conns");
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let answer = accepted();
    let answer_len = answer.len();
    let server = std::thread::spawn({
        let rt = event_loop()?;
        move || -> Result<u64> {
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let answer: Arc<[u8]> = answer.into();
                let served = Arc::new(tokio::sync::Semaphore::new(0));
                let held = Arc::new(std::sync::Mutex::new(Vec::with_capacity(conns)));
                let cpu0 = thread_cpu_ns()?;
                for _ in 0..conns {
                    let (mut s, _) = listener.accept().await?;
                    s.set_nodelay(true)?;
                    let (answer, served, held) = (answer.clone(), served.clone(), held.clone());
                    tokio::spawn(async move {
                        let mut head = [0u8; 1024];
                        let mut got = 0;
                        while !head[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut head[got..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got += n,
                            }
                        }
                        if s.write_all(&answer).await.is_ok() {
                            held.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                            served.add_permits(1);
                        }
                    });
                }
                let all = served.acquire_many(u32::try_from(conns)?);
                let _all = tokio::time::timeout(Duration::from_secs(30), all)
                    .await
                    .context("not every connection was answered")?
                    .context("the server stopped")?;
                let cpu1 = thread_cpu_ns()?;
                Ok(cpu1 - cpu0)
            })
        }
    });
    let client = std::thread::spawn({
        let rt = event_loop()?;
        move || -> Result<Vec<tokio::net::TcpStream>> {
            rt.block_on(async move {
                let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..conns {
                    let permit = slots.clone().acquire_owned().await?;
                    tasks.spawn(async move {
                        let _permit = permit;
                        let mut s = tokio::net::TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        s.write_all(UPGRADE).await?;
                        let mut buf = vec![0u8; answer_len];
                        s.read_exact(&mut buf).await?;
                        Ok::<_, anyhow::Error>(s)
                    });
                }
                let mut open = Vec::with_capacity(conns);
                while let Some(s) = tasks.join_next().await {
                    open.push(s??);
                }
                Ok(open)
            })
        }
    });
    let t0 = Instant::now();
    let open = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client panicked"))??;
    let elapsed = t0.elapsed();
    let cpu_ns = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server panicked"))??;
    drop(open);
    let cpu_us = cpu_ns as f64 / 1000.0;
    Ok(json!({
        "scenario": "accept",
        "conns": conns,
        "in_flight": in_flight,
        "opened": conns,
        "duration_s": elapsed.as_secs_f64(),
        "server_cpu_us": cpu_us,
        "cpu_us_per_conn": cpu_us / conns as f64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_frame_and_charges_the_writer() {
        let paced = run(Floor {
            conns: 20,
            messages: 10,
            rate: 200.0,
            size: 64,
            batch: 1,
        })
        .unwrap();
        assert_eq!(paced["deliveries"], 200);
        assert_eq!(paced["writes"], 200);
        assert!(paced["cpu_us_per_write"].as_f64().unwrap() > 0.0);
        let batched = run(Floor {
            conns: 20,
            messages: 10,
            rate: 0.0,
            size: 64,
            batch: 5,
        })
        .unwrap();
        assert_eq!(batched["writes"], 40, "5 frames per write");
        assert_eq!(batched["deliveries"], 200);
    }

    #[test]
    fn the_relay_passes_every_frame_and_charges_its_thread() {
        let r = relay(Floor {
            conns: 10,
            messages: 20,
            rate: 2000.0,
            size: 64,
            batch: 1,
        })
        .unwrap();
        assert_eq!(r["deliveries"], 200);
        assert!(r["relay_cpu_us"].as_f64().unwrap() > 0.0);
        assert!(
            r["duration_s"].as_f64().unwrap() >= 0.09,
            "paced at 2,000 per second"
        );
    }

    #[test]
    fn the_accept_floor_answers_every_connection() {
        let r = accept(50, 10).unwrap();
        assert_eq!(r["opened"], 50);
        assert!(r["cpu_us_per_conn"].as_f64().unwrap() > 0.0);
    }
}
