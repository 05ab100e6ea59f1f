//! The node's own connections, users, groups and sessions.
//!
//! Every mutation reports a [`MembershipChange`] to the backplane while the
//! registry's write lock is held, so a directory or a set of routing bindings
//! sees changes in the order they happened.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use switchboard_core::history::{StreamOf, group_stream, user_stream};

use switchboard_core::query::LocalTotals;
use switchboard_core::{
    Backplane, ConnId, Frame, GroupId, LocalAnswer, MembershipChange, NodeId, Position, Query,
    Session, Target, UserId,
};

use crate::handler::CloseReason;
use crate::outbox::{Outbox, Queued};
use crate::sequencer::{Arrival, Gap, Held, Sequencer};

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) outbox: Arc<Outbox>,
    user: Option<UserId>,
    groups: GroupSet,
    session: Session,
}

/// A connection's groups: a short list while there are few (most connections
/// are in one or two groups, at 16 bytes a group), a hash set beyond, so that a
/// join or leave never scans a long list while the registry's lock is held.
#[derive(Debug)]
enum GroupSet {
    Few(Vec<GroupId>),
    Many(HashSet<GroupId>),
}

impl Default for GroupSet {
    fn default() -> Self {
        GroupSet::Few(Vec::new())
    }
}

impl GroupSet {
    /// Past this many, a list becomes a set.
    const FEW: usize = 8;

    fn len(&self) -> usize {
        match self {
            GroupSet::Few(v) => v.len(),
            GroupSet::Many(s) => s.len(),
        }
    }

    fn contains(&self, g: &GroupId) -> bool {
        match self {
            GroupSet::Few(v) => v.contains(g),
            GroupSet::Many(s) => s.contains(g),
        }
    }

    fn insert(&mut self, g: GroupId) {
        match self {
            GroupSet::Few(v) if v.len() < Self::FEW => v.push(g),
            GroupSet::Few(v) => {
                let mut set: HashSet<GroupId> = v.drain(..).collect();
                set.insert(g);
                *self = GroupSet::Many(set);
            }
            GroupSet::Many(s) => {
                s.insert(g);
            }
        }
    }

    /// Removes `g`; whether it was there.
    fn remove(&mut self, g: &GroupId) -> bool {
        match self {
            GroupSet::Few(v) => match v.iter().position(|x| x == g) {
                Some(i) => {
                    v.swap_remove(i);
                    true
                }
                None => false,
            },
            GroupSet::Many(s) => {
                let removed = s.remove(g);
                shrink(s.len(), s.capacity(), |n| s.shrink_to(n));
                removed
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &GroupId> + '_> {
        match self {
            GroupSet::Few(v) => Box::new(v.iter()),
            GroupSet::Many(s) => Box::new(s.iter()),
        }
    }

    fn take(&mut self) -> Vec<GroupId> {
        match std::mem::take(self) {
            GroupSet::Few(v) => v,
            GroupSet::Many(s) => s.into_iter().collect(),
        }
    }
}

/// Gives memory back once a map is mostly empty: a hash map keeps its
/// capacity when entries leave, so one client that joined 100,000 groups would
/// otherwise leave megabytes behind it. Halving at a quarter keeps the cost
/// amortized O(1) per removal.
fn shrink(len: usize, capacity: usize, shrink_to: impl FnOnce(usize)) {
    if capacity > 64 && len * 4 < capacity {
        shrink_to(len * 2);
    }
}

/// What a join did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Joined {
    /// The connection is in the group (it may already have been).
    Yes,
    /// No such connection.
    NoConn,
    /// The connection is in as many groups as it may be.
    Full,
}

/// What a local delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) queued: u32,
    pub(crate) dropped: u32,
    pub(crate) overflowed: u32,
}

impl Delivery {
    fn count(&mut self, q: Queued) {
        match q {
            Queued::Yes => self.queued += 1,
            Queued::Dropped => self.dropped += 1,
            Queued::Overflowed => self.overflowed += 1,
            // A repeat reached the client already, from its replay.
            Queued::Closing | Queued::Repeat => {}
        }
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    node: NodeId,
    conns: HashMap<u64, Slot>,
    users: HashMap<UserId, Vec<u64>>,
    groups: HashMap<GroupId, HashMap<u64, Arc<Outbox>>>,
    /// Most groups one connection may be in.
    max_groups: usize,
    /// The order of recorded pushes per stream with local members. A mutex
    /// of its own: deliveries hold the registry's read lock.
    order: Mutex<Sequencer>,
}

impl Registry {
    pub(crate) fn new(node: NodeId, max_groups: usize) -> Self {
        Self {
            max_groups,
            node,
            conns: HashMap::new(),
            users: HashMap::new(),
            groups: HashMap::new(),
            order: Mutex::new(Sequencer::default()),
        }
    }

    fn id(&self, seq: u64) -> ConnId {
        ConnId::new(self.node.clone(), seq)
    }

    /// The local sequence number of `conn`, if it belongs to this node.
    pub(crate) fn local_seq(&self, conn: &ConnId) -> Option<u64> {
        (conn.node() == &self.node).then_some(conn.seq())
    }

    /// Every local connection's sequence number and outbox.
    pub(crate) fn outboxes(&self) -> impl Iterator<Item = (u64, &Arc<Outbox>)> {
        self.conns.iter().map(|(&seq, slot)| (seq, &slot.outbox))
    }

    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn insert(
        &mut self,
        seq: u64,
        outbox: Arc<Outbox>,
        user: Option<UserId>,
        groups: Vec<GroupId>,
        session: Session,
        bp: &dyn Backplane,
    ) {
        self.conns.insert(
            seq,
            Slot {
                outbox,
                user: None,
                groups: GroupSet::default(),
                session,
            },
        );
        bp.membership(&MembershipChange::Opened { conn: self.id(seq) });
        if let Some(s) = self.conns.get(&seq).filter(|s| !s.session.is_empty()) {
            bp.membership(&MembershipChange::Session {
                conn: self.id(seq),
                session: s.session.clone(),
            });
        }
        if let Some(u) = user {
            self.bind(seq, u, bp);
        }
        for g in groups {
            if self.join(seq, g, bp) == Joined::Full {
                tracing::warn!(
                    conn = %self.id(seq),
                    max = self.max_groups,
                    "the application accepted a connection into more groups than it may join; the rest are left out"
                );
                break;
            }
        }
    }

    pub(crate) fn remove(&mut self, seq: u64, bp: &dyn Backplane) -> Option<Slot> {
        if !self.conns.contains_key(&seq) {
            return None;
        }
        let user = self.conns.get(&seq).and_then(|s| s.user.clone());
        self.unbind(seq, bp);
        let groups = self
            .conns
            .get_mut(&seq)
            .map(|s| s.groups.take())
            .unwrap_or_default();
        for g in groups {
            self.leave_group_map(seq, &g, bp);
        }
        let slot = self.conns.remove(&seq);
        shrink(self.conns.len(), self.conns.capacity(), |n| {
            self.conns.shrink_to(n)
        });
        bp.membership(&MembershipChange::Closed {
            conn: self.id(seq),
            user,
        });
        slot
    }

    /// Binds a connection to a user, moving it from its previous user.
    pub(crate) fn bind(&mut self, seq: u64, user: UserId, bp: &dyn Backplane) -> bool {
        let Some(slot) = self.conns.get(&seq) else {
            return false;
        };
        if slot.user.as_ref() == Some(&user) {
            return true;
        }
        self.unbind(seq, bp);
        let list = self.users.entry(user.clone()).or_default();
        let first = list.is_empty();
        list.push(seq);
        let count = list.len() as u32;
        if let Some(slot) = self.conns.get_mut(&seq) {
            slot.user = Some(user.clone());
        }
        bp.membership(&MembershipChange::Bound {
            conn: self.id(seq),
            user,
            first,
            count,
        });
        true
    }

    pub(crate) fn unbind(&mut self, seq: u64, bp: &dyn Backplane) -> bool {
        let Some(slot) = self.conns.get_mut(&seq) else {
            return false;
        };
        let Some(user) = slot.user.take() else {
            return true;
        };
        let mut count = 0;
        if let Entry::Occupied(mut e) = self.users.entry(user.clone()) {
            e.get_mut().retain(|&s| s != seq);
            count = e.get().len() as u32;
            if count == 0 {
                e.remove();
                shrink(self.users.len(), self.users.capacity(), |n| {
                    self.users.shrink_to(n)
                });
                let order = self.order.get_mut().unwrap_or_else(|p| p.into_inner());
                if !order.is_empty() {
                    order.forget(&user_stream(user.as_str()));
                }
            }
        }
        bp.membership(&MembershipChange::Unbound {
            conn: self.id(seq),
            user,
            last: count == 0,
            count,
        });
        true
    }

    pub(crate) fn join(&mut self, seq: u64, group: GroupId, bp: &dyn Backplane) -> Joined {
        let Some(slot) = self.conns.get_mut(&seq) else {
            return Joined::NoConn;
        };
        if slot.groups.contains(&group) {
            return Joined::Yes;
        }
        if slot.groups.len() >= self.max_groups {
            return Joined::Full;
        }
        slot.groups.insert(group.clone());
        let outbox = slot.outbox.clone();
        let members = self.groups.entry(group.clone()).or_default();
        let first = members.is_empty();
        members.insert(seq, outbox);
        let count = members.len() as u32;
        bp.membership(&MembershipChange::Joined {
            conn: self.id(seq),
            group,
            first,
            count,
        });
        Joined::Yes
    }

    pub(crate) fn leave(&mut self, seq: u64, group: &GroupId, bp: &dyn Backplane) -> bool {
        let Some(slot) = self.conns.get_mut(&seq) else {
            return false;
        };
        if slot.groups.remove(group) {
            self.leave_group_map(seq, group, bp);
        }
        true
    }

    fn leave_group_map(&mut self, seq: u64, group: &GroupId, bp: &dyn Backplane) {
        let mut count = 0;
        if let Some(members) = self.groups.get_mut(group) {
            members.remove(&seq);
            count = members.len() as u32;
            if count == 0 {
                self.groups.remove(group);
                shrink(self.groups.len(), self.groups.capacity(), |n| {
                    self.groups.shrink_to(n)
                });
                let order = self.order.get_mut().unwrap_or_else(|p| p.into_inner());
                if !order.is_empty() {
                    order.forget(&group_stream(group.as_str()));
                }
            } else {
                shrink(members.len(), members.capacity(), |n| members.shrink_to(n));
            }
        }
        bp.membership(&MembershipChange::Left {
            conn: self.id(seq),
            group: group.clone(),
            last: count == 0,
            count,
        });
    }

    pub(crate) fn session(&self, seq: u64) -> Option<&Session> {
        self.conns.get(&seq).map(|s| &s.session)
    }

    /// Changes a connection's session with `f` and reports the new session.
    pub(crate) fn update_session(
        &mut self,
        seq: u64,
        bp: &dyn Backplane,
        f: impl FnOnce(&mut Session),
    ) -> bool {
        let Some(slot) = self.conns.get_mut(&seq) else {
            return false;
        };
        f(&mut slot.session);
        let session = slot.session.clone();
        bp.membership(&MembershipChange::Session {
            conn: self.id(seq),
            session,
        });
        true
    }

    /// Reports the current state as the changes that would recreate it.
    pub(crate) fn replay(&self, f: &mut dyn FnMut(MembershipChange)) {
        for (&seq, slot) in &self.conns {
            let conn = self.id(seq);
            f(MembershipChange::Opened { conn: conn.clone() });
            if !slot.session.is_empty() {
                f(MembershipChange::Session {
                    conn: conn.clone(),
                    session: slot.session.clone(),
                });
            }
            if let Some(user) = &slot.user {
                let count = self.users.get(user).map_or(0, Vec::len) as u32;
                f(MembershipChange::Bound {
                    conn: conn.clone(),
                    user: user.clone(),
                    first: false,
                    count,
                });
            }
            for group in slot.groups.iter() {
                let count = self.groups.get(group).map_or(0, HashMap::len) as u32;
                f(MembershipChange::Joined {
                    conn: conn.clone(),
                    group: group.clone(),
                    first: false,
                    count,
                });
            }
        }
    }

    /// Calls `f` once for every local connection `target` selects.
    fn for_each(&self, target: &Target, mut f: impl FnMut(&Arc<Outbox>)) {
        let mut excluded: HashSet<u64> = HashSet::new();
        for c in target.excluded_conns() {
            if let Some(seq) = self.local_seq(c) {
                excluded.insert(seq);
            }
        }
        for u in target.excluded_users() {
            if let Some(list) = self.users.get(u) {
                excluded.extend(list.iter().copied());
            }
        }
        if target.is_all() {
            for (seq, slot) in &self.conns {
                if !excluded.contains(seq) {
                    f(&slot.outbox);
                }
            }
            return;
        }
        // A single term cannot reach a connection twice; only unions need the set.
        let mut seen: Option<HashSet<u64>> = target.may_overlap().then(HashSet::new);
        let mut visit = |seq: u64, outbox: &Arc<Outbox>| {
            if excluded.contains(&seq) {
                return;
            }
            if let Some(seen) = seen.as_mut()
                && !seen.insert(seq)
            {
                return;
            }
            f(outbox);
        };
        for c in target.conns() {
            if let Some(seq) = self.local_seq(c)
                && let Some(slot) = self.conns.get(&seq)
            {
                visit(seq, &slot.outbox);
            }
        }
        for u in target.included_users() {
            for &seq in self.users.get(u).into_iter().flatten() {
                if let Some(slot) = self.conns.get(&seq) {
                    visit(seq, &slot.outbox);
                }
            }
        }
        for g in target.included_groups() {
            for (&seq, outbox) in self.groups.get(g).into_iter().flatten() {
                visit(seq, outbox);
            }
        }
    }

    /// Queues `frame` on every local connection `target` selects.
    pub(crate) fn deliver(&self, target: &Target, frame: &Frame) -> Delivery {
        let mut d = Delivery::default();
        self.for_each(target, |outbox| d.count(outbox.push(frame)));
        d
    }

    /// Queues a recorded frame, the entry at `pos` of `stream`, to every
    /// local connection `target` selects, in the stream's order (see
    /// [`Sequencer`]). Returns what was delivered (the entry and any held
    /// ones it released) and whether entries are held now.
    pub(crate) fn deliver_recorded(
        &self,
        target: &Target,
        stream: &str,
        pos: Position,
        frame: &Frame,
        now: u64,
    ) -> (Delivery, bool) {
        let mut d = Delivery::default();
        if !self.has_members(stream) {
            // Nobody here reads it, and no order to keep.
            return (d, false);
        }
        let mut order = self.order();
        let held = || Held {
            target: target.clone(),
            frame: frame.clone(),
        };
        match order.arrive(stream, pos, now, held) {
            Arrival::Held => {}
            Arrival::NewEpochHeld => self.lost_entries(&mut d, stream),
            Arrival::Late => {
                self.queue_recorded(&mut d, target, stream, pos, frame);
            }
            Arrival::GaveUp => {
                self.lost_entries(&mut d, stream);
                for (pos, h) in order.ready(stream) {
                    self.queue_recorded(&mut d, &h.target, stream, pos, &h.frame);
                }
            }
            arrival @ (Arrival::Deliver | Arrival::NewEpoch) => {
                if arrival == Arrival::NewEpoch {
                    self.lost_entries(&mut d, stream);
                }
                self.queue_recorded(&mut d, target, stream, pos, frame);
                for (pos, h) in order.ready(stream) {
                    self.queue_recorded(&mut d, &h.target, stream, pos, &h.frame);
                }
            }
        }
        (d, order.is_holding())
    }

    fn queue_recorded(
        &self,
        d: &mut Delivery,
        target: &Target,
        stream: &str,
        pos: Position,
        frame: &Frame,
    ) {
        self.for_each(target, |outbox| {
            d.count(outbox.push_recorded(frame, stream, pos));
        });
    }

    /// Whether this node has members of `stream` (`user:U`, `group:G`).
    fn has_members(&self, stream: &str) -> bool {
        match StreamOf::parse(stream) {
            Some(StreamOf::User(u)) => self.users.contains_key(u),
            Some(StreamOf::Group(g)) => self.groups.contains_key(g),
            None => false,
        }
    }

    fn order(&self) -> std::sync::MutexGuard<'_, Sequencer> {
        // Every mutation of the sequencer is complete before it can panic.
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gaps in recorded streams held past `timeout` ms.
    pub(crate) fn overdue_gaps(&self, now: u64, timeout: u64) -> Vec<Gap> {
        self.order().overdue(now, timeout)
    }

    /// Fills `gap` with `entries` read from the history (frames built by
    /// `frame`), then delivers what it held back. Returns the delivery,
    /// how many offsets of the gap nothing filled, and whether entries are
    /// still held.
    pub(crate) fn fill_gap(
        &self,
        gap: &Gap,
        entries: &[(Position, Frame)],
        now: u64,
    ) -> (Delivery, u64, bool) {
        let mut d = Delivery::default();
        let mut order = self.order();
        if !order.close_gap(gap, now) {
            return (d, 0, order.is_holding());
        }
        let target = match StreamOf::parse(&gap.stream) {
            Some(StreamOf::User(u)) => Target::user(u),
            Some(StreamOf::Group(g)) => Target::group(g),
            None => Target::none(),
        };
        let mut filled = 0;
        for (pos, frame) in entries {
            if (gap.from..gap.until).contains(&pos.offset) && pos.epoch == gap.epoch {
                self.queue_recorded(&mut d, &target, &gap.stream, *pos, frame);
                filled += 1;
            }
        }
        let lost = (gap.until - gap.from).saturating_sub(filled);
        if lost > 0 {
            self.lost_entries(&mut d, &gap.stream);
        }
        for (pos, h) in order.ready(&gap.stream) {
            self.queue_recorded(&mut d, &h.target, &gap.stream, pos, &h.frame);
        }
        (d, lost, order.is_holding())
    }

    /// Tells every local member of `stream` that entries of it will never
    /// reach them (lost with the history, or by the broker and no longer in
    /// the history): `{"op":"recovered","stream":...,"recovered":false}`,
    /// the answer a recovery gets when it cannot give the client everything,
    /// so that the client resyncs rather than miss them silently.
    fn lost_entries(&self, d: &mut Delivery, stream: &str) {
        let target = match StreamOf::parse(stream) {
            Some(StreamOf::User(u)) => Target::user(u),
            Some(StreamOf::Group(g)) => Target::group(g),
            None => return,
        };
        let notice = crate::hub::recovered_frame(stream, false);
        self.for_each(&target, |outbox| d.count(outbox.push(&notice)));
    }

    /// Whether recorded entries are held waiting for earlier ones.
    pub(crate) fn holding(&self) -> bool {
        self.order().is_holding()
    }

    /// A local connection starts recovering `stream` from `pos`.
    pub(crate) fn recovering(&self, stream: &str, pos: Position) {
        self.order().recovering(stream, pos);
    }

    /// A local connection's replay of `stream` ended at `last`; delivers
    /// what the stream's order can release now.
    pub(crate) fn recovered(&self, stream: &str, last: Option<Position>) -> Delivery {
        let mut d = Delivery::default();
        let mut order = self.order();
        order.recovered(stream, last);
        for (pos, h) in order.ready(stream) {
            self.queue_recorded(&mut d, &h.target, stream, pos, &h.frame);
        }
        d
    }

    /// Asks every local connection `target` selects to close.
    pub(crate) fn close(&self, target: &Target, reason: &CloseReason) -> u32 {
        let mut n = 0;
        self.for_each(target, |outbox| {
            if outbox.close(reason.clone()) {
                n += 1;
            }
        });
        n
    }

    /// Asks every local connection to close.
    pub(crate) fn close_all(&self, reason: &CloseReason) {
        for slot in self.conns.values() {
            slot.outbox.close(reason.clone());
        }
    }

    /// This node's answer to `query`.
    pub(crate) fn answer(&self, query: &Query) -> LocalAnswer {
        let ids = |seqs: &mut dyn Iterator<Item = u64>| seqs.map(|s| self.id(s)).collect();
        match query {
            Query::ConnExists(c) => LocalAnswer::Bool(
                self.local_seq(c)
                    .is_some_and(|s| self.conns.contains_key(&s)),
            ),
            Query::UserOnline(u) => LocalAnswer::Bool(self.users.contains_key(u)),
            Query::UserConns(u) => {
                LocalAnswer::Conns(ids(&mut self.users.get(u).into_iter().flatten().copied()))
            }
            Query::ConnUser(c) => LocalAnswer::User(
                self.local_seq(c)
                    .and_then(|s| self.conns.get(&s))
                    .and_then(|slot| slot.user.clone()),
            ),
            Query::GroupMembers(g) => LocalAnswer::Conns(ids(&mut self
                .groups
                .get(g)
                .into_iter()
                .flat_map(|m| m.keys().copied()))),
            Query::GroupCount(g) => {
                LocalAnswer::Count(self.groups.get(g).map_or(0, |m| m.len() as u64))
            }
            Query::Totals => LocalAnswer::Totals(LocalTotals {
                conns: self.conns.len() as u64,
                users: self.users.keys().cloned().collect(),
                groups: self.groups.keys().cloned().collect(),
            }),
            // Queries added later are answered as "nothing here" by this node
            // rather than failing the whole cluster answer.
            _ => LocalAnswer::Count(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumer;
    use crate::outbox::Caps;
    use std::sync::Mutex;
    use switchboard_core::Standalone;
    use switchboard_core::backplane::{
        BackplaneStats, Dest, Handoff, JoinContext, JoinError, Status,
    };

    /// Records membership changes, to check what a directory would see.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<MembershipChange>>);

    #[async_trait::async_trait]
    impl Backplane for Recorder {
        async fn join(&self, _: JoinContext) -> Result<(), JoinError> {
            Ok(())
        }
        fn publish(&self, _: Dest<'_>, _: bytes::Bytes) -> Handoff {
            Handoff::default()
        }
        fn peers(&self) -> Vec<NodeId> {
            Vec::new()
        }
        fn membership(&self, c: &MembershipChange) {
            self.0.lock().unwrap().push(c.clone());
        }
        fn status(&self) -> Status {
            Status::Ready
        }
        fn stats(&self) -> BackplaneStats {
            BackplaneStats::default()
        }
        async fn leave(&self) {}
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Caps {
            frames: 100,
            bytes: 1 << 20,
            policy: SlowConsumer::Close,
            idle_ms: 0,
        }))
    }

    fn setup() -> (Registry, Recorder, Vec<Arc<Outbox>>) {
        let bp = Recorder::default();
        let mut r = Registry::new(NodeId::new("n").unwrap(), 128);
        let obs: Vec<_> = (0..4).map(|_| outbox()).collect();
        r.insert(
            0,
            obs[0].clone(),
            Some("a".into()),
            vec!["g".into()],
            Session::new(),
            &bp,
        );
        r.insert(
            1,
            obs[1].clone(),
            Some("a".into()),
            vec!["g".into(), "h".into()],
            Session::new(),
            &bp,
        );
        r.insert(
            2,
            obs[2].clone(),
            Some("b".into()),
            vec![],
            Session::new(),
            &bp,
        );
        r.insert(
            3,
            obs[3].clone(),
            None,
            vec!["h".into()],
            Session::new(),
            &bp,
        );
        (r, bp, obs)
    }

    fn counts(obs: &[Arc<Outbox>]) -> Vec<usize> {
        obs.iter().map(|o| o.len()).collect()
    }

    #[test]
    fn overlapping_targets_deliver_once() {
        let (r, _, obs) = setup();
        let f = Frame::text("x");
        let t = Target::group("g").and_group("h").and_user("a");
        assert_eq!(r.deliver(&t, &f).queued, 3);
        assert_eq!(counts(&obs), [1, 1, 0, 1]);
        let t = Target::all().except_user("a");
        assert_eq!(r.deliver(&t, &f).queued, 2);
        assert_eq!(counts(&obs), [1, 1, 1, 2]);
        let me = ConnId::new(NodeId::new("n").unwrap(), 1);
        let other = ConnId::new(NodeId::new("m").unwrap(), 2);
        let t = Target::conn(me.clone())
            .and_conn(other)
            .and_user("a")
            .except_conn(me);
        assert_eq!(r.deliver(&t, &f).queued, 1);
        assert_eq!(counts(&obs), [2, 1, 1, 2]);
    }

    #[test]
    fn membership_changes_are_reported_with_first_and_last() {
        let (mut r, bp, _) = setup();
        bp.0.lock().unwrap().clear();
        assert!(r.bind(0, "b".into(), &bp));
        r.remove(1, &bp);
        let got = bp.0.lock().unwrap().clone();
        let n = |s| ConnId::new(NodeId::new("n").unwrap(), s);
        assert_eq!(
            got,
            [
                MembershipChange::Unbound {
                    conn: n(0),
                    user: "a".into(),
                    last: false,
                    count: 1
                },
                MembershipChange::Bound {
                    conn: n(0),
                    user: "b".into(),
                    first: false,
                    count: 2
                },
                MembershipChange::Unbound {
                    conn: n(1),
                    user: "a".into(),
                    last: true,
                    count: 0
                },
                MembershipChange::Left {
                    conn: n(1),
                    group: "g".into(),
                    last: false,
                    count: 1
                },
                MembershipChange::Left {
                    conn: n(1),
                    group: "h".into(),
                    last: false,
                    count: 1
                },
                MembershipChange::Closed {
                    conn: n(1),
                    user: Some("a".into())
                },
            ]
        );
        assert_eq!(
            r.answer(&Query::UserOnline("a".into())),
            LocalAnswer::Bool(false)
        );
        assert_eq!(
            r.answer(&Query::GroupCount("g".into())),
            LocalAnswer::Count(1)
        );
        assert_eq!(
            r.answer(&Query::UserConns("b".into())),
            LocalAnswer::Conns(vec![n(2), n(0)])
        );
        assert!(!r.bind(9, "x".into(), &bp));
    }

    #[test]
    fn many_groups_join_and_leave_in_constant_time_and_give_memory_back() {
        let bp = Standalone;
        let mut r = Registry::new(NodeId::new("n").unwrap(), usize::MAX);
        r.insert(1, outbox(), None, Vec::new(), Session::new(), &bp);
        r.insert(2, outbox(), None, vec!["keep".into()], Session::new(), &bp);
        let n = 20_000;
        for i in 0..n {
            assert_eq!(r.join(1, GroupId::from(format!("g{i}")), &bp), Joined::Yes);
        }
        // A repeated join finds the group by hash, not by scanning 20,000.
        assert_eq!(r.join(1, GroupId::from("g19999"), &bp), Joined::Yes);
        assert!(matches!(r.conns[&1].groups, GroupSet::Many(_)));
        assert_eq!(r.groups.len(), n + 1);
        for i in 0..n / 2 {
            assert!(r.leave(1, &GroupId::from(format!("g{i}")), &bp));
        }
        assert_eq!(r.conns[&1].groups.len(), n / 2);
        r.remove(1, &bp);
        // What the client took is given back when it leaves.
        assert_eq!(r.groups.len(), 1);
        assert!(r.groups.capacity() < 1024, "{}", r.groups.capacity());
        // A capped registry refuses past its cap.
        let mut r = Registry::new(NodeId::new("n").unwrap(), 2);
        r.insert(1, outbox(), None, Vec::new(), Session::new(), &bp);
        assert_eq!(r.join(1, "a".into(), &bp), Joined::Yes);
        assert_eq!(r.join(1, "b".into(), &bp), Joined::Yes);
        assert_eq!(r.join(1, "a".into(), &bp), Joined::Yes, "already in");
        assert_eq!(r.join(1, "c".into(), &bp), Joined::Full);
        assert_eq!(r.join(9, "c".into(), &bp), Joined::NoConn);
    }
}
