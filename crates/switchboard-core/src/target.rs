//! Targets: which connections a push or a close reaches.
//!
//! A target is a union of connections, users, groups or everyone, minus
//! excluded connections and users. A connection reached through several terms
//! gets the frame once.

use serde::{Deserialize, Serialize};

use crate::id::{ConnId, GroupId, NodeId, UserId};

/// A set of recipients, resolved on every node against its local connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    all: bool,
    conns: Vec<ConnId>,
    users: Vec<UserId>,
    groups: Vec<GroupId>,
    except_conns: Vec<ConnId>,
    except_users: Vec<UserId>,
}

impl Target {
    /// Nobody; add terms with the builder methods.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every connection of the cluster.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// One connection.
    pub fn conn(conn: ConnId) -> Self {
        Self::none().and_conn(conn)
    }

    /// Every connection of one user.
    pub fn user(user: impl Into<UserId>) -> Self {
        Self::none().and_user(user)
    }

    /// Every connection of several users.
    pub fn users<U: Into<UserId>>(users: impl IntoIterator<Item = U>) -> Self {
        let mut t = Self::none();
        t.users.extend(users.into_iter().map(Into::into));
        t
    }

    /// Every member of one group.
    pub fn group(group: impl Into<GroupId>) -> Self {
        Self::none().and_group(group)
    }

    /// Also this connection.
    pub fn and_conn(mut self, conn: ConnId) -> Self {
        self.conns.push(conn);
        self
    }

    /// Also these connections.
    pub fn and_conns(mut self, conns: impl IntoIterator<Item = ConnId>) -> Self {
        self.conns.extend(conns);
        self
    }

    /// Also this user's connections.
    pub fn and_user(mut self, user: impl Into<UserId>) -> Self {
        self.users.push(user.into());
        self
    }

    /// Also this group's members.
    pub fn and_group(mut self, group: impl Into<GroupId>) -> Self {
        self.groups.push(group.into());
        self
    }

    /// Also these groups' members.
    pub fn and_groups<G: Into<GroupId>>(mut self, groups: impl IntoIterator<Item = G>) -> Self {
        self.groups.extend(groups.into_iter().map(Into::into));
        self
    }

    /// But not this connection.
    pub fn except_conn(mut self, conn: ConnId) -> Self {
        self.except_conns.push(conn);
        self
    }

    /// But not this user's connections.
    pub fn except_user(mut self, user: impl Into<UserId>) -> Self {
        self.except_users.push(user.into());
        self
    }

    /// But not the connections and users `other` excludes: a part of
    /// `other` keeps its exclusions.
    pub fn excluding_as(mut self, other: &Target) -> Self {
        self.except_conns.extend(other.except_conns.iter().cloned());
        self.except_users.extend(other.except_users.iter().cloned());
        self
    }

    /// Whether every connection is included (before exclusions).
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Included connections.
    pub fn conns(&self) -> &[ConnId] {
        &self.conns
    }

    /// Included users.
    pub fn included_users(&self) -> &[UserId] {
        &self.users
    }

    /// Included groups.
    pub fn included_groups(&self) -> &[GroupId] {
        &self.groups
    }

    /// Excluded connections.
    pub fn excluded_conns(&self) -> &[ConnId] {
        &self.except_conns
    }

    /// Excluded users.
    pub fn excluded_users(&self) -> &[UserId] {
        &self.except_users
    }

    /// Whether the target names no recipient at all.
    pub fn is_empty(&self) -> bool {
        !self.all && self.conns.is_empty() && self.users.is_empty() && self.groups.is_empty()
    }

    /// Whether resolving the target can reach one connection twice, so that the
    /// resolver must deduplicate. A single term never can.
    pub fn may_overlap(&self) -> bool {
        let terms = usize::from(self.all) + self.conns.len() + self.users.len() + self.groups.len();
        terms > 1
    }

    /// Whether every recipient the target can name is on `node`: only
    /// connections, all of that node. Checked on every push, so it allocates
    /// nothing.
    pub fn only_on(&self, node: &NodeId) -> bool {
        !self.all
            && self.users.is_empty()
            && self.groups.is_empty()
            && self.conns.iter().all(|c| c.node() == node)
    }

    /// When the target names only connections, the nodes that hold them; `None`
    /// when users, groups or everyone are included, since any node may hold those.
    pub fn conn_nodes(&self) -> Option<Vec<&NodeId>> {
        if self.all || !self.users.is_empty() || !self.groups.is_empty() {
            return None;
        }
        let mut nodes: Vec<&NodeId> = self.conns.iter().map(ConnId::node).collect();
        nodes.sort();
        nodes.dedup();
        Some(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: &str, s: u64) -> ConnId {
        ConnId::new(NodeId::new(n).unwrap(), s)
    }

    #[test]
    fn overlap_and_nodes() {
        assert!(!Target::all().may_overlap());
        assert!(!Target::group("g").except_user("u").may_overlap());
        assert!(Target::group("g").and_user("u").may_overlap());
        assert!(Target::users(["a", "b"]).may_overlap());
        assert!(Target::none().is_empty());
        let t = Target::conn(c("b", 1))
            .and_conn(c("a", 2))
            .and_conn(c("b", 3));
        let nodes: Vec<&str> = t.conn_nodes().unwrap().iter().map(|n| n.as_str()).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(Target::user("u").conn_nodes().is_none());
        let b = NodeId::new("b").unwrap();
        assert!(Target::conn(c("b", 1)).and_conn(c("b", 2)).only_on(&b));
        assert!(!t.only_on(&b), "a connection on another node");
        assert!(!Target::all().only_on(&b));
        assert!(!Target::conn(c("b", 1)).and_user("u").only_on(&b));
    }

    #[test]
    fn builders_put_each_term_where_it_is_read() {
        let t = Target::none()
            .and_conns([c("a", 1), c("b", 2)])
            .and_groups(["g1", "g2"])
            .and_user("u")
            .except_conn(c("a", 3))
            .except_user("x");
        assert!(!t.is_all() && Target::all().is_all());
        assert_eq!(t.conns(), [c("a", 1), c("b", 2)]);
        assert_eq!(t.included_users(), [UserId::from("u")]);
        assert_eq!(
            t.included_groups(),
            [GroupId::from("g1"), GroupId::from("g2")]
        );
        assert_eq!(t.excluded_conns(), [c("a", 3)]);
        assert_eq!(t.excluded_users(), [UserId::from("x")]);
        assert_ne!(Target::none(), t);
    }

    #[test]
    fn a_target_is_empty_only_when_it_names_nobody() {
        assert!(Target::none().is_empty());
        assert!(
            Target::none().except_user("x").is_empty(),
            "exclusions alone name nobody"
        );
        for t in [
            Target::all(),
            Target::conn(c("a", 1)),
            Target::user("u"),
            Target::group("g"),
        ] {
            assert!(!t.is_empty(), "{t:?}");
        }
        // Two terms of different kinds overlap; so does everyone plus a term.
        assert!(Target::all().and_user("u").may_overlap());
        assert!(Target::conn(c("a", 1)).and_group("g").may_overlap());
        assert!(!Target::conn(c("a", 1)).may_overlap());
    }
}
