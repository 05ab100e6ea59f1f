//! The routes a node knows: which nodes hold a user, which hold a group.
//!
//! A push to users or groups must go to the nodes that hold them. Asking
//! Redis before every publish costs a round trip and a script per batch, so
//! a node keeps what it learned, and keeps it coherent:
//!
//! - **Learned by asking.** A route the node lacks is looked up in the
//!   directory, as before, and kept, holders or none ("offline" is a route
//!   too: pushes to users who are away are common).
//! - **Kept by listening.** Whenever a node becomes or stops being a holder
//!   of a user or group (its first connection in, its last one out), its
//!   directory writer publishes that change on the routes channel in the
//!   same transaction as the directory write. Every node applies it to the
//!   routes it keeps. A node that rebuilds its entries publishes a reset,
//!   and every node forgets everything it kept.
//! - **Trusted only while heard.** The routes are used only while the
//!   listener's subscription is up and hears the probes every node
//!   publishes on the channel each heartbeat. Subscribed again, the node
//!   starts from nothing: it may have missed changes meanwhile. A lookup
//!   that was under way when a change arrived is used for its batch but not
//!   kept, since it may predate the change.
//!
//! **How stale a route can be:** by the time the holder's directory write is
//! acknowledged, Redis has handed the change to every listener; a route is
//! stale for as long as a listener takes to read it (under a millisecond on
//! an idle link, more on a loaded node). A push routed in that window by the
//! old route goes where the route pointed: a node that just stopped holding
//! the user delivers it to nobody, and a node that just became a holder does
//! not get it, as if the push had been sent a moment before the connection
//! arrived. After a reconnect the publisher ignores routes altogether for
//! one TTL (see `publish`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use redis::RedisError;

use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::link::backoff;

/// Routes kept at most, users and groups each (about 100 bytes a route
/// held by one node: 10 MB each at most). Beyond it an arbitrary one is
/// forgotten for each learned: it is looked up again when needed.
const CAP: usize = 100_000;

/// A user's or a group's route: the nodes holding it.
pub(crate) type Holders = Arc<[Box<str>]>;

/// What a route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    User,
    Group,
}

/// One message on the routes channel, as bytes. A message is a sequence of
/// records, each starting with its tag byte:
/// - `PROBE`: a heartbeat, no body;
/// - `RESET`, node: forget every route;
/// - `HOLDS`/`DROPS`, kind (`u`/`g`), node, name: the node became or stopped
///   being a holder.
///
/// Strings are a u16 big-endian length, then the bytes.
pub(crate) mod wire {
    pub(crate) const PROBE: u8 = 0;
    pub(crate) const RESET: u8 = 1;
    pub(crate) const HOLDS: u8 = 2;
    pub(crate) const DROPS: u8 = 3;
}

/// A change to encode, from the directory writer.
pub(crate) fn encode_change(out: &mut Vec<u8>, kind: Kind, holds: bool, node: &str, name: &str) {
    out.push(if holds { wire::HOLDS } else { wire::DROPS });
    out.push(match kind {
        Kind::User => b'u',
        Kind::Group => b'g',
    });
    put_str(out, node);
    put_str(out, name);
}

pub(crate) fn encode_reset(node: &str) -> Vec<u8> {
    let mut out = vec![wire::RESET];
    put_str(&mut out, node);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are bounded well below 64 KiB by the hub's id limits; a longer
    // one is cut, which can only make a route miss its entry (and be looked
    // up, or reset, later).
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

fn take_str<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
    let (len, rest) = input.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    let (s, rest) = (rest.get(..len)?, &rest[len..]);
    *input = rest;
    std::str::from_utf8(s).ok()
}

#[derive(Default)]
struct State {
    /// The listener hears the channel: routes may be used and kept.
    heard: bool,
    /// Bumped by every change and every reset (see [`Routes::fill`]).
    version: u64,
    users: HashMap<Box<str>, Holders>,
    groups: HashMap<Box<str>, Holders>,
}

impl State {
    fn map(&mut self, kind: Kind) -> &mut HashMap<Box<str>, Holders> {
        match kind {
            Kind::User => &mut self.users,
            Kind::Group => &mut self.groups,
        }
    }

    fn forget(&mut self) {
        self.version += 1;
        self.users = HashMap::new();
        self.groups = HashMap::new();
    }
}

/// The routes this node knows. See the module docs.
#[derive(Default)]
pub(crate) struct Routes {
    state: Mutex<State>,
}

/// Routes read for one batch, under one lock.
pub(crate) struct Known<'a> {
    state: std::sync::MutexGuard<'a, State>,
}

impl Known<'_> {
    /// The holders of a user or group, if known.
    pub(crate) fn get(&self, kind: Kind, name: &str) -> Option<&Holders> {
        if !self.state.heard {
            return None;
        }
        match kind {
            Kind::User => self.state.users.get(name),
            Kind::Group => self.state.groups.get(name),
        }
    }

    /// The version to hand back to [`Routes::fill`] with what a lookup finds.
    pub(crate) fn version(&self) -> Option<u64> {
        self.state.heard.then_some(self.state.version)
    }
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The known routes, locked for one batch's resolution.
    pub(crate) fn known(&self) -> Known<'_> {
        Known { state: self.lock() }
    }

    /// Keeps routes a lookup found, unless a change or a reset came since
    /// `version` was read: the lookup may not reflect it.
    pub(crate) fn fill<'a>(
        &self,
        version: u64,
        found: impl IntoIterator<Item = (Kind, &'a str, Holders)>,
    ) {
        let mut s = self.lock();
        if !s.heard || s.version != version {
            return;
        }
        for (kind, name, holders) in found {
            let map = s.map(kind);
            if map.len() >= CAP
                && !map.contains_key(name)
                && let Some(evict) = map.keys().next().cloned()
            {
                map.remove(&evict);
            }
            map.insert(name.into(), holders);
        }
    }

    /// Applies one message of the routes channel. Returns whether it was
    /// understood (a message it cannot read forgets everything, to be safe).
    pub(crate) fn apply(&self, mut msg: &[u8]) -> bool {
        let mut s = self.lock();
        while let Some((&tag, rest)) = msg.split_first() {
            msg = rest;
            match tag {
                wire::PROBE => {}
                wire::RESET => {
                    if take_str(&mut msg).is_none() {
                        s.forget();
                        return false;
                    }
                    s.forget();
                }
                wire::HOLDS | wire::DROPS => {
                    let Some((&kind, rest)) = msg.split_first() else {
                        s.forget();
                        return false;
                    };
                    msg = rest;
                    let kind = match kind {
                        b'u' => Kind::User,
                        b'g' => Kind::Group,
                        _ => {
                            s.forget();
                            return false;
                        }
                    };
                    let (Some(node), Some(name)) = (take_str(&mut msg), take_str(&mut msg)) else {
                        s.forget();
                        return false;
                    };
                    s.version += 1;
                    let map = s.map(kind);
                    if let Some(holders) = map.get_mut(name) {
                        let has = holders.iter().any(|h| &**h == node);
                        if tag == wire::HOLDS && !has {
                            let mut v: Vec<Box<str>> = holders.to_vec();
                            v.push(node.into());
                            *holders = v.into();
                        } else if tag == wire::DROPS && has {
                            let v: Vec<Box<str>> =
                                holders.iter().filter(|h| &***h != node).cloned().collect();
                            *holders = v.into();
                        }
                    }
                }
                _ => {
                    s.forget();
                    return false;
                }
            }
        }
        true
    }

    /// The listener hears the channel (from nothing: `forget` first) or no
    /// longer does.
    fn set_heard(&self, heard: bool) {
        let mut s = self.lock();
        s.forget();
        s.heard = heard;
    }
}

/// Subscribes to the routes channel.
async fn subscribe(shared: &Shared) -> Result<crate::link::Messages, RedisError> {
    let channels = [shared.keys.routes()];
    shared.link.target.subscribe(&shared.keys, &channels).await
}

/// Listens to the routes channel until `stop`, resubscribing when the
/// subscription ends or stops hearing the heartbeats' probes (a half-open
/// connection must not leave the routes trusted but deaf).
pub(crate) async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    let check = shared.heartbeat_interval();
    // Two heartbeats without a probe from any node, this one included.
    let deaf_after = check * 2 + Duration::from_millis(500);
    let mut wait = Duration::from_millis(50);
    loop {
        let mut stream = tokio::select! {
            () = stop.cancelled() => return,
            s = subscribe(&shared) => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "redis routes subscription failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = backoff(&mut wait) => {}
                    }
                    continue;
                }
            },
        };
        wait = Duration::from_millis(50);
        shared.routes.set_heard(true);
        let mut heard_at = tokio::time::Instant::now();
        let mut ticker = tokio::time::interval(check);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                msg = stream.next() => match msg {
                    Some(m) => {
                        heard_at = tokio::time::Instant::now();
                        if !shared.routes.apply(m.get_payload_bytes()) {
                            tracing::warn!("unreadable message on the redis routes channel; routes forgotten");
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if heard_at.elapsed() > deaf_after {
                        tracing::warn!("redis routes subscription silent; subscribing again");
                        break;
                    }
                }
            }
        }
        shared.routes.set_heard(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(nodes: &[&str]) -> Holders {
        nodes.iter().map(|n| Box::<str>::from(*n)).collect()
    }

    fn names(h: Option<&Holders>) -> Option<Vec<&str>> {
        h.map(|h| h.iter().map(|n| &**n).collect())
    }

    fn heard() -> Routes {
        let r = Routes::default();
        r.set_heard(true);
        r
    }

    #[test]
    fn a_change_updates_a_route_kept_and_nothing_else() {
        let r = heard();
        let v = r.known().version().unwrap();
        r.fill(v, [(Kind::User, "alice", holders(&["n1"]))]);
        let mut msg = Vec::new();
        encode_change(&mut msg, Kind::User, true, "n2", "alice");
        encode_change(&mut msg, Kind::User, false, "n1", "alice");
        encode_change(&mut msg, Kind::User, true, "n1", "bob");
        assert!(r.apply(&msg));
        let k = r.known();
        assert_eq!(names(k.get(Kind::User, "alice")), Some(vec!["n2"]));
        assert_eq!(names(k.get(Kind::User, "bob")), None, "not kept: looked up");
        assert_eq!(
            names(k.get(Kind::Group, "alice")),
            None,
            "a group is not a user"
        );
    }

    #[test]
    fn a_lookup_older_than_a_change_is_not_kept() {
        let r = heard();
        let v = r.known().version().unwrap();
        let mut msg = Vec::new();
        encode_change(&mut msg, Kind::Group, true, "n2", "lounge");
        r.apply(&msg);
        r.fill(v, [(Kind::Group, "lounge", holders(&[]))]);
        assert!(r.known().get(Kind::Group, "lounge").is_none());
        let v = r.known().version().unwrap();
        r.fill(v, [(Kind::Group, "lounge", holders(&["n2"]))]);
        assert_eq!(
            names(r.known().get(Kind::Group, "lounge")),
            Some(vec!["n2"])
        );
    }

    #[test]
    fn a_reset_or_a_lost_subscription_forgets_every_route() {
        let r = heard();
        let v = r.known().version().unwrap();
        r.fill(v, [(Kind::User, "alice", holders(&["n1"]))]);
        assert!(r.apply(&encode_reset("n3")));
        assert!(r.known().get(Kind::User, "alice").is_none());

        let v = r.known().version().unwrap();
        r.fill(v, [(Kind::User, "alice", holders(&["n1"]))]);
        r.set_heard(false);
        assert!(r.known().get(Kind::User, "alice").is_none());
        assert_eq!(r.known().version(), None, "nothing is kept while deaf");
        r.set_heard(true);
        assert!(r.known().get(Kind::User, "alice").is_none(), "from nothing");
    }

    #[test]
    fn an_unreadable_message_forgets_every_route() {
        let r = heard();
        let v = r.known().version().unwrap();
        r.fill(v, [(Kind::User, "alice", holders(&["n1"]))]);
        assert!(r.apply(&[wire::PROBE]));
        assert!(
            r.known().get(Kind::User, "alice").is_some(),
            "a probe changes nothing"
        );
        assert!(!r.apply(&[wire::HOLDS, b'u', 0, 5, b'n']));
        assert!(r.known().get(Kind::User, "alice").is_none());
    }
}
