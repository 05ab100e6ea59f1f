//! The client side of the register protocol: gateways announce themselves,
//! workers and pushers learn the gateways' addresses.
//!
//! Like GatewayWorker, a link that closes is retried every second forever and
//! re-sends its connect event, so a restarted register learns every gateway
//! again; and a `{"event":"ping"}` keeps the link alive every 25 s unless the
//! register address starts with `127.0.0.1` (the same rule, so the bytes on
//! the wire match).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::protocol::register::{LineDecoder, RegisterMessage};

/// Delay before reconnecting to the register.
pub(crate) const RETRY: Duration = Duration::from_secs(1);
/// Keep-alive interval.
const PING: Duration = Duration::from_secs(25);
/// Longest register line accepted.
const MAX_LINE: usize = 1 << 20;

/// Keeps a gateway registered at `register` as `address` until `shutdown`.
pub(crate) async fn gateway(
    register: String,
    address: String,
    secret: String,
    shutdown: CancellationToken,
) {
    let hello = RegisterMessage::GatewayConnect {
        address,
        secret_key: secret,
    };
    keep(&register, &hello, None, &shutdown).await;
}

/// Keeps a worker connected to `register`, publishing every address list it
/// broadcasts, until `shutdown`.
pub(crate) async fn worker(
    register: String,
    secret: String,
    addresses: watch::Sender<Vec<String>>,
    shutdown: CancellationToken,
) {
    let hello = RegisterMessage::WorkerConnect { secret_key: secret };
    keep(&register, &hello, Some(&addresses), &shutdown).await;
}

async fn keep(
    register: &str,
    hello: &RegisterMessage,
    addresses: Option<&watch::Sender<Vec<String>>>,
    shutdown: &CancellationToken,
) {
    let ping = !register.starts_with("127.0.0.1");
    let mut logged = false;
    while !shutdown.is_cancelled() {
        match TcpStream::connect(register).await {
            Ok(stream) => {
                logged = false;
                tracing::info!(%register, "connected to the register");
                let (read, mut write) = stream.into_split();
                if write.write_all(&hello.encode()).await.is_ok() {
                    let mut lines = FramedRead::new(read, LineDecoder::new(MAX_LINE));
                    let mut tick = tokio::time::interval(PING);
                    tick.reset();
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            _ = tick.tick(), if ping => {
                                if write.write_all(&RegisterMessage::Ping.encode()).await.is_err() {
                                    break;
                                }
                            }
                            line = lines.next() => match line {
                                Some(Ok(line)) => {
                                    if let (Some(tx), Ok(RegisterMessage::BroadcastAddresses(list))) =
                                        (addresses, RegisterMessage::decode(&line))
                                    {
                                        tx.send_replace(list);
                                    }
                                }
                                _ => break,
                            },
                        }
                    }
                }
                tracing::warn!(%register, "register link closed; reconnecting");
            }
            Err(error) => {
                if !logged {
                    tracing::warn!(%register, %error, "cannot reach the register; retrying every second");
                    logged = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Asks the register once for the gateways' addresses, as GatewayWorker's
/// `Lib\Gateway` does outside a worker.
pub(crate) async fn lookup(
    register: &str,
    secret: &str,
    timeout: Duration,
) -> std::io::Result<Vec<String>> {
    let ask = async {
        let stream = TcpStream::connect(register).await?;
        let (read, mut write) = stream.into_split();
        let hello = RegisterMessage::WorkerConnect {
            secret_key: secret.to_owned(),
        };
        write.write_all(&hello.encode()).await?;
        let mut lines = FramedRead::new(read, LineDecoder::new(MAX_LINE));
        while let Some(line) = lines.next().await {
            let line = line.map_err(std::io::Error::other)?;
            if let Ok(RegisterMessage::BroadcastAddresses(list)) = RegisterMessage::decode(&line) {
                return Ok(list);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the register closed the connection (wrong secret key?)",
        ))
    };
    tokio::time::timeout(timeout, ask).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "the register did not answer")
    })?
}
