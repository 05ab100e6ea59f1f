//! The register: where gateways announce their inner address and workers
//! learn every gateway's.
//!
//! It behaves as GatewayWorker's `Register`: the first line must come within
//! 10 s; a line without an `event` gets an error line and the connection is
//! closed; a wrong secret, an unknown event or a `gateway_connect` without an
//! address closes it silently; every gateway joining or leaving is broadcast
//! to every worker, and each `worker_connect` is answered with the list. The
//! register keeps no state on disk: after a restart, gateways and workers
//! reconnect within a second and the list rebuilds itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::register::{LineDecoder, RegisterError, RegisterMessage};

/// How long a new connection may stay silent.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line accepted (GatewayWorker: 10 MiB; addresses are short).
const MAX_LINE: usize = 1 << 20;
/// Broadcasts queued to one worker; a worker that lets this many pile up is
/// cut off (it reconnects and gets the current list).
const WORKER_QUEUE: usize = 64;

#[derive(Default)]
struct State {
    next: u64,
    /// Gateways in registration order.
    gateways: Vec<(u64, String)>,
    workers: HashMap<u64, mpsc::Sender<Bytes>>,
}

impl State {
    fn list(&self) -> Bytes {
        // Unique addresses, first registration first, as a JSON array.
        let mut seen = std::collections::HashSet::new();
        let list: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, a)| seen.insert(a.clone()))
            .map(|(_, a)| a.clone())
            .collect();
        Bytes::from(RegisterMessage::BroadcastAddresses(list).encode())
    }

    fn broadcast(&mut self) {
        let msg = self.list();
        self.workers
            .retain(|_, tx| tx.try_send(msg.clone()).is_ok());
    }
}

/// Serves the register protocol on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, secret: String, shutdown: CancellationToken) {
    let state = Arc::new(Mutex::new(State::default()));
    let secret: Arc<str> = Arc::from(secret);
    let tasks = TaskTracker::new();
    while let Some((stream, peer)) = switchboard::server::next_conn(&listener, &shutdown).await {
        tasks.spawn(connection(
            state.clone(),
            secret.clone(),
            stream,
            peer,
            shutdown.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
}

use crate::lock;

async fn connection(
    state: Arc<Mutex<State>>,
    secret: Arc<str>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let id = {
        let mut s = lock(&state);
        s.next += 1;
        s.next
    };
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LineDecoder::new(MAX_LINE));
    let (tx, mut rx) = mpsc::channel::<Bytes>(WORKER_QUEUE);
    let mut first = true;
    let deadline = tokio::time::sleep(AUTH_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut deadline, if first => {
                tracing::warn!(%peer, "register: no request within 10 s; closing");
                break;
            }
            out = rx.recv() => match out {
                Some(b) => if write.write_all(&b).await.is_err() { break },
                None => break,
            },
            line = lines.next() => {
                let Some(Ok(line)) = line else { break };
                first = false;
                match RegisterMessage::decode(&line) {
                    Ok(RegisterMessage::GatewayConnect { address, secret_key }) => {
                        if address.is_empty() || secret_key != *secret {
                            tracing::warn!(%peer, "register: gateway refused (no address or wrong secret)");
                            break;
                        }
                        tracing::info!(%peer, %address, "gateway registered");
                        let mut s = lock(&state);
                        s.gateways.push((id, address));
                        s.broadcast();
                        drop(s);
                    }
                    Ok(RegisterMessage::WorkerConnect { secret_key }) => {
                        if secret_key != *secret {
                            tracing::warn!(%peer, "register: worker refused (wrong secret)");
                            break;
                        }
                        let list = {
                            let mut s = lock(&state);
                            s.workers.insert(id, tx.clone());
                            s.list()
                        };
                        if write.write_all(&list).await.is_err() {
                            break;
                        }
                    }
                    Ok(RegisterMessage::Ping) => {}
                    Ok(RegisterMessage::BroadcastAddresses(_)) => break,
                    Err(RegisterError::MissingEvent) => {
                        let text = format!(
                            "Bad request for Register service. Request info(IP:{}, Request Buffer:{})\n",
                            peer.ip(),
                            String::from_utf8_lossy(&line)
                        );
                        let _ = write.write_all(text.as_bytes()).await;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%peer, %error, "register: bad request; closing");
                        break;
                    }
                }
            }
        }
    }
    let mut s = lock(&state);
    s.workers.remove(&id);
    let before = s.gateways.len();
    s.gateways.retain(|(g, _)| *g != id);
    if s.gateways.len() != before {
        tracing::info!(%peer, "gateway unregistered");
        s.broadcast();
    }
}
