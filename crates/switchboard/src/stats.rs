//! Counters a hub keeps, for metrics and honest loss accounting.
//!
//! Every counter is a relaxed atomic in the hub's shared [`Counters`], bumped
//! where the event happens: nothing is allocated, locked or kept per
//! connection (an idle connection's task must not grow by a byte).

use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_core::Target;
use switchboard_core::backplane::BackplaneStats;

use crate::handler::{CloseReason, Transport};
use crate::registry::Delivery;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Connections opened, by transport ([`transport_index`]).
    opened: [AtomicU64; PerTransport::KINDS],
    /// Connections closed, by transport.
    closed: [AtomicU64; PerTransport::KINDS],
    /// Connections closed, by reason ([`close_index`]).
    closes: [AtomicU64; CloseKinds::KINDS],
    /// Pushes, by target kind ([`push_index`]).
    pushes: [AtomicU64; PushKinds::KINDS],
    /// Frames lost, by why ([`Dropped`]).
    dropped: [AtomicU64; DropKinds::KINDS],
    pub(crate) rejected: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) bad_envelopes: AtomicU64,
    pub(crate) inbound_dropped: AtomicU64,
    pub(crate) ops_refused: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) recorded: AtomicU64,
    pub(crate) record_failed: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) not_recovered: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) gap_filled: AtomicU64,
    pub(crate) gap_lost: AtomicU64,
}

/// Why frames were lost: see [`DropKinds`], in whose order these are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dropped {
    QueueFull,
    SlowConsumer,
    Unframable,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a connection registered.
    pub(crate) fn opened(&self, transport: Transport) {
        Self::add(&self.opened[transport_index(transport)], 1);
    }

    /// Counts a connection unregistered, and why.
    pub(crate) fn closed(&self, transport: Transport, reason: &CloseReason) {
        Self::add(&self.closed[transport_index(transport)], 1);
        // (Slow-consumer and policy closes are these counts too.)
        Self::add(&self.closes[close_index(reason)], 1);
    }

    /// Counts `n` frames lost.
    pub(crate) fn dropped(&self, why: Dropped, n: u64) {
        Self::add(&self.dropped[why as usize], n);
    }

    /// Counts what a local delivery did.
    pub(crate) fn delivered(&self, d: &Delivery) {
        Self::add(&self.queued, u64::from(d.queued));
        self.dropped(Dropped::QueueFull, u64::from(d.dropped));
        self.dropped(Dropped::SlowConsumer, u64::from(d.overflowed));
    }

    /// Counts a push the application made (pushes from peers are not
    /// counted: their frames are).
    pub(crate) fn pushed(&self, target: &Target) {
        if let Some(i) = push_index(target) {
            Self::add(&self.pushes[i], 1);
        }
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::WebSocket => 0,
        Transport::Tcp => 1,
    }
}

/// Where a reason is counted, in [`CloseKinds`]' order.
fn close_index(r: &CloseReason) -> usize {
    match r {
        CloseReason::Client { .. } => 0,
        CloseReason::Kicked(_) => 1,
        CloseReason::SlowConsumer => 2,
        CloseReason::IdleTimeout => 3,
        CloseReason::TooBig => 4,
        CloseReason::InvalidUtf8 => 5,
        CloseReason::Protocol(_) => 6,
        CloseReason::Policy(_) => 7,
        CloseReason::Io(_) => 8,
        CloseReason::Shutdown => 9,
    }
}

/// Where a push is counted, in [`PushKinds`]' order: one of connections,
/// users, groups or everyone, or several of them (mixed). `None` for a
/// target that names nobody. Exclusions do not change the kind.
fn push_index(t: &Target) -> Option<usize> {
    const MIXED: usize = 4;
    let terms = [
        !t.conns().is_empty(),
        !t.included_users().is_empty(),
        !t.included_groups().is_empty(),
        t.is_all(),
    ];
    let mut kind = None;
    for (i, present) in terms.into_iter().enumerate() {
        if present {
            if kind.is_some() {
                return Some(MIXED);
            }
            kind = Some(i);
        }
    }
    kind
}

/// A struct of counts by kind, one `u64` field per kind, with
/// `labeled()`: the counts under their field names, the label values
/// metrics give them, so that the names are written once.
macro_rules! counts_by {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct $name {
            $($(#[$fdoc])* pub $field: u64,)*
        }

        impl $name {
            /// How many kinds.
            pub(crate) const KINDS: usize = [$(stringify!($field)),*].len();

            /// `(label, count)` pairs, as metrics name them.
            pub fn labeled(&self) -> [(&'static str, u64); Self::KINDS] {
                [$((stringify!($field), self.$field)),*]
            }

            fn load(counters: &[AtomicU64; Self::KINDS]) -> Self {
                let [$($field),*] = counters.each_ref().map(|c| c.load(Ordering::Relaxed));
                Self { $($field),* }
            }
        }
    };
}

counts_by! {
    /// Counts per transport.
    PerTransport {
        /// WebSocket connections.
        websocket,
        /// Raw TCP connections.
        tcp,
    }
}

counts_by! {
    /// Connections closed, by the kind of their [`CloseReason`].
    CloseKinds {
        /// [`CloseReason::Client`].
        client,
        /// [`CloseReason::Kicked`].
        kicked,
        /// [`CloseReason::SlowConsumer`].
        slow_consumer,
        /// [`CloseReason::IdleTimeout`].
        idle_timeout,
        /// [`CloseReason::TooBig`].
        too_big,
        /// [`CloseReason::InvalidUtf8`].
        invalid_utf8,
        /// [`CloseReason::Protocol`].
        protocol,
        /// [`CloseReason::Policy`].
        policy,
        /// [`CloseReason::Io`].
        io,
        /// [`CloseReason::Shutdown`].
        shutdown,
    }
}

counts_by! {
    /// Pushes made on this node ([`Hub::push`](crate::Hub::push) and the
    /// `to_*` methods), by what their target names. A push to a target that
    /// names nobody is not counted.
    PushKinds {
        /// Connections only.
        conn,
        /// Users only.
        user,
        /// Groups only.
        group,
        /// Everyone (with or without exclusions).
        all,
        /// Several of the above in one target.
        mixed,
    }
}

counts_by! {
    /// Frames meant for a local connection that it never got, by why.
    DropKinds {
        /// Its queue was full under [`SlowConsumer::DropNewest`](crate::SlowConsumer).
        queue_full,
        /// It was closed as a slow consumer: the frame that overflowed its
        /// queue, and the frames still queued when it closed.
        slow_consumer,
        /// Its framing cannot carry the frame (too long for a TCP length
        /// prefix).
        unframable,
    }
}

/// A snapshot of a hub's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Connections open on this node now.
    pub conns_open: u64,
    /// Connections accepted since start.
    pub conns_opened: u64,
    /// Connections closed since start.
    pub conns_closed: u64,
    /// Connections open now, by transport (opened less closed: it may
    /// differ from [`HubStats::conns_open`] by a connection in passing).
    pub conns_open_by: PerTransport,
    /// Connections accepted since start, by transport.
    pub conns_opened_by: PerTransport,
    /// Connections closed since start, by reason.
    pub closes: CloseKinds,
    /// Connections refused by the application or by a failed handshake.
    pub conns_rejected: u64,
    /// Pushes made on this node, by target kind.
    pub pushes: PushKinds,
    /// Frames received from clients.
    pub frames_in: u64,
    /// Frames queued to local connections (one per recipient).
    pub frames_queued: u64,
    /// Frames written to clients' sockets (one per recipient; on TCP, once
    /// in the connection's write buffer, which is written out before more
    /// is taken).
    pub frames_written: u64,
    /// Frames dropped because a queue was full under the drop policy, or
    /// because the connection's framing cannot carry them
    /// (`queue_full + unframable` of [`HubStats::frames_dropped_by`]).
    pub frames_dropped: u64,
    /// Frames that local connections never got, by why.
    pub frames_dropped_by: DropKinds,
    /// Connections closed because they could not keep up.
    pub slow_consumers_closed: u64,
    /// Envelopes from peers that could not be decoded.
    pub bad_envelopes: u64,
    /// Envelopes from peers dropped because this node's inbound queue was full.
    pub inbound_dropped: u64,
    /// Operations on this node's connections refused by a limit (a join past
    /// the cap of groups per connection).
    pub ops_refused: u64,
    /// Recorded pushes appended to a stream's history (one per stream).
    pub history_recorded: u64,
    /// Recorded pushes that failed because the history store did (not
    /// delivered: the caller got the error).
    pub history_record_failed: u64,
    /// Streams a connecting client recovered (`recovered:true`).
    pub history_recovered: u64,
    /// Streams a connecting client asked for and could not recover
    /// (`recovered:false`: outside the window, another epoch, the store down).
    pub history_not_recovered: u64,
    /// Entries replayed to recovering clients.
    pub history_replayed: u64,
    /// Recorded entries that did not reach this node in time (lost by the
    /// broker, or still on their way) and were read from the history to
    /// keep their streams in order.
    pub history_gaps_filled: u64,
    /// Recorded entries that never reached this node and were no longer in
    /// the history either: their streams went on without them.
    pub history_gaps_lost: u64,
    /// Client messages not handled because they came over the rate limit.
    pub messages_rate_limited: u64,
    /// Connections closed for a policy violation: kept sending over the rate
    /// limit (WebSocket 1008).
    pub policy_closed: u64,
    /// The backplane's own counters.
    pub backplane: BackplaneStats,
}

impl Counters {
    pub(crate) fn snapshot(&self, conns_open: u64, backplane: BackplaneStats) -> HubStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let opened = PerTransport::load(&self.opened);
        let closed = PerTransport::load(&self.closed);
        let closes = CloseKinds::load(&self.closes);
        let dropped = DropKinds::load(&self.dropped);
        HubStats {
            conns_open,
            conns_opened: opened.websocket + opened.tcp,
            conns_closed: closed.websocket + closed.tcp,
            // Loaded one after the other: a close may be seen before its open.
            conns_open_by: PerTransport {
                websocket: opened.websocket.saturating_sub(closed.websocket),
                tcp: opened.tcp.saturating_sub(closed.tcp),
            },
            conns_opened_by: opened,
            closes,
            conns_rejected: g(&self.rejected),
            pushes: PushKinds::load(&self.pushes),
            frames_in: g(&self.frames_in),
            frames_queued: g(&self.queued),
            frames_written: g(&self.written),
            frames_dropped: dropped.queue_full + dropped.unframable,
            frames_dropped_by: dropped,
            slow_consumers_closed: closes.slow_consumer,
            bad_envelopes: g(&self.bad_envelopes),
            inbound_dropped: g(&self.inbound_dropped),
            ops_refused: g(&self.ops_refused),
            history_recorded: g(&self.recorded),
            history_record_failed: g(&self.record_failed),
            history_recovered: g(&self.recovered),
            history_not_recovered: g(&self.not_recovered),
            history_replayed: g(&self.replayed),
            history_gaps_filled: g(&self.gap_filled),
            history_gaps_lost: g(&self.gap_lost),
            messages_rate_limited: g(&self.rate_limited),
            policy_closed: closes.policy,
            backplane,
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_core::{ConnId, NodeId};

    use super::*;

    #[test]
    fn a_push_is_counted_by_what_its_target_names() {
        let conn = ConnId::new(NodeId::new("n").unwrap(), 1);
        let kind = |t: &Target| push_index(t).map(|i| PushKinds::default().labeled()[i].0);
        assert_eq!(kind(&Target::conn(conn.clone())), Some("conn"));
        assert_eq!(kind(&Target::users(["a", "b"])), Some("user"));
        assert_eq!(kind(&Target::group("g")), Some("group"));
        assert_eq!(kind(&Target::all().except_user("a")), Some("all"));
        assert_eq!(kind(&Target::user("a").and_group("g")), Some("mixed"));
        assert_eq!(kind(&Target::all().and_conn(conn)), Some("mixed"));
        assert_eq!(kind(&Target::none()), None);
    }

    #[test]
    fn every_close_reason_and_drop_has_its_own_count() {
        let c = Counters::default();
        let reasons = [
            CloseReason::Client {
                code: None,
                reason: String::new(),
            },
            CloseReason::Kicked("k".into()),
            CloseReason::SlowConsumer,
            CloseReason::IdleTimeout,
            CloseReason::TooBig,
            CloseReason::InvalidUtf8,
            CloseReason::Protocol("p".into()),
            CloseReason::Policy("p".into()),
            CloseReason::Io("e".into()),
            CloseReason::Shutdown,
        ];
        for (i, r) in reasons.iter().enumerate() {
            for _ in 0..=i {
                c.closed(Transport::Tcp, r);
            }
        }
        c.opened(Transport::WebSocket);
        c.dropped(Dropped::Unframable, 2);
        c.dropped(Dropped::SlowConsumer, 3);
        let s = c.snapshot(0, BackplaneStats::default());
        let d = s.frames_dropped_by;
        assert_eq!((d.queue_full, d.slow_consumer, d.unframable), (0, 3, 2));
        assert_eq!(s.frames_dropped, 2, "as before: full queues and unframable");
        let counts: Vec<u64> = s.closes.labeled().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, (1..=10).collect::<Vec<u64>>());
        assert_eq!((s.slow_consumers_closed, s.policy_closed), (3, 8));
        assert_eq!(s.conns_closed, 55);
        assert_eq!(
            s.conns_open_by,
            PerTransport {
                websocket: 1,
                tcp: 0
            }
        );
    }
}
