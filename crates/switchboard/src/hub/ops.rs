//! Operations on connections of any node, and cluster-wide queries.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use switchboard_core::backplane::QueryOutcome;
use switchboard_core::query::Merge;
use switchboard_core::{
    Answer, Body, ConnId, Dest, Envelope, GroupId, NodeId, Op, OpResult, Query, Session, Totals,
    UserId,
};
use tokio::sync::mpsc;

use super::Hub;
use crate::config::check_name;
use crate::error::OpError;
use crate::registry::Joined;

/// Removes a pending request when its caller stops waiting, however it stops.
struct PendingGuard<'a> {
    hub: &'a Hub,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut p = self
            .hub
            .inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        p.remove(&self.id);
    }
}

impl Hub {
    /// Binds a connection to a user; a connection bound to another user moves.
    pub async fn bind(&self, conn: &ConnId, user: impl Into<UserId>) -> Result<(), OpError> {
        let user = user.into();
        check_name("uid", user.as_str()).map_err(OpError::Refused)?;
        let op = Op::Bind {
            conn: conn.clone(),
            user,
        };
        self.op(conn, op).await.map(drop)
    }

    /// Unbinds a connection from its user.
    pub async fn unbind(&self, conn: &ConnId) -> Result<(), OpError> {
        self.op(conn, Op::Unbind { conn: conn.clone() })
            .await
            .map(drop)
    }

    /// Adds a connection to a group.
    pub async fn join(&self, conn: &ConnId, group: impl Into<GroupId>) -> Result<(), OpError> {
        let group = group.into();
        check_name("group", group.as_str()).map_err(OpError::Refused)?;
        let op = Op::Join {
            conn: conn.clone(),
            group,
        };
        self.op(conn, op).await.map(drop)
    }

    /// Removes a connection from a group.
    pub async fn leave(&self, conn: &ConnId, group: impl Into<GroupId>) -> Result<(), OpError> {
        let op = Op::Leave {
            conn: conn.clone(),
            group: group.into(),
        };
        self.op(conn, op).await.map(drop)
    }

    /// A connection's session.
    pub async fn session(&self, conn: &ConnId) -> Result<Session, OpError> {
        match self.op(conn, Op::SessionGet { conn: conn.clone() }).await? {
            OpResult::Session(s) => Ok(s),
            other => Err(unexpected(conn.node(), &other)),
        }
    }

    /// Sets one key of a connection's session (`None` removes it).
    pub async fn set_session(
        &self,
        conn: &ConnId,
        key: impl Into<String>,
        value: Option<String>,
    ) -> Result<(), OpError> {
        self.update_session(conn, vec![(key.into(), value)]).await
    }

    /// Sets or removes several keys of a connection's session at once.
    pub async fn update_session(
        &self,
        conn: &ConnId,
        changes: Vec<(String, Option<String>)>,
    ) -> Result<(), OpError> {
        for (key, _) in &changes {
            check_name("session key", key).map_err(OpError::Refused)?;
        }
        let op = Op::SessionUpdate {
            conn: conn.clone(),
            changes,
        };
        self.op(conn, op).await.map(drop)
    }

    /// Replaces a connection's whole session.
    pub async fn replace_session(&self, conn: &ConnId, session: Session) -> Result<(), OpError> {
        let op = Op::SessionReplace {
            conn: conn.clone(),
            session,
        };
        self.op(conn, op).await.map(drop)
    }

    /// Does this connection exist, on any node?
    pub async fn conn_exists(&self, conn: &ConnId) -> Answer<bool> {
        self.ask(Query::ConnExists(conn.clone()))
            .await
            .map(|m| m.bool_value())
    }

    /// Does this user hold a connection, on any node?
    pub async fn is_online(&self, user: impl Into<UserId>) -> Answer<bool> {
        self.ask(Query::UserOnline(user.into()))
            .await
            .map(|m| m.bool_value())
    }

    /// The connections of a user, on every node.
    pub async fn user_conns(&self, user: impl Into<UserId>) -> Answer<Vec<ConnId>> {
        self.ask(Query::UserConns(user.into()))
            .await
            .map(Merge::conns_value)
    }

    /// The user a connection is bound to.
    pub async fn conn_user(&self, conn: &ConnId) -> Answer<Option<UserId>> {
        self.ask(Query::ConnUser(conn.clone()))
            .await
            .map(Merge::user_value)
    }

    /// The members of a group, on every node.
    pub async fn group_members(&self, group: impl Into<GroupId>) -> Answer<Vec<ConnId>> {
        self.ask(Query::GroupMembers(group.into()))
            .await
            .map(Merge::conns_value)
    }

    /// How many connections a group has, on every node.
    pub async fn group_count(&self, group: impl Into<GroupId>) -> Answer<u64> {
        self.ask(Query::GroupCount(group.into()))
            .await
            .map(|m| m.count_value())
    }

    /// Connections, distinct users and non-empty groups of the whole cluster.
    pub async fn totals(&self) -> Answer<Totals> {
        self.ask(Query::Totals).await.map(|m| m.totals_value())
    }

    /// Runs `op` on the node that holds `conn`.
    async fn op(&self, conn: &ConnId, op: Op) -> Result<OpResult, OpError> {
        let result = if conn.node() == &self.inner.node {
            let mutates = mutates(&op);
            let result = self.execute(op);
            if mutates {
                // Return once the change is visible cluster-wide.
                self.settle().await;
            }
            result
        } else {
            self.rpc(conn.node(), op).await?
        };
        match result {
            OpResult::NoSuchConn => Err(OpError::NoSuchConn(conn.clone())),
            OpResult::Refused(reason) => Err(OpError::Refused(reason)),
            OpResult::Failed(reason) => Err(OpError::Remote {
                node: conn.node().clone(),
                reason,
            }),
            other => Ok(other),
        }
    }

    /// Runs an operation against this node's registry.
    pub(crate) fn execute(&self, op: Op) -> OpResult {
        let bp = &*self.inner.backplane;
        let done = |ok: bool| {
            if ok {
                OpResult::Done
            } else {
                OpResult::NoSuchConn
            }
        };
        let seq_of = |c: &ConnId| (c.node() == &self.inner.node).then_some(c.seq());
        match op {
            Op::Query(q) => OpResult::Answer(self.registry().answer(&q)),
            Op::Bind { conn, user } => {
                done(seq_of(&conn).is_some_and(|s| self.registry_mut().bind(s, user, bp)))
            }
            Op::Unbind { conn } => {
                done(seq_of(&conn).is_some_and(|s| self.registry_mut().unbind(s, bp)))
            }
            Op::Join { conn, group } => {
                let Some(s) = seq_of(&conn) else {
                    return OpResult::NoSuchConn;
                };
                match self.registry_mut().join(s, group, bp) {
                    Joined::Yes => OpResult::Done,
                    Joined::NoConn => OpResult::NoSuchConn,
                    Joined::Full => {
                        self.inner
                            .counters
                            .ops_refused
                            .fetch_add(1, Ordering::Relaxed);
                        OpResult::Refused(format!(
                            "too many groups: a connection may be in at most {}",
                            self.inner.limits.max_groups_per_conn
                        ))
                    }
                }
            }
            Op::Leave { conn, group } => {
                done(seq_of(&conn).is_some_and(|s| self.registry_mut().leave(s, &group, bp)))
            }
            Op::SessionGet { conn } => {
                match seq_of(&conn).and_then(|s| self.registry().session(s).cloned()) {
                    Some(s) => OpResult::Session(s),
                    None => OpResult::NoSuchConn,
                }
            }
            Op::SessionUpdate { conn, changes } => done(seq_of(&conn).is_some_and(|s| {
                self.registry_mut().update_session(s, bp, |session| {
                    for (k, v) in changes {
                        match v {
                            Some(v) => session.insert(k, v),
                            None => session.remove(&k),
                        };
                    }
                })
            })),
            Op::SessionReplace { conn, session } => done(seq_of(&conn).is_some_and(|s| {
                self.registry_mut()
                    .update_session(s, bp, |old| *old = session)
            })),
            _ => OpResult::Failed("unsupported operation".into()),
        }
    }

    /// Registers a pending request that `expect` nodes will answer.
    fn pending(
        &self,
        expect: usize,
    ) -> (u64, mpsc::Receiver<(NodeId, OpResult)>, PendingGuard<'_>) {
        let id = self.inner.next_envelope.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(expect.max(1));
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        (id, rx, PendingGuard { hub: self, id })
    }

    fn request(&self, id: u64, op: Op) -> bytes::Bytes {
        Envelope {
            origin: self.inner.node.clone(),
            id,
            body: Body::Request { op },
        }
        .encode()
    }

    /// Sends `op` to one node and waits for its reply.
    async fn rpc(&self, node: &NodeId, op: Op) -> Result<OpResult, OpError> {
        let (id, mut rx, _guard) = self.pending(1);
        let handoff = self
            .inner
            .backplane
            .publish(Dest::Node(node), self.request(id, op));
        if handoff.sent == 0 {
            return Err(OpError::Unreachable(node.clone()));
        }
        match tokio::time::timeout(self.inner.query_timeout, rx.recv()).await {
            Ok(Some((_, result))) => Ok(result),
            _ => Err(OpError::Timeout(node.clone())),
        }
    }

    /// Answers a query for the whole cluster.
    async fn ask(&self, query: Query) -> Answer<Merge> {
        let timeout = self.inner.query_timeout;
        let mut merge = Merge::new(query.clone());
        let add = |merge: &mut Merge, node: &NodeId, result: OpResult| match result {
            OpResult::Answer(a) => merge.add(a).is_ok(),
            other => {
                tracing::warn!(%node, ?other, "unexpected reply to a query");
                false
            }
        };

        if let Some(QueryOutcome::Answer(a)) = self.inner.backplane.query(&query, timeout).await
            && merge.add(a).is_ok()
        {
            return Answer::complete(merge);
        }

        if let Some(owner) = query.owner().cloned() {
            if owner == self.inner.node {
                let _ = merge.add(self.registry().answer(&query));
                return Answer::complete(merge);
            }
            if !self.inner.backplane.peers().contains(&owner) {
                // The node is not part of the cluster, so it holds no connection.
                return Answer::complete(merge);
            }
            let answered = match self.rpc(&owner, Op::Query(query)).await {
                Ok(r) => add(&mut merge, &owner, r),
                Err(_) => false,
            };
            return Answer {
                value: merge,
                missing: if answered { Vec::new() } else { vec![owner] },
            };
        }

        let _ = merge.add(self.registry().answer(&query));
        let peers = self.inner.backplane.peers();
        if merge.settled() || peers.is_empty() {
            return Answer::complete(merge);
        }
        let (id, mut rx, _guard) = self.pending(peers.len());
        self.inner
            .backplane
            .publish(Dest::All, self.request(id, Op::Query(query)));
        let mut waiting: HashSet<NodeId> = peers.into_iter().collect();
        // Nodes whose reply could not be folded in: they did not answer the
        // question, so the answer must not pass for complete.
        let mut unanswered = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((node, result))) => {
                    if !waiting.remove(&node) {
                        continue;
                    }
                    if !add(&mut merge, &node, result) {
                        unanswered.push(node);
                    } else if merge.settled() {
                        // A definitive answer (found online) needs nobody else.
                        return Answer::complete(merge);
                    }
                }
                _ => break,
            }
        }
        let mut missing: Vec<NodeId> = waiting.into_iter().chain(unanswered).collect();
        missing.sort();
        Answer {
            value: merge,
            missing,
        }
    }
}

/// Whether an operation changes membership or sessions, so that it is done
/// only once the backplane has settled the change.
pub(super) fn mutates(op: &Op) -> bool {
    !matches!(op, Op::SessionGet { .. } | Op::Query(_))
}

fn unexpected(node: &NodeId, r: &OpResult) -> OpError {
    OpError::Remote {
        node: node.clone(),
        reason: format!("unexpected reply {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use switchboard_core::backplane::{JoinContext, NoLocalState};
    use switchboard_core::{Backplane, MemoryBus};

    use super::*;

    /// Every question registers a pending request; however it ends (here: a
    /// peer that never answers), nothing is left behind for the next.
    #[tokio::test]
    async fn a_question_leaves_nothing_pending() {
        let bus = MemoryBus::new();
        let hub = Hub::builder()
            .backplane(bus.backplane())
            .query_timeout(Duration::from_millis(50))
            .start()
            .await
            .unwrap();
        let deaf = bus.backplane();
        let (tx, _rx) = mpsc::channel(16);
        let (_handled, handled) = tokio::sync::watch::channel(0);
        deaf.join(JoinContext::new(
            NodeId::new("deaf").unwrap(),
            tx,
            handled,
            Arc::new(NoLocalState),
        ))
        .await
        .unwrap();
        let count = hub.group_count("g").await;
        assert_eq!(count.missing, [NodeId::new("deaf").unwrap()]);
        let on_deaf = ConnId::new(NodeId::new("deaf").unwrap(), 1);
        assert!(hub.join(&on_deaf, "g").await.is_err());
        let pending = hub.inner.pending.lock().unwrap().len();
        assert_eq!(pending, 0, "requests left pending");
        hub.shutdown().await;
    }
}
