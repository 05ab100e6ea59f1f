//! The register line decoder and message parser on arbitrary input split at
//! arbitrary points: never panic, never return a line over the limit, and
//! every message they accept re-encodes to a line that parses to the same
//! message (connect lines excepted when their values need JSON escaping, which
//! PHP does not do either).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_gateway::protocol::register::{LineDecoder, RegisterMessage};
use tokio_util::codec::Decoder;

const MAX: usize = 128;

fn plain(s: &str) -> bool {
    !s.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl).max(1);
    let mut d = LineDecoder::new(MAX);
    let mut buf = BytesMut::new();
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(line)) => {
                    assert!(line.len() <= MAX && !line.ends_with(b"\r") && !line.contains(&b'\n'));
                    let Ok(msg) = RegisterMessage::decode(&line) else {
                        continue;
                    };
                    let escapable = match &msg {
                        RegisterMessage::GatewayConnect {
                            address,
                            secret_key,
                        } => plain(address) && plain(secret_key),
                        RegisterMessage::WorkerConnect { secret_key } => plain(secret_key),
                        _ => true,
                    };
                    if escapable {
                        let wire = msg.encode();
                        assert!(wire.ends_with(b"\n") && !wire[..wire.len() - 1].contains(&b'\n'));
                        assert_eq!(RegisterMessage::decode(&wire), Ok(msg));
                    }
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
});
