use super::*;
use crate::handler::Transport;
use switchboard_core::{ConnId, Frame, NodeId};

fn info(query: &str) -> ConnectInfo {
    let mut i = ConnectInfo::new(
        ConnId::new(NodeId::new("n").unwrap(), 1),
        Transport::WebSocket,
    );
    i.query = query.into();
    i
}

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        groups: vec!["lobby".into()],
        exp: Some(now_secs() + 60),
        ..Claims::default()
    }
}

#[test]
fn a_valid_token_gives_its_identity_and_default_permissions() {
    let mut c = claims("alice");
    c.session.insert("name".into(), "Alice".into());
    c.session.insert("age".into(), serde_json::json!(7));
    let id = JwtVerifier::hs256("k")
        .verify(&mint_hs256(&c, "k"))
        .unwrap();
    assert_eq!(id.user.as_str(), "alice");
    assert_eq!(id.groups, vec![GroupId::from("lobby")]);
    assert_eq!(id.session.get("name").map(String::as_str), Some("Alice"));
    assert_eq!(id.session.get("age").map(String::as_str), Some("7"));
    assert!(id.can.allows(Action::Join, "lobby"));
    assert!(id.can.allows(Action::QueryGroup, "lobby"));
    assert!(!id.can.allows(Action::Join, "other"));
    assert!(!id.can.allows(Action::PushAll, ""));
    assert!(!id.can.allows(Action::PushGroup, "lobby"));
    let a = id.accept();
    assert_eq!(a.user().map(|u| u.as_str()), Some("alice"));
    assert_eq!(a.groups(), &[GroupId::from("lobby")]);
}

#[test]
fn bad_tokens_are_refused_with_a_reason() {
    let v = JwtVerifier::hs256("k");
    assert_eq!(
        v.verify(&mint_hs256(&claims("a"), "other")),
        Err(AuthError::BadSignature)
    );
    let mut old = claims("a");
    old.exp = Some(now_secs() - 60);
    assert_eq!(v.verify(&mint_hs256(&old, "k")), Err(AuthError::Expired));
    let mut early = claims("a");
    early.nbf = Some(now_secs() + 600);
    assert_eq!(
        v.verify(&mint_hs256(&early, "k")),
        Err(AuthError::NotYetValid)
    );
    assert!(matches!(v.verify("nonsense"), Err(AuthError::Invalid(_))));
    let mut bad = claims("a");
    bad.groups = vec!["x\ny".into()];
    assert!(
        matches!(v.verify(&mint_hs256(&bad, "k")), Err(AuthError::Invalid(e)) if e.contains("control"))
    );
    let mut bad = claims("a");
    bad.can = vec!["rule".into()];
    assert!(
        matches!(v.verify(&mint_hs256(&bad, "k")), Err(AuthError::Invalid(e)) if e.contains("can"))
    );
    assert_eq!(
        v.verify_connect(&info("uid=a")).unwrap_err(),
        AuthError::Missing
    );
    assert_eq!(AuthError::Expired.reject().http_status(), 401);
}

#[test]
fn the_token_is_read_from_query_header_or_hello() {
    assert_eq!(token_of(&info("a=1&token=abc")).as_deref(), Some("abc"));
    let mut i = info("");
    assert_eq!(token_of(&i), None);
    i.headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer xyz"),
    );
    assert_eq!(token_of(&i).as_deref(), Some("xyz"));
    let mut t = ConnectInfo::new(ConnId::new(NodeId::new("n").unwrap(), 2), Transport::Tcp);
    t.hello = Some(Frame::text(r#"{"op":"hello","token":"t1"}"#));
    assert_eq!(token_of(&t).as_deref(), Some("t1"));
}

#[test]
fn rs256_and_es256_public_keys_are_read_and_others_refused() {
    assert!(matches!(
        JwtVerifier::public_key_pem(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        ),
        Err(AuthError::Key(_))
    ));
}
