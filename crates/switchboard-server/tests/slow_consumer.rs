//! A client that stops reading while 10,000 frames are pushed to it: it is
//! closed as a slow consumer, its neighbours get every frame in order without
//! delay, and the server's memory stays bounded. Runs the real binary so the
//! server's peak memory can be read on its own.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::json;
use switchboard_test::Client;
use switchboard_test::cluster::{ProcessNode, peak_rss};
use tokio_tungstenite::tungstenite::Message;

const FRAMES: usize = 10_000;
const DATA: usize = 8 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_memory_stays_bounded() -> Result<()> {
    let node = ProcessNode::spawn(
        env!("CARGO_BIN_EXE_switchboard").as_ref(),
        &["--node-id", "slowtest"],
    )
    .await?;
    let (ws, tcp) = (node.ws.unwrap(), node.tcp.unwrap());

    // The slow client reads its welcome, then nothing.
    let (mut slow, _) =
        tokio_tungstenite::connect_async(format!("ws://{ws}/ws?uid=slow&group=flood")).await?;
    let _welcome = slow.next().await;

    let fast = Client::ws(ws, "fast", Some("flood")).await?;
    let mut bystander = Client::tcp(tcp, "bystander", None).await?;
    let mut sender = Client::tcp(tcp, "sender", None).await?;

    let (progress_tx, progress) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut fast = fast;
        for i in 0..FRAMES {
            let f = fast.recv().await?;
            anyhow::ensure!(
                f.starts_with(&format!("{i}:")),
                "frame {i} out of order: {}",
                &f[..f.len().min(20)]
            );
            let _ = progress_tx.send(i + 1);
        }
        anyhow::Ok(fast)
    });

    let pad = "x".repeat(DATA);
    let mut worst_rtt = Duration::ZERO;
    for i in 0..FRAMES {
        // Keep the fast reader within 256 frames (2 MiB) of the sender, so only
        // the client that stopped reading falls behind.
        let mut p = progress.clone();
        tokio::time::timeout(switchboard_test::STEP, p.wait_for(|&n| n + 256 >= i)).await??;
        sender
            .send(json!({"op": "to_group", "group": "flood", "data": format!("{i}:{pad}")}))
            .await?;
        if i % 1000 == 0 {
            let t = tokio::time::Instant::now();
            let r = bystander
                .ask(json!({"op": "online", "uid": "fast"}))
                .await?;
            worst_rtt = worst_rtt.max(t.elapsed());
            anyhow::ensure!(r["online"] == true, "{r}");
        }
    }
    let fast = tokio::time::timeout(Duration::from_secs(60), reader).await???;

    // The slow client got some frames (what its socket buffers held), then the
    // server closed it rather than queueing without bound.
    let mut got = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(m)) = slow.next().await {
            match m {
                Message::Text(_) => got += 1,
                Message::Close(cf) => return cf.map(|c| u16::from(c.code)),
                _ => {}
            }
        }
        None
    })
    .await?;
    assert!(
        got < FRAMES,
        "the slow client was never cut off ({got} frames)"
    );
    assert!(matches!(ended, None | Some(1008)), "closed with {ended:?}");

    let peak = peak_rss(node.pid())?;
    eprintln!(
        "slow consumer: got {got} of {FRAMES} frames before the close; server peak RSS {} MiB; worst bystander round trip {worst_rtt:?}",
        peak >> 20
    );
    // Unbounded queueing would hold FRAMES * DATA = 80 MiB for the slow client.
    assert!(peak < 48 << 20, "server peak RSS {} MiB", peak >> 20);
    assert!(
        worst_rtt < Duration::from_secs(2),
        "bystander delayed: {worst_rtt:?}"
    );

    // Everyone else is still connected and served.
    let mut fast = fast;
    let r = fast
        .ask(json!({"op": "group_count", "group": "flood"}))
        .await?;
    assert_eq!(r["count"], 1, "only the slow client left the group: {r}");
    let status = node.terminate().await?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
