//! Key and channel names. Everything lives under one prefix, so deployments
//! sharing a Redis never see each other.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:nodes` | zset | node → liveness deadline (ms, Redis clock) |
//! | `P:ch:NODE`, `P:bc` | channels | pub/sub mode: envelopes for one node, for all |
//! | `P:routes` | channel | changes of which nodes hold a user or group (see `routes`) |
//! | `P:q:NODE` | stream | queue mode: envelopes for one node |
//! | `P:nc:NODE` | set | connections held by the node |
//! | `P:conn:CONN` | hash | `node`, `user` |
//! | `P:cg:CONN` | set | groups of the connection |
//! | `P:sess:CONN` | hash | the connection's session |
//! | `P:user:USER` | set | connections of the user |
//! | `P:uc:USER` | hash | node → local connections of the user |
//! | `P:group:GROUP` | set | members of the group |
//! | `P:gc:GROUP` | hash | node → local members of the group |
//! | `P:hist:STREAM` | stream | history: recorded pushes of `user:U` / `group:G`, id `<offset>-0`, fields `d` (data), `b` (1 if binary), `t` (append time, ms, Redis clock) |
//! | `P:histm:STREAM` | hash | history: `epoch` (hex), `top` (latest offset handed out) |
//!
//! Each node writes only its own entries; survivors remove a dead node's.
//! History keys are written by whichever node records a push, and expire on
//! their own (see `history`).
//!
//! On a Redis Cluster every script and transaction must touch one hash slot.
//! The directory (the rows above from `P:nodes` to `P:gc:GROUP`, and the routes
//! channel) is read and written together, so its keys share the hash tag of
//! the prefix: `P` becomes `{P}` and the directory lives on one shard. What
//! carries the traffic is spread by node instead: a node's channel is
//! `P:ch:{NODE}` (a sharded channel) and its stream `P:q:{NODE}`; a history
//! stream's keys are tagged by the stream (`P:hist:{STREAM}`).

use std::fmt::Display;

use switchboard_core::NodeId;

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The directory's prefix: `{P}` on a Redis Cluster, `P` otherwise.
    pub(crate) prefix: String,
    /// The prefix as configured.
    base: String,
    cluster: bool,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            base: prefix.to_owned(),
            cluster: false,
        }
    }

    /// Names for a Redis Cluster (see the module docs).
    pub(crate) fn for_cluster(prefix: &str) -> Self {
        Self {
            prefix: format!("{{{prefix}}}"),
            base: prefix.to_owned(),
            cluster: true,
        }
    }

    /// `BASE:kind:{id}` on a cluster (its own slot), `P:kind:id` otherwise.
    fn spread(&self, kind: &str, id: impl Display) -> String {
        if self.cluster {
            format!("{}:{kind}:{{{id}}}", self.base)
        } else {
            self.k(kind, id)
        }
    }
    fn k(&self, kind: &str, id: impl Display) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }
    pub(crate) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    pub(crate) fn broadcast(&self) -> String {
        format!("{}:bc", self.prefix)
    }
    pub(crate) fn routes(&self) -> String {
        format!("{}:routes", self.prefix)
    }
    pub(crate) fn channel(&self, node: impl Display) -> String {
        self.spread("ch", node)
    }
    /// The node whose channel `channel` is, if it is one of this prefix's.
    pub(crate) fn channel_node<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let node = channel.strip_prefix(&self.base)?.strip_prefix(":ch:")?;
        let node = if self.cluster {
            node.strip_prefix('{')?.strip_suffix('}')?
        } else {
            node
        };
        // `P:ch:X:ch:N` is node N's channel under prefix `P:ch:X`, another
        // deployment: node ids have no `:`.
        NodeId::new(node).is_ok().then_some(node)
    }
    /// A `PUBSUB CHANNELS` pattern for every node channel of this prefix
    /// (and of deeper ones, which [`Keys::channel_node`] tells apart).
    pub(crate) fn channel_pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + 5);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern + ":ch:*"
    }
    pub(crate) fn queue(&self, node: impl Display) -> String {
        self.spread("q", node)
    }
    /// `SPUBLISH` on a Redis Cluster, where a sharded channel lives on its
    /// slot's shard alone; `PUBLISH` otherwise.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }
    /// Whether the names are a Redis Cluster's.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }
    pub(crate) fn node_conns(&self, node: impl Display) -> String {
        self.k("nc", node)
    }
    pub(crate) fn conn(&self, conn: impl Display) -> String {
        self.k("conn", conn)
    }
    pub(crate) fn conn_groups(&self, conn: impl Display) -> String {
        self.k("cg", conn)
    }
    pub(crate) fn session(&self, conn: impl Display) -> String {
        self.k("sess", conn)
    }
    pub(crate) fn user(&self, user: impl Display) -> String {
        self.k("user", user)
    }
    pub(crate) fn user_nodes(&self, user: impl Display) -> String {
        self.k("uc", user)
    }
    pub(crate) fn group(&self, group: impl Display) -> String {
        self.k("group", group)
    }
    pub(crate) fn group_nodes(&self, group: impl Display) -> String {
        self.k("gc", group)
    }
    /// The entries of a history stream (`user:U`, `group:G`).
    pub(crate) fn history(&self, stream: &str) -> String {
        self.spread("hist", stream)
    }
    /// The epoch and latest offset of a history stream.
    pub(crate) fn history_meta(&self, stream: &str) -> String {
        self.spread("histm", stream)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn a_channel_names_its_node_only_under_this_prefix() {
        let k = Keys::new("app");
        assert_eq!(k.channel_node(&k.channel("n-1_a")), Some("n-1_a"));
        assert_eq!(k.channel_node("app:bc"), None);
        assert_eq!(k.channel_node("other:ch:n1"), None);
        assert_eq!(k.channel_node("application:ch:n1"), None);
        assert_eq!(
            k.channel_node("app:ch:x:ch:n1"),
            None,
            "node n1 of the deployment with prefix app:ch:x"
        );
    }

    #[test]
    fn on_a_cluster_the_directory_shares_a_slot_and_traffic_spreads() {
        let k = Keys::for_cluster("app");
        assert_eq!(k.nodes(), "{app}:nodes");
        assert_eq!(k.user("u"), "{app}:user:u");
        assert_eq!(k.user_nodes("u"), "{app}:uc:u");
        assert_eq!(k.routes(), "{app}:routes");
        assert_eq!(k.channel("n1"), "app:ch:{n1}");
        assert_eq!(k.channel_node(&k.channel("n1")), Some("n1"));
        assert_eq!(k.channel_node("app:ch:n1"), None);
        assert_eq!(k.queue("n1"), "app:q:{n1}");
        assert_eq!(k.history("user:a"), "app:hist:{user:a}");
        assert_eq!(k.history_meta("user:a"), "app:histm:{user:a}");
        assert!(k.is_cluster() && !Keys::new("app").is_cluster());
    }

    #[test]
    fn the_channel_pattern_matches_the_prefix_literally() {
        assert_eq!(Keys::new("app").channel_pattern(), "app:ch:*");
        assert_eq!(
            Keys::new(r"a*b?[c]\d").channel_pattern(),
            r"a\*b\?\[c\]\\d:ch:*"
        );
    }
}
