//! Which worker handles which client, and the events held while none can.
//!
//! Every client is pinned to one worker for as long as that worker lives, so
//! its events are handled in order (GatewayWorker's `routerBind`, with its
//! least-connections choice). Where GatewayWorker destroys a client that speaks
//! while no worker is attached, this router holds the event, bounded in count,
//! bytes and age, and delivers it when a worker attaches. A draining worker
//! gets nothing new: its clients' events wait until it has gone, then follow
//! them to another worker, still in order.
//!
//! The router never waits: delivery is a `try_send` to a worker's bounded
//! queue, and a full queue holds the event like an absent worker does, so a
//! slow worker never delays the clients of another.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::ext::Verdict;

/// What goes down a worker link.
#[derive(Debug)]
pub(crate) enum Out {
    /// Encoded frames (or a query reply), written as they are.
    Bytes(Bytes),
    /// Nothing more will be routed to this worker: tell it.
    Drained,
}

/// A client event waiting for, or on its way to, a worker.
#[derive(Debug)]
pub(crate) enum Event {
    /// The client connected. Encoded when delivered, because what is sent
    /// depends on whether the worker speaks the extensions.
    Connect(Box<Connect>),
    /// A message, its body and flags.
    Message { body: Bytes, flag: u8 },
    /// The client closed.
    Close,
}

/// A connection request on its way to a worker.
#[derive(Debug)]
pub(crate) struct Connect {
    /// The extension form of the request.
    pub(crate) request: crate::ext::ConnectRequest,
    /// The GatewayWorker `CMD_ON_WEBSOCKET_CONNECT` body, for WebSocket clients.
    pub(crate) websocket_body: Option<Bytes>,
    /// Where the application's decision goes.
    pub(crate) verdict: oneshot::Sender<Verdict>,
}

impl Event {
    fn size(&self) -> usize {
        match self {
            Event::Connect(c) => 256 + c.request.query.len() + c.request.path.len(),
            Event::Message { body, .. } => 64 + body.len(),
            Event::Close => 64,
        }
    }
}

/// A worker attached to this gateway.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: u64,
    /// `remote_ip:worker_key`, GatewayWorker's identity of a worker.
    pub(crate) key: String,
    pub(crate) tx: mpsc::Sender<Out>,
    /// It announced the switchboard extensions.
    pub(crate) negotiated: bool,
    draining: bool,
    clients: u64,
}

#[derive(Debug)]
struct Held {
    conn: u32,
    event: Event,
    at: Instant,
    size: usize,
}

/// Bounds of the hold buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldLimits {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
    pub(crate) age: Duration,
}

/// How an event left the router.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Queued to a worker.
    Sent,
    /// Held until a worker can take it.
    Held,
}

/// The hold buffer is full; the caller waits for room.
#[derive(Debug)]
pub(crate) struct Full(pub(crate) Event);

/// Counters of the router, for `/stats`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RouterStats {
    pub(crate) held_now: u64,
    pub(crate) held_total: u64,
    pub(crate) expired: u64,
    pub(crate) workers: u64,
}

/// Encodes an event for a worker. Returns the bytes, and for a connection
/// request to a worker without extensions, the verdict to give at once.
pub(crate) type Encoder<'a> = dyn FnMut(u32, Event, &Slot) -> Option<Bytes> + 'a;

#[derive(Debug)]
pub(crate) struct Router {
    workers: Vec<Slot>,
    pinned: HashMap<u32, u64>,
    held: VecDeque<Held>,
    held_bytes: usize,
    held_conns: HashMap<u32, u32>,
    limits: HoldLimits,
    next_id: u64,
    stats: RouterStats,
}

impl Router {
    pub(crate) fn new(limits: HoldLimits) -> Self {
        Self {
            workers: Vec::new(),
            pinned: HashMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            held_conns: HashMap::new(),
            limits,
            next_id: 1,
            stats: RouterStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> RouterStats {
        RouterStats {
            held_now: self.held.len() as u64,
            workers: self.workers.len() as u64,
            ..self.stats
        }
    }

    /// Attaches a worker. A worker with the same key replaces the older one,
    /// whose id is returned so that its link can be closed.
    pub(crate) fn attach(
        &mut self,
        key: String,
        tx: mpsc::Sender<Out>,
        negotiated: bool,
    ) -> (u64, Option<u64>) {
        let replaced = self
            .workers
            .iter()
            .position(|w| w.key == key)
            .map(|i| self.workers.remove(i).id);
        let id = self.next_id;
        self.next_id += 1;
        self.workers.push(Slot {
            id,
            key,
            tx,
            negotiated,
            draining: false,
            clients: 0,
        });
        (id, replaced)
    }

    /// Detaches a worker whose link closed. Its clients are re-pinned on
    /// their next event.
    pub(crate) fn detach(&mut self, id: u64) {
        self.workers.retain(|w| w.id != id);
    }

    /// Marks a worker draining and returns its queue, to send [`Out::Drained`].
    pub(crate) fn drain(&mut self, id: u64) -> Option<mpsc::Sender<Out>> {
        let w = self.workers.iter_mut().find(|w| w.id == id)?;
        w.draining = true;
        Some(w.tx.clone())
    }

    /// Routes one event of client `conn`, in order after its earlier events.
    pub(crate) fn route(
        &mut self,
        conn: u32,
        event: Event,
        now: Instant,
        encode: &mut Encoder<'_>,
    ) -> Result<Routed, Full> {
        if !self.held_conns.contains_key(&conn) {
            match self.try_deliver(conn, event, encode) {
                Ok(()) => return Ok(Routed::Sent),
                Err(event) => return self.hold(conn, event, now),
            }
        }
        self.hold(conn, event, now)
    }

    fn hold(&mut self, conn: u32, event: Event, now: Instant) -> Result<Routed, Full> {
        let size = event.size();
        if self.held.len() >= self.limits.events || self.held_bytes + size > self.limits.bytes {
            return Err(Full(event));
        }
        self.held_bytes += size;
        *self.held_conns.entry(conn).or_default() += 1;
        self.held.push_back(Held {
            conn,
            event,
            at: now,
            size,
        });
        self.stats.held_total += 1;
        Ok(Routed::Held)
    }

    /// The worker a client's event goes to: its pinned worker while that one
    /// lives; a new one (fewest clients, earliest attached) if it has none.
    /// `None` while its worker drains (its events wait) or none is attached.
    fn pick(&mut self, conn: u32) -> Option<usize> {
        if let Some(&id) = self.pinned.get(&conn) {
            if let Some(i) = self.workers.iter().position(|w| w.id == id) {
                return (!self.workers[i].draining).then_some(i);
            }
            self.pinned.remove(&conn);
        }
        let i = self
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.draining && !w.tx.is_closed())
            .min_by_key(|(_, w)| w.clients)
            .map(|(i, _)| i)?;
        self.workers[i].clients += 1;
        self.pinned.insert(conn, self.workers[i].id);
        Some(i)
    }

    fn try_deliver(
        &mut self,
        conn: u32,
        event: Event,
        encode: &mut Encoder<'_>,
    ) -> Result<(), Event> {
        let Some(i) = self.pick(conn) else {
            return Err(event);
        };
        // Reserve a slot first: an encoded connection request registers its
        // verdict waiter, which must not happen for an event that stays held.
        let tx = self.workers[i].tx.clone();
        let Ok(permit) = tx.try_reserve() else {
            return Err(event);
        };
        let closing = matches!(event, Event::Close);
        if let Some(bytes) = encode(conn, event, &self.workers[i]) {
            permit.send(Out::Bytes(bytes));
        } else {
            drop(permit);
        }
        if closing {
            self.unpin(conn);
        }
        Ok(())
    }

    fn unpin(&mut self, conn: u32) {
        if let Some(id) = self.pinned.remove(&conn)
            && let Some(w) = self.workers.iter_mut().find(|w| w.id == id)
        {
            w.clients = w.clients.saturating_sub(1);
        }
    }

    /// Delivers what can be delivered of the hold buffer, in order per client,
    /// and drops (returning them) events older than the hold time.
    pub(crate) fn flush(&mut self, now: Instant, encode: &mut Encoder<'_>) -> Vec<(u32, Event)> {
        let mut expired = Vec::new();
        if self.held.is_empty() {
            return expired;
        }
        let mut blocked: HashSet<u32> = HashSet::new();
        let mut keep = VecDeque::with_capacity(self.held.len());
        let held = std::mem::take(&mut self.held);
        for h in held {
            if blocked.contains(&h.conn) {
                keep.push_back(h);
                continue;
            }
            if now.duration_since(h.at) >= self.limits.age {
                self.held_bytes -= h.size;
                self.stats.expired += 1;
                if matches!(h.event, Event::Close) {
                    self.unpin(h.conn);
                }
                expired.push((h.conn, h.event));
                continue;
            }
            let (conn, size, at) = (h.conn, h.size, h.at);
            match self.try_deliver(conn, h.event, encode) {
                Ok(()) => self.held_bytes -= size,
                Err(event) => {
                    blocked.insert(conn);
                    keep.push_back(Held {
                        conn,
                        event,
                        at,
                        size,
                    });
                }
            }
        }
        self.held = keep;
        self.held_conns.clear();
        for h in &self.held {
            *self.held_conns.entry(h.conn).or_default() += 1;
        }
        expired
    }

    /// Whether anything is held.
    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// The workers attached now.
    #[cfg(test)]
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HoldLimits {
        HoldLimits {
            events: 4,
            bytes: 1 << 20,
            age: Duration::from_secs(5),
        }
    }

    fn msg(s: &'static str) -> Event {
        Event::Message {
            body: Bytes::from_static(s.as_bytes()),
            flag: 1,
        }
    }

    /// Encodes a message as its body, so tests can read what each worker got.
    fn enc(_: u32, e: Event, _: &Slot) -> Option<Bytes> {
        match e {
            Event::Message { body, .. } => Some(body),
            Event::Close => Some(Bytes::from_static(b"close")),
            Event::Connect(_) => None,
        }
    }

    fn got(rx: &mut mpsc::Receiver<Out>) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(Out::Bytes(b)) = rx.try_recv() {
            v.push(String::from_utf8(b.to_vec()).unwrap());
        }
        v
    }

    #[test]
    fn events_wait_for_a_worker_and_keep_their_order() {
        let mut r = Router::new(limits());
        let now = Instant::now();
        assert_eq!(r.route(1, msg("a"), now, &mut enc).unwrap(), Routed::Held);
        assert_eq!(r.route(1, msg("b"), now, &mut enc).unwrap(), Routed::Held);
        let (tx, mut rx) = mpsc::channel(8);
        r.attach("w1".into(), tx, false);
        // A new event of a client with held events queues behind them.
        assert_eq!(r.route(1, msg("c"), now, &mut enc).unwrap(), Routed::Held);
        assert!(r.flush(now, &mut enc).is_empty());
        assert_eq!(got(&mut rx), ["a", "b", "c"]);
        assert_eq!(r.route(1, msg("d"), now, &mut enc).unwrap(), Routed::Sent);
        assert_eq!(got(&mut rx), ["d"]);
    }

    #[test]
    fn the_hold_buffer_is_bounded_and_ages() {
        let mut r = Router::new(limits());
        let now = Instant::now();
        for _ in 0..4 {
            r.route(1, msg("x"), now, &mut enc).unwrap();
        }
        assert!(r.route(2, msg("y"), now, &mut enc).is_err());
        let expired = r.flush(now + Duration::from_secs(6), &mut enc);
        assert_eq!(expired.len(), 4);
        assert!(!r.has_held());
        assert_eq!(r.stats().expired, 4);
    }

    #[test]
    fn clients_stay_with_their_worker_and_spread_by_load() {
        let mut r = Router::new(limits());
        let now = Instant::now();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        r.attach("w1".into(), tx1, false);
        r.attach("w2".into(), tx2, false);
        r.route(1, msg("1a"), now, &mut enc).unwrap();
        r.route(2, msg("2a"), now, &mut enc).unwrap();
        r.route(1, msg("1b"), now, &mut enc).unwrap();
        assert_eq!(got(&mut rx1), ["1a", "1b"]);
        assert_eq!(got(&mut rx2), ["2a"]);
    }

    #[test]
    fn a_draining_worker_gets_nothing_new_and_its_clients_follow_in_order() {
        let mut r = Router::new(limits());
        let now = Instant::now();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (id1, _) = r.attach("w1".into(), tx1, true);
        r.route(1, msg("a"), now, &mut enc).unwrap();
        r.drain(id1).unwrap();
        let (tx2, mut rx2) = mpsc::channel(8);
        r.attach("w2".into(), tx2, true);
        // Client 1 waits for w1 to finish; client 2 goes to w2.
        assert_eq!(r.route(1, msg("b"), now, &mut enc).unwrap(), Routed::Held);
        assert_eq!(r.route(2, msg("x"), now, &mut enc).unwrap(), Routed::Sent);
        r.flush(now, &mut enc);
        assert_eq!(got(&mut rx1), ["a"]);
        assert_eq!(got(&mut rx2), ["x"]);
        r.detach(id1);
        r.flush(now, &mut enc);
        assert_eq!(got(&mut rx2), ["b"]);
    }

    #[test]
    fn a_full_worker_queue_holds_instead_of_waiting() {
        let mut r = Router::new(limits());
        let now = Instant::now();
        let (tx, mut rx) = mpsc::channel(1);
        r.attach("w".into(), tx, false);
        assert_eq!(r.route(1, msg("a"), now, &mut enc).unwrap(), Routed::Sent);
        assert_eq!(r.route(1, msg("b"), now, &mut enc).unwrap(), Routed::Held);
        assert_eq!(got(&mut rx), ["a"]);
        r.flush(now, &mut enc);
        assert_eq!(got(&mut rx), ["b"]);
    }

    #[test]
    fn a_second_link_with_the_same_key_replaces_the_first() {
        let mut r = Router::new(limits());
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let (id1, none) = r.attach("k".into(), tx1, false);
        assert!(none.is_none());
        let (_, replaced) = r.attach("k".into(), tx2, false);
        assert_eq!(replaced, Some(id1));
        assert_eq!(r.worker_count(), 1);
    }
}
