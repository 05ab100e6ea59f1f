//! The Hub API across two nodes, for any backplane: membership, sessions,
//! closes and queries made on one node about a connection of another.

use anyhow::Result;
use switchboard::{ConnId, NodeId, OpError, Target};
use switchboard_server::node::Running;

use crate::Client;
use crate::client::Event;
use crate::conformance::settle;

/// Node `b` acts on and asks about a connection of node `a`; both nodes
/// serve the reference application.
pub async fn across_nodes(a: &Running, b: &Running) -> Result<()> {
    let on_a = Client::ws(a.ws.unwrap(), "alice", None).await?;
    let sender = Client::tcp(b.tcp.unwrap(), "sender", None).await?;
    let conn: ConnId = on_a.conn.parse()?;
    let hub = &b.hub; // node b acts on a connection of node a

    hub.join(&conn, "room").await?;
    assert_eq!(hub.group_count("room").await.value, 1);
    assert_eq!(hub.group_members("room").await.value, vec![conn.clone()]);
    hub.bind(&conn, "alice2").await?;
    assert!(
        !hub.is_online("alice").await.value,
        "re-binding moves the connection"
    );
    assert!(hub.is_online("alice2").await.value);
    assert_eq!(
        hub.conn_user(&conn)
            .await
            .value
            .as_ref()
            .map(|u| u.as_str()),
        Some("alice2")
    );
    assert_eq!(hub.user_conns("alice2").await.value, vec![conn.clone()]);
    let t = hub.totals().await;
    assert!(t.is_complete());
    assert_eq!((t.value.conns, t.value.users, t.value.groups), (2, 2, 1));

    // Pushes by the new identity reach it; by the old one do not.
    let mut cl = vec![sender, on_a];
    cl[0]
        .send(serde_json::json!({"op":"to_user","uid":"alice","data":"old"}))
        .await?;
    cl[0]
        .send(serde_json::json!({"op":"to_user","uid":"alice2","data":"new"}))
        .await?;
    cl[0]
        .send(serde_json::json!({"op":"to_group","group":"room","data":"room"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["new", "room"]]).await?;

    hub.set_session(&conn, "lang", Some("fr".into())).await?;
    hub.update_session(
        &conn,
        vec![
            ("a".into(), Some("1".into())),
            ("b".into(), Some("2".into())),
        ],
    )
    .await?;
    hub.set_session(&conn, "a", None).await?;
    let s = a.hub.session(&conn).await?;
    assert_eq!(
        s.into_iter().collect::<Vec<_>>(),
        [("b".into(), "2".into()), ("lang".into(), "fr".into())]
    );

    hub.leave(&conn, "room").await?;
    hub.unbind(&conn).await?;
    assert_eq!(hub.group_count("room").await.value, 0);
    assert!(!hub.is_online("alice2").await.value);

    // A connection that does not exist, on a live node and on an unknown node.
    let gone = ConnId::new(NodeId::new("a")?, conn.seq() + 1000);
    assert_eq!(
        hub.join(&gone, "x").await,
        Err(OpError::NoSuchConn(gone.clone()))
    );
    assert!(!hub.conn_exists(&gone).await.value);
    assert!(hub.conn_exists(&conn).await.value);
    let nowhere = ConnId::new(NodeId::new("nowhere")?, 1);
    // Unreachable at once where the backplane knows the node is not there,
    // after the query timeout where it cannot tell.
    let r = hub.session(&nowhere).await;
    assert!(
        matches!(&r, Err(OpError::Unreachable(n) | OpError::Timeout(n)) if n.as_str() == "nowhere"),
        "{r:?}"
    );
    let ex = hub.conn_exists(&nowhere).await;
    assert!(!ex.value && ex.is_complete());

    // Closing a user from another node closes its connections there.
    hub.bind(&conn, "alice").await?;
    let report = hub.close(&Target::user("alice"), "bye");
    assert_eq!(report.remote.sent, 1);
    let mut on_a = cl.pop().unwrap();
    assert_eq!(
        on_a.next_event(crate::STEP).await?,
        Event::Closed(Some(1000))
    );
    Ok(())
}
