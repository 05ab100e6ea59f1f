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

/// Keys made for these tests only (openssl genpkey), never used elsewhere.
const ES256_PRIVATE: &[u8] = include_bytes!("testdata/es256-private.pem");
const ES256_PUBLIC: &[u8] = include_bytes!("testdata/es256-public.pem");
const RS256_PRIVATE: &[u8] = include_bytes!("testdata/rs256-private.pem");
const RS256_PUBLIC: &[u8] = include_bytes!("testdata/rs256-public.pem");

fn sign(alg: Algorithm, key: EncodingKey, c: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(alg), c, &key).unwrap()
}

#[test]
fn rs256_and_es256_tokens_verify_with_their_public_keys_only() {
    let c = claims("carol");
    let es = JwtVerifier::public_key_pem(ES256_PUBLIC).unwrap();
    let rs = JwtVerifier::public_key_pem(RS256_PUBLIC).unwrap();
    let es_token = sign(
        Algorithm::ES256,
        EncodingKey::from_ec_pem(ES256_PRIVATE).unwrap(),
        &c,
    );
    let rs_token = sign(
        Algorithm::RS256,
        EncodingKey::from_rsa_pem(RS256_PRIVATE).unwrap(),
        &c,
    );
    assert_eq!(es.verify(&es_token).unwrap().user.as_str(), "carol");
    assert_eq!(rs.verify(&rs_token).unwrap().user.as_str(), "carol");
    // Each key takes its own algorithm only: no confusing one for another,
    // nor an HS256 token signed with the public key's text as its secret.
    assert!(es.verify(&rs_token).is_err());
    assert!(rs.verify(&es_token).is_err());
    let confused = mint_hs256(&c, RS256_PUBLIC);
    assert_eq!(rs.verify(&confused), Err(AuthError::Algorithm));
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
