//! A real worker against a register and a gateway that the test plays with
//! the crate's own codecs, so a gateway can misbehave on cue: leave a query
//! unanswered, or stop answering while the worker keeps pushing. What is
//! checked is what the worker's hub tells its application: the answers to
//! queries, the push reports and the counters.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard::core::backplane::Handoff;
use switchboard::core::{NodeId, Target};
use switchboard::{Hub, NoopHandler};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::{Worker, WorkerConfig, link};
use crate::protocol::cmd;
use crate::protocol::frame::{Frame, FrameDecoder};
use crate::protocol::php::Value;
use crate::protocol::query::encode_reply;
use crate::protocol::register::{LineDecoder, RegisterMessage};

/// Bound on every wait for something the worker does.
const STEP: Duration = Duration::from_secs(10);

/// What the played gateway saw, its connections numbered from 0 in the
/// order the worker opened them.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The worker's connect frame arrived on this connection.
    Linked(usize),
    /// This connection ended.
    Closed(usize),
}

/// The played gateway's answer to a query frame; `None`: no reply at all.
type Answers = fn(&Frame) -> Option<Value>;

/// A worker linked to one played gateway.
struct Setup {
    worker: Worker,
    gateway: NodeId,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// The played register's link to the worker, kept open so it does not
    /// reconnect.
    _register: TcpStream,
}

impl Setup {
    /// Starts a worker with `query_timeout`, names it the played gateway,
    /// and returns once the worker has linked it.
    async fn start(query_timeout: Duration, answers: Answers) -> Self {
        let register = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let gateway = crate::gateway_node(&address).unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(play_gateway(listener, answers, tx));
        let mut cfg = WorkerConfig::new(register.local_addr().unwrap().to_string());
        cfg.query_timeout = query_timeout;
        let worker = Worker::start(cfg, std::sync::Arc::new(NoopHandler))
            .await
            .unwrap();
        let mut register = within(async { register.accept().await.unwrap().0 }).await;
        let (read, mut write) = register.split();
        let mut lines = FramedRead::new(read, LineDecoder::new(1 << 16));
        let hello = within(lines.next()).await.unwrap().unwrap();
        assert!(matches!(
            RegisterMessage::decode(&hello),
            Ok(RegisterMessage::WorkerConnect { .. })
        ));
        write
            .write_all(&RegisterMessage::BroadcastAddresses(vec![address]).encode())
            .await
            .unwrap();
        let mut s = Self {
            worker,
            gateway,
            seen,
            _register: register,
        };
        s.expect(Seen::Linked(0)).await;
        s.linked().await;
        s
    }

    fn hub(&self) -> &Hub {
        self.worker.hub()
    }

    /// Waits for the played gateway to see `what`.
    async fn expect(&mut self, what: Seen) {
        let got = within(self.seen.recv()).await;
        assert_eq!(got, Some(what));
    }

    /// Waits until the worker counts the gateway as linked: it inserts a link
    /// only after writing its connect frame, so that frame's arrival is not
    /// enough.
    async fn linked(&self) {
        within(async {
            while !self.worker.gateways().contains(&self.gateway) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("the worker did not act in time")
}

/// Plays a gateway: accepts the worker's links and answers each query frame
/// on the link it came on, in order, as `answers` says.
async fn play_gateway(listener: TcpListener, answers: Answers, seen: mpsc::UnboundedSender<Seen>) {
    for k in 0.. {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut frames = FramedRead::new(read, FrameDecoder::new(1 << 20));
            while let Some(Ok(f)) = frames.next().await {
                if f.header.cmd == cmd::WORKER_CONNECT {
                    let _ = seen.send(Seen::Linked(k));
                } else if let Some(v) = answers(&f)
                    && write.write_all(&encode_reply(&v)).await.is_err()
                {
                    break;
                }
            }
            let _ = seen.send(Seen::Closed(k));
        });
    }
}

/// Each push a gateway's link refuses counts once in `publish_dropped`, as
/// the push's report tells the caller. The gateway leaves a close's look-up
/// unanswered, so the pushes after it are held on the link up to the bound
/// of what it holds, and the ones beyond are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_the_link_refuses_counts_once_in_publish_dropped() {
    let t = Setup::start(Duration::from_secs(600), |_| None).await;
    let hub = t.hub();
    let sent = Handoff {
        sent: 1,
        dropped: 0,
    };
    assert_eq!(hub.close(&Target::user("someone"), "bye").remote, sent);
    // The look-up holds one place; pushes fill the rest.
    for _ in 1..link::HELD {
        assert_eq!(
            hub.to_all(Bytes::from_static(b"held")).unwrap().remote,
            sent
        );
    }
    let refused = 3;
    for _ in 0..refused {
        let r = hub.to_all(Bytes::from_static(b"refused")).unwrap();
        assert_eq!(
            r.remote,
            Handoff {
                sent: 0,
                dropped: 1
            }
        );
    }
    let stats = hub.stats().backplane;
    assert_eq!(stats.publish_dropped, refused);
    assert_eq!(stats.published, link::HELD as u64);
}
