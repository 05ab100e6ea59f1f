//! Latency under abuse: an honest client's round trips, measured while other
//! clients misbehave on a thread of their own (so that the flood and the probe
//! do not share a runtime, as they would not share a process in production).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::Client;

/// Runs `work` on an OS thread with a runtime of its own; the handle joins it.
pub fn on_own_thread<T, F>(
    work: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work())
    })
}

/// Round trips of `client` pushing to its own connection, every `pause`,
/// until `done` is set and at least `min` were measured.
pub async fn round_trips(
    client: &mut Client,
    done: &Arc<AtomicBool>,
    min: usize,
    pause: Duration,
) -> Result<Vec<Duration>> {
    let conn = client.conn.clone();
    let mut rtts = Vec::new();
    while !done.load(Ordering::Acquire) || rtts.len() < min {
        let t = Instant::now();
        client
            .send(json!({"op": "to_conn", "conn": conn, "data": "rtt"}))
            .await?;
        let got = client.recv().await.context("round trip")?;
        anyhow::ensure!(
            got == "rtt",
            "{client:?} got {got:?} instead of its round trip"
        );
        rtts.push(t.elapsed());
        tokio::time::sleep(pause).await;
    }
    Ok(rtts)
}

/// The 99th percentile.
pub fn p99(rtts: &mut [Duration]) -> Duration {
    rtts.sort();
    rtts.get(rtts.len() * 99 / 100).copied().unwrap_or_default()
}
