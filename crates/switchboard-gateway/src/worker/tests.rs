//! A real worker against a register and a gateway that the test plays with
//! the crate's own codecs, so a gateway can misbehave on cue: leave a query
//! unanswered, or stop answering while the worker keeps pushing. What is
//! checked is what the worker's hub tells its application: the answers to
//! queries, the push reports and the counters.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard::core::backplane::Handoff;
use switchboard::core::query::Answer;
use switchboard::core::{ConnId, NodeId, Target};
use switchboard::{Hub, NoopHandler};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::{Worker, WorkerConfig, link};
use crate::protocol::cmd;
use crate::protocol::frame::{Frame, FrameDecoder};
use crate::protocol::php::{Array, Value};
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

    /// Checks that the answer to `user_conns("u{n}")` is the gateway's answer
    /// to that very query, or no answer (the gateway reported missing).
    fn own_or_none(&self, a: &Answer<Vec<ConnId>>, n: u64) {
        let own = a.missing.is_empty() && a.value == [ConnId::new(self.gateway.clone(), n)];
        let none = a.missing == [self.gateway.clone()] && a.value.is_empty();
        assert!(
            own || none,
            "u{n} was answered {:?} (missing {:?}): another query's answer",
            a.value,
            a.missing
        );
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

/// `CMD_GET_CLIENT_ID_BY_UID` for user `u<n>` is answered with the one
/// connection `n`, so every answer names its query; user `mute` is never
/// answered.
fn users_by_number(f: &Frame) -> Option<Value> {
    if f.header.cmd != cmd::GET_CLIENT_ID_BY_UID {
        return None;
    }
    let n: i64 = std::str::from_utf8(&f.ext_data)
        .ok()?
        .strip_prefix('u')?
        .parse()
        .ok()?;
    Some(Value::Array(Array::list([n])))
}

/// Replies carry no request id, so the worker pairs them with its queries by
/// order. A gateway that leaves one query unanswered must not shift that
/// pairing: every query asked after the silent one timed out gets its own
/// answer or none, never another query's. Two queries are in flight at once,
/// so a shifted pairing would hand one of them the other's answer. The
/// worker then links the gateway again, and queries are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_left_unanswered_costs_the_link_not_a_wrong_answer() {
    let mut t = Setup::start(Duration::from_secs(1), users_by_number).await;
    let a = t.hub().user_conns("mute").await;
    assert_eq!(a.missing, [t.gateway.clone()], "the gateway was silent");
    let (b, c) = tokio::join!(t.hub().user_conns("u1"), t.hub().user_conns("u2"));
    t.own_or_none(&b, 1);
    t.own_or_none(&c, 2);
    // The link that can no longer pair replies is closed and made again.
    t.expect(Seen::Closed(0)).await;
    t.expect(Seen::Linked(1)).await;
    t.linked().await;
    let d = t.hub().user_conns("u3").await;
    assert!(d.missing.is_empty(), "{d:?}");
    assert_eq!(d.value, [ConnId::new(t.gateway.clone(), 3)]);
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

/// A close's look-up that the gateway leaves unanswered gives its link up
/// at the query timeout too. The pushes held behind it are dropped, and each
/// counts once in `publish_dropped`, with the look-up; the count stays once
/// the worker has linked the gateway again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_unanswered_look_up_held_counts_once_and_outlives_its_link() {
    let mut t = Setup::start(Duration::from_secs(1), |_| None).await;
    let sent = Handoff {
        sent: 1,
        dropped: 0,
    };
    assert_eq!(t.hub().close(&Target::user("someone"), "bye").remote, sent);
    let held = 3;
    for _ in 0..held {
        assert_eq!(t.hub().to_all("held").unwrap().remote, sent);
    }
    t.expect(Seen::Closed(0)).await;
    t.expect(Seen::Linked(1)).await;
    t.linked().await;
    assert_eq!(t.hub().stats().backplane.publish_dropped, held + 1);
}
