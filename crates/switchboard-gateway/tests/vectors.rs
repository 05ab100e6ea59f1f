//! Every recorded vector of `tests/vectors/*.json` (captured from the real PHP
//! register, gateways and workers; format in docs/GATEWAY-PROTOCOL.md §8) decodes to what the
//! capture says and re-encodes to the same bytes.
//!
//! Frames, register lines and query replies are re-encoded from their decoded
//! form and compared byte for byte; so are PHP-serialized bodies and sessions,
//! JSON `ext_data` and authorization bodies, and the WebSocket connect body
//! rebuilt from its request. The only byte-level exceptions are the requests a
//! test client written in Python sent (steps named "raw client"): their JSON has
//! spaces PHP never writes, so for those the decoded values are compared.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use serde_json::Value as J;
use switchboard_gateway::protocol::php::{self, Value};
use switchboard_gateway::protocol::query::{
    self, IdList, ReplyDecoder, Select, SendToAll, SendToGroup,
};
use switchboard_gateway::protocol::register::{LineDecoder, RegisterMessage};
use switchboard_gateway::protocol::{ClientId, Frame, FrameDecoder, auth, cmd, session, websocket};
use tokio_util::codec::Decoder;

const FRAME: &str = "GatewayProtocol frame (28-byte header)";
const LINE: &str = "Text protocol: UTF-8 JSON + \\n";
const REPLY: &str = "u32 BE length + PHP serialize()";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("UTF-8")
}

#[derive(Default, Debug)]
struct Counts {
    vectors: usize,
    frames: usize,
    lines: usize,
    replies: usize,
    embedded_replies: usize,
    serialized_parts: usize,
    json_parts: usize,
    not_from_php: usize,
    not_php_bytes: usize,
    client_ids: usize,
    websocket_bodies: usize,
}

#[test]
fn every_vector_round_trips() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("tests/vectors exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut n = Counts::default();
    for path in &files {
        let doc: J = serde_json::from_slice(&std::fs::read(path).expect("readable")).expect("JSON");
        for v in doc["vectors"].as_array().expect("vectors") {
            let id = v["id"].as_str().expect("id");
            n.vectors += 1;
            check(v, &mut n).unwrap_or_else(|e| panic!("{}: {id}: {e}", path.display()));
            if let Some(reply) = v.get("reply") {
                n.embedded_replies += 1;
                check(reply, &mut n)
                    .unwrap_or_else(|e| panic!("{}: {id} reply: {e}", path.display()));
            }
        }
        for ex in doc["client_id_examples"].as_array().into_iter().flatten() {
            let id: ClientId = ex["client_id"]
                .as_str()
                .expect("client_id")
                .parse()
                .expect("parses");
            assert_eq!(id.to_string(), ex["client_id"]);
            assert_eq!(u64::from(id.ip), ex["parsed"]["local_ip"]);
            assert_eq!(u64::from(id.port), ex["parsed"]["local_port"]);
            assert_eq!(u64::from(id.connection_id), ex["parsed"]["connection_id"]);
            assert_eq!(
                id.address(),
                format!(
                    "{}:{}",
                    ex["lan_ip"].as_str().expect("lan_ip"),
                    ex["lan_port"]
                )
            );
            n.client_ids += 1;
        }
    }
    println!("{} files: {n:#?}", files.len());
    assert_eq!(files.len(), 6, "vector files");
    // docs/GATEWAY-PROTOCOL.md §0: 377 recorded messages; every one must be checked.
    assert_eq!(n.vectors, 377);
    assert_eq!(
        (n.frames, n.lines, n.replies - n.embedded_replies),
        (278, 61, 38)
    );
    assert!(
        n.client_ids > 0 && n.websocket_bodies > 0 && n.serialized_parts > 0 && n.json_parts > 0
    );
    // The Python test client's JSON parts; five of them have spaces PHP never writes.
    assert_eq!((n.not_from_php, n.not_php_bytes), (7, 5));
}

fn check(v: &J, n: &mut Counts) -> Result<(), String> {
    let bytes = unhex(v["hex"].as_str().ok_or("no hex")?);
    if v["len"].as_u64() != Some(bytes.len() as u64) {
        return Err("len differs from the hex".into());
    }
    let from_php = !v["step"]
        .as_str()
        .unwrap_or_default()
        .starts_with("raw client");
    match v["framing"].as_str().ok_or("no framing")? {
        FRAME => check_frame(v, &bytes, from_php, n),
        LINE => check_line(v, &bytes, n),
        REPLY => check_reply(v, &bytes, n),
        other => Err(format!("unknown framing {other}")),
    }
}

fn eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn check_frame(v: &J, bytes: &[u8], from_php: bool, n: &mut Counts) -> Result<(), String> {
    n.frames += 1;
    let d = &v["decoded"];
    // Whole, and one byte at a time.
    let mut buf = BytesMut::from(bytes);
    let frame = FrameDecoder::default()
        .decode(&mut buf)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete")?;
    eq("bytes left", buf.len(), 0)?;
    let mut dec = FrameDecoder::default();
    let mut buf = BytesMut::new();
    let mut bytewise = None;
    for b in bytes {
        buf.extend_from_slice(&[*b]);
        if let Some(f) = dec.decode(&mut buf).map_err(|e| e.to_string())? {
            bytewise = Some(f);
        }
    }
    eq("byte-at-a-time decode", bytewise.as_ref(), Some(&frame))?;

    let h = &frame.header;
    let num = |k: &str| d[k].as_u64().ok_or(format!("no {k}"));
    eq("pack_len", frame.encoded_len() as u64, num("pack_len")?)?;
    eq("cmd", u64::from(h.cmd), num("cmd")?)?;
    eq(
        "cmd_name",
        cmd::name(h.cmd),
        d["cmd_name"].as_str().unwrap_or_default(),
    )?;
    eq("local_ip", u64::from(h.local_ip), num("local_ip")?)?;
    eq(
        "local_ip_str",
        Ipv4Addr::from(h.local_ip).to_string(),
        d["local_ip_str"].as_str().unwrap_or_default().into(),
    )?;
    eq("local_port", u64::from(h.local_port), num("local_port")?)?;
    eq("client_ip", u64::from(h.client_ip), num("client_ip")?)?;
    eq(
        "client_ip_str",
        Ipv4Addr::from(h.client_ip).to_string(),
        d["client_ip_str"].as_str().unwrap_or_default().into(),
    )?;
    eq("client_port", u64::from(h.client_port), num("client_port")?)?;
    eq(
        "connection_id",
        u64::from(h.connection_id),
        num("connection_id")?,
    )?;
    eq("flag", u64::from(h.flag), num("flag")?)?;
    eq(
        "gateway_port",
        u64::from(h.gateway_port),
        num("gateway_port")?,
    )?;
    eq("ext_len", frame.ext_data.len() as u64, num("ext_len")?)?;
    eq("body_len", frame.body.len() as u64, num("body_len")?)?;
    eq(
        "ext_data",
        frame.ext_data.to_vec(),
        unhex(d["ext_data_hex"].as_str().unwrap_or_default()),
    )?;
    eq(
        "body",
        frame.body.to_vec(),
        unhex(d["body_hex"].as_str().unwrap_or_default()),
    )?;
    let bits: Vec<&str> = d["flag_bits"]
        .as_array()
        .ok_or("no flag_bits")?
        .iter()
        .filter_map(J::as_str)
        .collect();
    eq(
        "BODY_IS_SCALAR",
        h.body_is_scalar(),
        bits.contains(&"BODY_IS_SCALAR"),
    )?;
    eq(
        "NOT_CALL_ENCODE",
        h.is_raw(),
        bits.contains(&"NOT_CALL_ENCODE"),
    )?;
    if let Some(id) = d.get("client_id") {
        eq(
            "client_id",
            frame.client_id().to_string(),
            id.as_str().unwrap_or_default().into(),
        )?;
        eq(
            "client_id parse",
            id.as_str().unwrap_or_default().parse::<ClientId>().ok(),
            Some(frame.client_id()),
        )?;
        n.client_ids += 1;
    }
    let mut again = BytesMut::new();
    frame.encode(&mut again);
    eq("re-encoded frame", &again[..], bytes)?;

    check_ext_data(&frame, &d["ext_data"], from_php, n)?;
    check_body(&frame, &d["body"], from_php, n)
}

/// Unserializes, checks against the capture's view, re-serializes byte for byte.
fn check_serialized(what: &str, bytes: &[u8], want: &J, n: &mut Counts) -> Result<Value, String> {
    let value = php::unserialize(bytes).map_err(|e| format!("{what}: {e}"))?;
    eq(what, php::to_json(&value), want.clone())?;
    eq(
        &format!("{what} re-serialized"),
        text(&php::to_bytes(&value)),
        text(bytes),
    )?;
    n.serialized_parts += 1;
    Ok(value)
}

/// Checks a JSON part: its PHP decoding matches the capture, and the typed
/// form re-encodes to the same bytes (or, if not sent by PHP, to the same value).
fn check_json(
    what: &str,
    bytes: &[u8],
    want: &J,
    reencoded: Vec<u8>,
    from_php: bool,
    n: &mut Counts,
) -> Result<(), String> {
    // The capture shows plain JSON (object keys stay strings).
    eq(
        what,
        serde_json::from_slice::<J>(bytes).ok().as_ref(),
        Some(want),
    )?;
    let value = php::json_decode(bytes).map_err(|e| format!("{what}: {e}"))?;
    n.json_parts += 1;
    if from_php {
        eq(&format!("{what} re-encoded"), text(&reencoded), text(bytes))
    } else {
        n.not_from_php += 1;
        if reencoded != bytes {
            n.not_php_bytes += 1;
        }
        let again = php::json_decode(&reencoded).map_err(|e| e.to_string())?;
        eq(&format!("{what} re-encoded value"), again, value)
    }
}

fn check_ext_data(frame: &Frame, part: &J, from_php: bool, n: &mut Counts) -> Result<(), String> {
    let ext = &frame.ext_data[..];
    let value = &part["value"];
    let err = |e: query::ExtError| format!("ext_data: {e}");
    match part["kind"].as_str().ok_or("no ext_data kind")? {
        "empty" => eq("empty ext_data", ext.len(), 0),
        "raw string" => eq(
            "raw ext_data",
            text(ext),
            value.as_str().unwrap_or_default().into(),
        ),
        "php_serialize(session)" => {
            check_serialized("session", ext, value, n)?;
            eq(
                "session decodes",
                session::decode(ext).map(|s| s.is_some()),
                Ok(true),
            )
        }
        "json" => {
            let reencoded = match frame.header.cmd {
                cmd::SEND_TO_UID
                | cmd::BATCH_GET_CLIENT_ID_BY_UID
                | cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP => {
                    IdList::decode(ext).map_err(err)?.encode()
                }
                cmd::SEND_TO_ALL => SendToAll::decode(ext).map_err(err)?.encode(),
                cmd::SEND_TO_GROUP => SendToGroup::decode(ext).map_err(err)?.encode(),
                cmd::SELECT => Select::decode(ext).map_err(err)?.encode(),
                other => return Err(format!("JSON ext_data for {}", cmd::name(other))),
            };
            check_json("ext_data", ext, value, reencoded, from_php, n)
        }
        other => Err(format!("unknown ext_data kind {other}")),
    }
}

fn check_body(frame: &Frame, part: &J, from_php: bool, n: &mut Counts) -> Result<(), String> {
    let body = &frame.body[..];
    let value = &part["value"];
    match part["kind"].as_str().ok_or("no body kind")? {
        "scalar (raw bytes)" => {
            eq("scalar flag", frame.header.body_is_scalar(), true)?;
            eq(
                "scalar body",
                frame.body_value().ok(),
                Some(Value::from(value.as_str().unwrap_or_default())),
            )
        }
        "scalar; JSON text" => {
            let reencoded = match frame.header.cmd {
                cmd::WORKER_CONNECT => auth::WorkerConnect::decode(body)
                    .map_err(|e| e.to_string())?
                    .encode(),
                cmd::GATEWAY_CLIENT_CONNECT => auth::GatewayClientConnect::decode(body)
                    .map_err(|e| e.to_string())?
                    .encode(),
                other => return Err(format!("JSON body for {}", cmd::name(other))),
            };
            check_json("body", body, value, reencoded, from_php, n)
        }
        "php_serialize" => {
            eq("serialized flag", frame.header.body_is_scalar(), false)?;
            let parsed = check_serialized("body", body, value, n)?;
            eq("body_value", frame.body_value().ok(), Some(parsed.clone()))?;
            if frame.header.cmd == cmd::ON_WEBSOCKET_CONNECT {
                eq(
                    "rebuilt websocket body",
                    text(&php::to_bytes(&rebuild_websocket_body(&parsed)?)),
                    text(body),
                )?;
                n.websocket_bodies += 1;
            }
            Ok(())
        }
        other => Err(format!("unknown body kind {other}")),
    }
}

/// Recovers the handshake request from a captured body and builds the body again.
fn rebuild_websocket_body(body: &Value) -> Result<Value, String> {
    let server = body
        .as_array()
        .and_then(|b| b.get_str("server"))
        .and_then(Value::as_array)
        .ok_or("no server array")?;
    let field = |k: &str| {
        server
            .get_str(k)
            .and_then(Value::as_str)
            .ok_or(format!("no {k}"))
    };
    let headers: Vec<(String, Vec<u8>)> = server
        .iter()
        .filter_map(|(k, v)| {
            let name = k.to_string().strip_prefix("HTTP_")?.replace('_', "-");
            Some((name, v.as_bytes()?.to_vec()))
        })
        .collect();
    Ok(websocket::connect_body(
        field("REQUEST_METHOD")?,
        field("REQUEST_URI")?,
        field("SERVER_PROTOCOL")?,
        headers,
    ))
}

fn check_line(v: &J, bytes: &[u8], n: &mut Counts) -> Result<(), String> {
    n.lines += 1;
    eq(
        "text",
        text(bytes),
        v["text"].as_str().unwrap_or_default().into(),
    )?;
    let mut buf = BytesMut::from(bytes);
    let line = LineDecoder::default()
        .decode(&mut buf)
        .map_err(|e| e.to_string())?
        .ok_or("no line")?;
    eq("bytes left", buf.len(), 0)?;
    let msg = RegisterMessage::decode(&line).map_err(|e| e.to_string())?;
    let d = &v["decoded"];
    let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
    let want = match d["event"].as_str().ok_or("no event")? {
        "gateway_connect" => RegisterMessage::GatewayConnect {
            address: s("address"),
            secret_key: s("secret_key"),
        },
        "worker_connect" => RegisterMessage::WorkerConnect {
            secret_key: s("secret_key"),
        },
        "ping" => RegisterMessage::Ping,
        "broadcast_addresses" => RegisterMessage::BroadcastAddresses(
            d["addresses"]
                .as_array()
                .ok_or("no addresses")?
                .iter()
                .filter_map(J::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        other => return Err(format!("unknown event {other}")),
    };
    eq("register message", &msg, &want)?;
    eq("re-encoded line", text(&msg.encode()), text(bytes))
}

fn check_reply(v: &J, bytes: &[u8], n: &mut Counts) -> Result<(), String> {
    n.replies += 1;
    let d = &v["decoded"];
    let mut buf = BytesMut::from(bytes);
    let value = ReplyDecoder::default()
        .decode(&mut buf)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete reply")?;
    eq("bytes left", buf.len(), 0)?;
    eq(
        "reply len",
        (bytes.len() - 4) as u64,
        d["len"].as_u64().unwrap_or_default(),
    )?;
    eq(
        "payload",
        text(&bytes[4..]),
        d["payload_text"].as_str().unwrap_or_default().into(),
    )?;
    check_serialized("reply", &bytes[4..], &d["value"], n)?;
    eq("re-encoded reply", &query::encode_reply(&value)[..], bytes)
}
