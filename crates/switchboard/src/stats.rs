//! Counters a hub keeps, for metrics and honest loss accounting.

use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_core::backplane::BackplaneStats;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) opened: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) frames_dropped: AtomicU64,
    pub(crate) slow_closed: AtomicU64,
    pub(crate) bad_envelopes: AtomicU64,
    pub(crate) inbound_dropped: AtomicU64,
    pub(crate) ops_refused: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) policy_closed: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
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
    /// Connections refused by the application or by a failed handshake.
    pub conns_rejected: u64,
    /// Frames received from clients.
    pub frames_in: u64,
    /// Frames queued to local connections (one per recipient).
    pub frames_queued: u64,
    /// Frames dropped because a queue was full under the drop policy.
    pub frames_dropped: u64,
    /// Connections closed because they could not keep up.
    pub slow_consumers_closed: u64,
    /// Envelopes from peers that could not be decoded.
    pub bad_envelopes: u64,
    /// Envelopes from peers dropped because this node's inbound queue was full.
    pub inbound_dropped: u64,
    /// Operations on this node's connections refused by a limit (a join past
    /// the cap of groups per connection).
    pub ops_refused: u64,
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
        HubStats {
            conns_open,
            conns_opened: g(&self.opened),
            conns_closed: g(&self.closed),
            conns_rejected: g(&self.rejected),
            frames_in: g(&self.frames_in),
            frames_queued: g(&self.queued),
            frames_dropped: g(&self.frames_dropped),
            slow_consumers_closed: g(&self.slow_closed),
            bad_envelopes: g(&self.bad_envelopes),
            inbound_dropped: g(&self.inbound_dropped),
            ops_refused: g(&self.ops_refused),
            messages_rate_limited: g(&self.rate_limited),
            policy_closed: g(&self.policy_closed),
            backplane,
        }
    }
}
