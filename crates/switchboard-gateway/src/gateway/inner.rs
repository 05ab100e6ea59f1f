//! The gateway's inner port: worker links and pushers' query sockets.
//!
//! Every inner connection starts unauthorized when a secret is set; only
//! `CMD_WORKER_CONNECT` (a worker link) and `CMD_GATEWAY_CLIENT_CONNECT` (a
//! pusher) with the right key authorize it, anything else closes it. A worker
//! link gets a writer task fed by a bounded queue, shared by client events
//! and replies, so the two never interleave mid-frame. A bad frame closes
//! only the connection it came on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use switchboard::Hub;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Out, Shared, lock};
use crate::ext;
use crate::protocol::auth::GatewayClientConnect;
use crate::protocol::cmd;
use crate::protocol::frame::FrameDecoder;

/// Frames and replies queued to one worker link.
const LINK_QUEUE: usize = 8192;
/// Most queued items written in one `write`.
const LINK_BATCH: usize = 256;
/// GatewayWorker pings workers every 25 s when its LAN address is not loopback.
const WORKER_PING: Duration = Duration::from_secs(25);

pub(super) async fn serve(
    shared: Arc<Shared>,
    hub: Hub,
    listener: TcpListener,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    while let Some((stream, peer)) = switchboard::server::next_conn(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        tasks.spawn(connection(
            shared.clone(),
            hub.clone(),
            stream,
            peer,
            tasks.clone(),
            shutdown.child_token(),
        ));
    }
}

#[derive(Deserialize)]
struct WorkerHello {
    #[serde(default)]
    worker_key: String,
    #[serde(default)]
    secret_key: Option<serde_json::Value>,
    #[serde(default)]
    switchboard: Option<u32>,
}

/// GatewayWorker compares keys strictly (`!==`): only a JSON string equal to
/// ours passes; a missing key or a number never does.
fn secret_ok(shared: &Shared, given: Option<&serde_json::Value>) -> bool {
    match given {
        Some(serde_json::Value::String(s)) => *s == shared.cfg.secret,
        _ => false,
    }
}

/// What an inner connection turned out to be.
enum Role {
    /// Not yet known (a query socket until it says otherwise).
    Plain(OwnedWriteHalf),
    /// A worker link: writes go through its queue.
    Worker { id: u64, tx: mpsc::Sender<Out> },
}

async fn connection(
    shared: Arc<Shared>,
    hub: Hub,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, FrameDecoder::new(shared.cfg.max_frame));
    let mut authorized = shared.cfg.secret.is_empty();
    let mut role = Role::Plain(write);
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => break,
            f = frames.next() => f,
        };
        let frame = match frame {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(error)) => {
                shared.rejected_inner.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, %error, "bad frame on the inner port: closing that connection");
                break;
            }
        };
        let c = frame.header.cmd;
        if !authorized && c != cmd::WORKER_CONNECT && c != cmd::GATEWAY_CLIENT_CONNECT {
            shared.rejected_inner.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, cmd = c, "unauthorized command on the inner port: closing");
            break;
        }
        match c {
            cmd::WORKER_CONNECT => {
                let Ok(hello) = serde_json::from_slice::<WorkerHello>(&frame.body) else {
                    shared.rejected_inner.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                if !shared.cfg.secret.is_empty() && !secret_ok(&shared, hello.secret_key.as_ref()) {
                    shared.rejected_inner.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "worker with a wrong secret key: closing");
                    break;
                }
                authorized = true;
                let Role::Plain(write) = role else {
                    // A second WORKER_CONNECT on a link: GatewayWorker ignores it.
                    continue;
                };
                let negotiated = hello.switchboard.is_some();
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                if negotiated {
                    // The hello goes first, before any event can be routed here.
                    let mut b = BytesMut::new();
                    let h = shared.header(ext::HELLO, 0, None, cmd::FLAG_BODY_IS_SCALAR);
                    shared.frame(&mut b, h, Bytes::new(), Bytes::new());
                    let _ = tx.try_send(Out::Bytes(b.freeze()));
                }
                let key = format!("{}:{}", peer.ip(), hello.worker_key);
                let (id, replaced) =
                    lock(&shared.router).attach(key.clone(), tx.clone(), negotiated);
                {
                    let mut links = lock(&shared.links);
                    if let Some(old) = replaced.and_then(|old| links.remove(&old)) {
                        shared.replaced.fetch_add(1, Ordering::Relaxed);
                        old.cancel();
                    }
                    links.insert(id, cancel.clone());
                }
                tracing::info!(node = %shared.node, worker = %key, negotiated, "worker attached");
                tasks.spawn(link_writer(shared.clone(), rx, write, cancel.clone()));
                shared.wake.notify_one();
                role = Role::Worker { id, tx };
            }
            cmd::GATEWAY_CLIENT_CONNECT => {
                if !shared.cfg.secret.is_empty() {
                    // A missing or non-string key fails to decode: never equal.
                    let ok = GatewayClientConnect::decode(&frame.body)
                        .is_ok_and(|h| h.secret_key == shared.cfg.secret);
                    if !ok {
                        shared.rejected_inner.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, "pusher with a wrong secret key: closing");
                        break;
                    }
                }
                authorized = true;
            }
            cmd::PING => {}
            ext::DRAIN => {
                let draining = match &role {
                    Role::Worker { id, .. } => lock(&shared.router).drain(*id),
                    Role::Plain(_) => None,
                };
                if let Some(tx) = draining {
                    tracing::info!(node = %shared.node, "worker draining");
                    // After every event already queued to it: nothing follows.
                    if tx.send(Out::Drained).await.is_err() {
                        break;
                    }
                    shared.wake.notify_one();
                }
            }
            ext::VERDICT => {
                let conn = frame.header.connection_id;
                match ext::decode::<ext::Verdict>(&frame.body) {
                    Ok(v) => {
                        if let Some(tx) = lock(&shared.verdicts).remove(&conn) {
                            let _ = tx.send(v);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%peer, %error, "bad verdict from a worker");
                    }
                }
            }
            _ => {
                shared.commands.fetch_add(1, Ordering::Relaxed);
                let Some(reply) = super::commands::execute(&shared, &hub, &frame).await else {
                    continue;
                };
                let ok = match &mut role {
                    Role::Plain(w) => w.write_all(&reply).await.is_ok(),
                    Role::Worker { tx, .. } => tx.send(Out::Bytes(reply)).await.is_ok(),
                };
                if !ok {
                    break;
                }
            }
        }
    }
    if let Role::Worker { id, .. } = role {
        lock(&shared.router).detach(id);
        lock(&shared.links).remove(&id);
        cancel.cancel();
        tracing::info!(node = %shared.node, "worker detached");
        shared.wake.notify_one();
    }
}

/// Writes a worker link's queue in batches, and pings the worker as
/// GatewayWorker does when it is not on loopback.
async fn link_writer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Out>,
    mut write: OwnedWriteHalf,
    cancel: CancellationToken,
) {
    let ping = shared.cfg.lan_ip != std::net::Ipv4Addr::LOCALHOST;
    let mut tick = tokio::time::interval(WORKER_PING);
    tick.reset();
    let mut batch = Vec::with_capacity(LINK_BATCH);
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick(), if ping => {
                let h = shared.header(cmd::PING, 0, None, cmd::FLAG_BODY_IS_SCALAR);
                shared.frame(&mut buf, h, Bytes::new(), Bytes::new());
            }
            n = rx.recv_many(&mut batch, LINK_BATCH) => {
                if n == 0 {
                    break;
                }
                for out in batch.drain(..) {
                    match out {
                        Out::Bytes(b) => buf.extend_from_slice(&b),
                        Out::Drained => {
                            let h = shared.header(ext::DRAINED, 0, None, cmd::FLAG_BODY_IS_SCALAR);
                            shared.frame(&mut buf, h, Bytes::new(), Bytes::new());
                        }
                    }
                }
            }
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
        // The queue has room again: held events may move.
        shared.wake.notify_one();
    }
    cancel.cancel();
    let _ = write.shutdown().await;
}
