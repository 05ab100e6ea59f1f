//! Recorded pushes reach a node's connections in the order of their
//! positions.
//!
//! Positions are handed out by the history store, but the pushes travel
//! from the nodes that made them: two pushes to one stream made on two nodes
//! at once may reach a third in either order. A client recovers from the
//! latest position it got, so it must never get an entry before an earlier
//! one: the earlier one would be lost to it if it dropped in between.
//!
//! So a node delivers a stream's entries in order. An entry that comes early
//! is held until the ones before it come; if they have not come within the
//! gap timeout (lost by an at-most-once broker, or made before this node had
//! members of the stream), the hub reads them from the history and delivers
//! them, then what was held. A node keeps this state only for streams it has
//! members of: it is dropped with the stream's last local member.
//!
//! Pure bookkeeping, no I/O: the registry drives it under its own lock.

use std::collections::{BTreeMap, HashMap};

use switchboard_core::{Frame, Position, Target};

/// Entries held per stream past which its gap is overdue at once, without
/// waiting out the timeout. Four times as many and the gap is given up
/// (the members are told), should the history not answer in time.
pub(crate) const MAX_HELD: usize = 1024;

#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) target: Target,
    pub(crate) frame: Frame,
}

#[derive(Debug)]
struct Order {
    epoch: u64,
    /// The offset delivered next.
    next: u64,
    held: BTreeMap<u64, Held>,
    /// When the earliest held entry was held (hub clock, ms).
    held_since: u64,
    /// Too many held: overdue whatever the time.
    urgent: bool,
    /// Made by a connection's recovery rather than by an arrival: its `next`
    /// is the client's position, to be moved past the replay when it ends.
    provisional: bool,
}

/// What to do with an arriving entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The next in order: deliver it, then [`Sequencer::ready`].
    Deliver,
    /// The first of a new epoch to arrive, and the epoch's first entry: the
    /// stream's history was lost, and with it whatever of the old epoch this
    /// node had not received yet. Tell the members they may have missed
    /// entries, then deliver it.
    NewEpoch,
    /// The first of a new epoch to arrive, after entries of the new epoch
    /// that have not: tell the members, and hold it as any early entry.
    NewEpochHeld,
    /// Early: held.
    Held,
    /// Early, and too many are held: the earliest gap was given up. Tell the
    /// members they missed entries, then [`Sequencer::ready`].
    GaveUp,
    /// Earlier than what was delivered already (a gap was filled from the
    /// history, or it was made before this node first heard of the
    /// stream): delivered late, out of order. Connections that recovered
    /// past it drop it.
    Late,
}

/// A gap overdue for filling from the history: the entries from `from` to
/// just before `until` never came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) stream: Box<str>,
    pub(crate) epoch: u64,
    pub(crate) from: u64,
    pub(crate) until: u64,
    /// When its entries after it began to be held (hub clock, ms).
    pub(crate) since: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    streams: HashMap<Box<str>, Order>,
    /// Streams holding entries now.
    holding: usize,
}

impl Sequencer {
    pub(crate) fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Whether any stream holds entries.
    pub(crate) fn is_holding(&self) -> bool {
        self.holding > 0
    }

    /// An entry of `stream` at `pos` arrives for local members.
    pub(crate) fn arrive(
        &mut self,
        stream: &str,
        pos: Position,
        now: u64,
        entry: impl FnOnce() -> Held,
    ) -> Arrival {
        let Some(o) = self.streams.get_mut(stream) else {
            self.streams
                .insert(stream.into(), Order::at(pos.epoch, pos.offset + 1));
            return Arrival::Deliver;
        };
        if o.epoch != pos.epoch {
            // The history was lost and began again: what was held belongs to
            // the old epoch and will not be filled. The new epoch starts at
            // offset 1, and its entries before this one are still in the
            // history if they did not reach this node: wait for them, or
            // fill them, as any gap.
            if !o.held.is_empty() {
                self.holding -= 1;
            }
            *o = Order::at(pos.epoch, 1);
            return match self.arrive(stream, pos, now, entry) {
                Arrival::Deliver => Arrival::NewEpoch,
                Arrival::Held => Arrival::NewEpochHeld,
                other => other,
            };
        }
        if pos.offset < o.next {
            return Arrival::Late;
        }
        if pos.offset == o.next {
            o.next += 1;
            return Arrival::Deliver;
        }
        if o.held.is_empty() {
            o.held_since = now;
            self.holding += 1;
        }
        o.held.entry(pos.offset).or_insert_with(entry);
        if o.held.len() > MAX_HELD {
            // Overdue now: the gap task reads the gap at its next look.
            o.urgent = true;
        }
        if o.held.len() > 4 * MAX_HELD
            && let Some((&first, _)) = o.held.first_key_value()
        {
            o.next = first;
            return Arrival::GaveUp;
        }
        Arrival::Held
    }

    /// The held entries of `stream` now next in order, in order.
    pub(crate) fn ready(&mut self, stream: &str) -> Vec<(Position, Held)> {
        let Some(o) = self.streams.get_mut(stream) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(h) = o.held.remove(&o.next) {
            out.push((
                Position {
                    offset: o.next,
                    epoch: o.epoch,
                },
                h,
            ));
            o.next += 1;
        }
        if !out.is_empty() && o.held.is_empty() {
            self.holding -= 1;
        }
        out
    }

    /// Gaps held for at least `timeout` ms.
    pub(crate) fn overdue(&self, now: u64, timeout: u64) -> Vec<Gap> {
        if self.holding == 0 {
            return Vec::new();
        }
        self.streams
            .iter()
            .filter(|(_, o)| {
                !o.held.is_empty() && (o.urgent || now.saturating_sub(o.held_since) >= timeout)
            })
            .filter_map(|(s, o)| {
                let (&until, _) = o.held.first_key_value()?;
                Some(Gap {
                    stream: s.clone(),
                    epoch: o.epoch,
                    from: o.next,
                    until,
                    since: o.held_since,
                })
            })
            .collect()
    }

    /// Closes `gap`, if the stream is still waiting for it: the caller
    /// delivers the filling entries it read first. Returns whether it was
    /// still open (else the fill is stale and must not be delivered).
    pub(crate) fn close_gap(&mut self, gap: &Gap, now: u64) -> bool {
        let Some(o) = self.streams.get_mut(&gap.stream) else {
            return false;
        };
        if o.epoch != gap.epoch || o.next != gap.from {
            return false;
        }
        o.next = gap.until;
        // What is held past the next gap waits its own timeout from now.
        o.held_since = now;
        o.urgent = false;
        true
    }

    /// A connection begins recovering `stream` from `pos`: if the node
    /// knows nothing of the stream yet, entries after `pos` are held until
    /// the recovery ends (see [`Sequencer::recovered`]).
    pub(crate) fn recovering(&mut self, stream: &str, pos: Position) {
        if !self.streams.contains_key(stream) {
            let mut o = Order::at(pos.epoch, pos.offset + 1);
            o.provisional = true;
            self.streams.insert(stream.into(), o);
        }
    }

    /// A connection's replay of `stream` ended at `last`: the stream is
    /// delivered from there on, if the recovery is what started its order.
    pub(crate) fn recovered(&mut self, stream: &str, last: Option<Position>) {
        let Some(o) = self.streams.get_mut(stream) else {
            return;
        };
        if !o.provisional {
            return;
        }
        o.provisional = false;
        let Some(last) = last else {
            // Not recovered: order from the earliest entry held.
            if let Some((&first, _)) = o.held.first_key_value() {
                o.next = first;
            }
            return;
        };
        if last.epoch != o.epoch {
            return;
        }
        if last.offset + 1 > o.next {
            o.next = last.offset + 1;
            let before = o.held.len();
            o.held.retain(|&k, _| k > last.offset);
            if before > 0 && o.held.is_empty() {
                self.holding -= 1;
            }
        }
    }

    /// The node's last member of `stream` is gone.
    pub(crate) fn forget(&mut self, stream: &str) {
        if let Some(o) = self.streams.remove(stream)
            && !o.held.is_empty()
        {
            self.holding -= 1;
        }
    }
}

impl Order {
    fn at(epoch: u64, next: u64) -> Self {
        Order {
            epoch,
            next,
            held: BTreeMap::new(),
            held_since: 0,
            provisional: false,
            urgent: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(offset: u64) -> Position {
        Position { offset, epoch: 7 }
    }

    fn held(s: &str) -> impl FnOnce() -> Held + '_ {
        move || Held {
            target: Target::user("u"),
            frame: Frame::text(s),
        }
    }

    fn texts(r: Vec<(Position, Held)>) -> Vec<(u64, String)> {
        r.into_iter()
            .map(|(p, h)| (p.offset, h.frame.as_text().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn early_entries_wait_for_the_ones_before_them() {
        let mut s = Sequencer::default();
        assert_eq!(s.arrive("user:u", p(10), 0, held("10")), Arrival::Deliver);
        assert_eq!(s.arrive("user:u", p(12), 1, held("12")), Arrival::Held);
        assert_eq!(s.arrive("user:u", p(13), 2, held("13")), Arrival::Held);
        assert!(s.is_holding());
        assert_eq!(texts(s.ready("user:u")), vec![]);
        assert_eq!(s.arrive("user:u", p(11), 3, held("11")), Arrival::Deliver);
        assert_eq!(
            texts(s.ready("user:u")),
            vec![(12, "12".into()), (13, "13".into())]
        );
        assert!(!s.is_holding());
        assert_eq!(s.arrive("user:u", p(12), 4, held("12")), Arrival::Late);
        assert_eq!(s.arrive("user:u", p(14), 5, held("14")), Arrival::Deliver);
    }

    #[test]
    fn an_overdue_gap_is_reported_then_closed() {
        let mut s = Sequencer::default();
        s.arrive("user:u", p(1), 0, held("1"));
        s.arrive("user:u", p(4), 100, held("4"));
        assert_eq!(s.overdue(299, 200), vec![]);
        let gaps = s.overdue(300, 200);
        assert_eq!(
            gaps,
            vec![Gap {
                stream: "user:u".into(),
                epoch: 7,
                from: 2,
                until: 4,
                since: 100,
            }]
        );
        assert!(s.close_gap(&gaps[0], 300));
        assert!(!s.close_gap(&gaps[0], 300), "once");
        assert_eq!(texts(s.ready("user:u")), vec![(4, "4".into())]);
        assert!(!s.is_holding());
    }

    #[test]
    fn a_new_epoch_starts_over() {
        let mut s = Sequencer::default();
        s.arrive("user:u", p(5), 0, held("5"));
        s.arrive("user:u", p(7), 0, held("7"));
        let q = Position {
            offset: 1,
            epoch: 8,
        };
        assert_eq!(s.arrive("user:u", q, 0, held("1")), Arrival::NewEpoch);
        assert!(!s.is_holding());
        assert_eq!(
            s.arrive(
                "user:u",
                Position {
                    offset: 2,
                    epoch: 8
                },
                0,
                held("2")
            ),
            Arrival::Deliver
        );
    }

    #[test]
    fn a_recovery_orders_the_stream_from_the_clients_position() {
        let mut s = Sequencer::default();
        s.recovering("user:u", p(3));
        // 5 comes before 4: held; the replay covers up to 6.
        assert_eq!(s.arrive("user:u", p(5), 0, held("5")), Arrival::Held);
        assert_eq!(s.arrive("user:u", p(7), 0, held("7")), Arrival::Held);
        s.recovered("user:u", Some(p(6)));
        assert_eq!(texts(s.ready("user:u")), vec![(7, "7".into())]);
        assert!(!s.is_holding());
        // A second recovery of a known stream changes nothing.
        s.recovering("user:u", p(1));
        s.recovered("user:u", Some(p(1)));
        assert_eq!(s.arrive("user:u", p(8), 0, held("8")), Arrival::Deliver);
    }

    #[test]
    fn too_many_held_make_the_gap_overdue_then_give_it_up() {
        let mut s = Sequencer::default();
        s.arrive("group:g", p(1), 0, held("1"));
        for i in 0..=MAX_HELD as u64 {
            assert_eq!(s.arrive("group:g", p(3 + i), 100, held("x")), Arrival::Held);
        }
        assert_eq!(s.overdue(100, 250).len(), 1, "overdue before its timeout");
        let mut last = Arrival::Held;
        for i in MAX_HELD as u64 + 1..=4 * MAX_HELD as u64 {
            last = s.arrive("group:g", p(3 + i), 100, held("x"));
        }
        assert_eq!(last, Arrival::GaveUp);
        assert_eq!(s.ready("group:g").len(), 4 * MAX_HELD + 1);
        assert!(!s.is_holding());
    }

    #[test]
    fn forgetting_a_stream_drops_its_state() {
        let mut s = Sequencer::default();
        s.arrive("user:u", p(1), 0, held("1"));
        s.arrive("user:u", p(3), 0, held("3"));
        s.forget("user:u");
        assert!(s.is_empty());
        assert!(!s.is_holding());
        assert_eq!(s.arrive("user:u", p(9), 0, held("9")), Arrival::Deliver);
    }
}
