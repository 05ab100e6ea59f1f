//! Cluster-wide questions and how the answers of several nodes combine.
//!
//! Every node answers a [`Query`] about its own connections with a
//! [`LocalAnswer`]; [`Merge`] folds the answers of every live node into one
//! value. An [`Answer`] also lists the nodes that did not answer, so a caller can
//! tell a complete answer from a partial one.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::id::{ConnId, GroupId, NodeId, UserId};

/// A question about the cluster's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Query {
    /// Does this connection exist?
    ConnExists(ConnId),
    /// Does this user hold at least one connection?
    UserOnline(UserId),
    /// The connections of a user.
    UserConns(UserId),
    /// The user a connection is bound to.
    ConnUser(ConnId),
    /// The members of a group.
    GroupMembers(GroupId),
    /// How many connections are in a group.
    GroupCount(GroupId),
    /// How many connections, users and non-empty groups there are.
    Totals,
}

impl Query {
    /// The one node that can answer, when the question is about one connection.
    pub fn owner(&self) -> Option<&NodeId> {
        match self {
            Query::ConnExists(c) | Query::ConnUser(c) => Some(c.node()),
            _ => None,
        }
    }
}

/// Connection, user and group figures of one node. Users and groups are listed,
/// not counted, because one user or group can span nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalTotals {
    /// Connections held by the node.
    pub conns: u64,
    /// Users with a connection on the node.
    pub users: Vec<UserId>,
    /// Groups with a member on the node.
    pub groups: Vec<GroupId>,
}

/// One node's answer to a [`Query`] about its own connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LocalAnswer {
    /// For `ConnExists` and `UserOnline`.
    Bool(bool),
    /// For `UserConns` and `GroupMembers`.
    Conns(Vec<ConnId>),
    /// For `ConnUser`.
    User(Option<UserId>),
    /// For `GroupCount`.
    Count(u64),
    /// For `Totals`.
    Totals(LocalTotals),
}

/// Cluster totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Connections in the cluster.
    pub conns: u64,
    /// Distinct users with at least one connection.
    pub users: u64,
    /// Distinct groups with at least one member.
    pub groups: u64,
}

/// A cluster-wide answer, with the nodes that did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    /// The value combined from the nodes that answered.
    pub value: T,
    /// Nodes that were asked and did not answer: empty when complete.
    pub missing: Vec<NodeId>,
}

impl<T> Answer<T> {
    /// A complete answer.
    pub fn complete(value: T) -> Self {
        Self {
            value,
            missing: Vec::new(),
        }
    }

    /// Whether every node that could hold a relevant connection answered.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// Maps the value, keeping completeness.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        Answer {
            value: f(self.value),
            missing: self.missing,
        }
    }
}

/// The answer a node sent did not fit the question (a peer bug or version skew).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("answer {got:?} does not fit query {query:?}")]
pub struct Mismatch {
    query: &'static str,
    got: &'static str,
}

/// Folds per-node answers to one query.
#[derive(Debug)]
pub struct Merge {
    query: Query,
    bool_: bool,
    conns: Vec<ConnId>,
    user: Option<UserId>,
    count: u64,
    users: BTreeSet<UserId>,
    groups: BTreeSet<GroupId>,
}

impl Merge {
    /// Starts folding answers to `query`.
    pub fn new(query: Query) -> Self {
        Self {
            query,
            bool_: false,
            conns: Vec::new(),
            user: None,
            count: 0,
            users: BTreeSet::new(),
            groups: BTreeSet::new(),
        }
    }

    /// Whether the answers so far settle the question, so the rest need not be
    /// awaited (a user found online is online, whoever else is slow).
    pub fn settled(&self) -> bool {
        match self.query {
            Query::ConnExists(_) | Query::UserOnline(_) => self.bool_,
            Query::ConnUser(_) => self.user.is_some(),
            _ => false,
        }
    }

    /// Adds one node's answer.
    pub fn add(&mut self, answer: LocalAnswer) -> Result<(), Mismatch> {
        match (&self.query, answer) {
            (Query::ConnExists(_) | Query::UserOnline(_), LocalAnswer::Bool(b)) => self.bool_ |= b,
            (Query::UserConns(_) | Query::GroupMembers(_), LocalAnswer::Conns(c)) => {
                self.conns.extend(c)
            }
            (Query::ConnUser(_), LocalAnswer::User(u)) => {
                if u.is_some() {
                    self.user = u;
                }
            }
            (Query::GroupCount(_), LocalAnswer::Count(n)) => self.count += n,
            (Query::Totals, LocalAnswer::Totals(t)) => {
                self.count += t.conns;
                self.users.extend(t.users);
                self.groups.extend(t.groups);
            }
            (q, a) => {
                return Err(Mismatch {
                    query: query_name(q),
                    got: answer_name(&a),
                });
            }
        }
        Ok(())
    }

    /// The combined boolean (`ConnExists`, `UserOnline`).
    pub fn bool_value(&self) -> bool {
        self.bool_
    }

    /// The combined connection list, sorted (`UserConns`, `GroupMembers`).
    pub fn conns_value(mut self) -> Vec<ConnId> {
        self.conns.sort();
        self.conns.dedup();
        self.conns
    }

    /// The user found (`ConnUser`).
    pub fn user_value(self) -> Option<UserId> {
        self.user
    }

    /// The summed count (`GroupCount`).
    pub fn count_value(&self) -> u64 {
        self.count
    }

    /// The totals (`Totals`).
    pub fn totals_value(&self) -> Totals {
        Totals {
            conns: self.count,
            users: self.users.len() as u64,
            groups: self.groups.len() as u64,
        }
    }
}

fn query_name(q: &Query) -> &'static str {
    match q {
        Query::ConnExists(_) => "ConnExists",
        Query::UserOnline(_) => "UserOnline",
        Query::UserConns(_) => "UserConns",
        Query::ConnUser(_) => "ConnUser",
        Query::GroupMembers(_) => "GroupMembers",
        Query::GroupCount(_) => "GroupCount",
        Query::Totals => "Totals",
    }
}

fn answer_name(a: &LocalAnswer) -> &'static str {
    match a {
        LocalAnswer::Bool(_) => "Bool",
        LocalAnswer::Conns(_) => "Conns",
        LocalAnswer::User(_) => "User",
        LocalAnswer::Count(_) => "Count",
        LocalAnswer::Totals(_) => "Totals",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_distinct_users() {
        let mut m = Merge::new(Query::Totals);
        m.add(LocalAnswer::Totals(LocalTotals {
            conns: 2,
            users: vec!["a".into(), "b".into()],
            groups: vec!["g".into()],
        }))
        .unwrap();
        m.add(LocalAnswer::Totals(LocalTotals {
            conns: 1,
            users: vec!["a".into()],
            groups: vec!["g".into(), "h".into()],
        }))
        .unwrap();
        assert_eq!(
            m.totals_value(),
            Totals {
                conns: 3,
                users: 2,
                groups: 2
            }
        );
    }

    #[test]
    fn online_settles_early_and_mismatch_is_an_error() {
        let mut m = Merge::new(Query::UserOnline("u".into()));
        assert!(!m.settled());
        m.add(LocalAnswer::Bool(false)).unwrap();
        assert!(!m.settled());
        m.add(LocalAnswer::Bool(true)).unwrap();
        assert!(m.settled() && m.bool_value());
        assert!(m.add(LocalAnswer::Count(1)).is_err());
    }

    fn conn(n: &str, s: u64) -> ConnId {
        ConnId::new(NodeId::new(n).unwrap(), s)
    }

    #[test]
    fn only_questions_about_one_connection_have_an_owner() {
        let c = conn("a", 1);
        assert_eq!(Query::ConnExists(c.clone()).owner(), Some(c.node()));
        assert_eq!(Query::ConnUser(c.clone()).owner(), Some(c.node()));
        assert_eq!(Query::UserOnline("u".into()).owner(), None);
        assert_eq!(Query::Totals.owner(), None);
    }

    #[test]
    fn an_answer_is_complete_when_nobody_is_missing() {
        let a = Answer::complete(1);
        assert!(a.is_complete());
        let b = Answer {
            value: 1,
            missing: vec![NodeId::new("x").unwrap()],
        };
        assert!(!b.clone().map(|v| v + 1).is_complete());
        assert_eq!(b.map(|v| v + 1).value, 2);
    }

    #[test]
    fn answers_fold_per_kind() {
        let mut m = Merge::new(Query::GroupCount("g".into()));
        m.add(LocalAnswer::Count(2)).unwrap();
        m.add(LocalAnswer::Count(3)).unwrap();
        assert_eq!(m.count_value(), 5);

        let mut m = Merge::new(Query::GroupMembers("g".into()));
        m.add(LocalAnswer::Conns(vec![conn("b", 2), conn("a", 1)]))
            .unwrap();
        m.add(LocalAnswer::Conns(vec![conn("a", 1)])).unwrap();
        assert_eq!(m.conns_value(), [conn("a", 1), conn("b", 2)]);

        let mut m = Merge::new(Query::ConnUser(conn("a", 1)));
        m.add(LocalAnswer::User(None)).unwrap();
        assert!(!m.settled(), "nobody said whose it is yet");
        m.add(LocalAnswer::User(Some("u".into()))).unwrap();
        assert!(m.settled());
        m.add(LocalAnswer::User(None)).unwrap();
        assert_eq!(
            m.user_value(),
            Some("u".into()),
            "a later None keeps the user"
        );

        let mut m = Merge::new(Query::ConnExists(conn("a", 1)));
        m.add(LocalAnswer::Bool(false)).unwrap();
        assert!(!m.bool_value() && !m.settled());
        assert!(!Merge::new(Query::Totals).settled());
    }

    #[test]
    fn a_mismatch_names_the_question_and_the_answer() {
        let mut m = Merge::new(Query::GroupCount("g".into()));
        let e = m.add(LocalAnswer::Bool(true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"answer "Bool" does not fit query "GroupCount""#
        );
        let mut m = Merge::new(Query::UserConns("u".into()));
        let e = m
            .add(LocalAnswer::Totals(LocalTotals::default()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"answer "Totals" does not fit query "UserConns""#
        );
    }
}
