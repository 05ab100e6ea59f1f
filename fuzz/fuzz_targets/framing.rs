//! The TCP framing decoders on arbitrary input, split at arbitrary points:
//! never panic, never return a message over the limit, never hold more than
//! one message's worth of buffered bytes, and re-encoding what they return
//! decodes to the same messages.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_core::framing::{Decoder, Framing, encode};

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else { return };
    let framing = if ctl & 1 == 0 { Framing::Line } else { Framing::Length };
    let chunk = usize::from(ctl >> 1).max(1);
    let mut d = Decoder::new(framing, MAX);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(m)) => {
                    assert!(m.len() <= MAX);
                    got.push(m);
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        assert!(buf.len() <= MAX + 4 + chunk);
    }
    // What was decoded survives a round trip (line messages never hold `\n`).
    let mut wire = BytesMut::new();
    for m in &got {
        encode(framing, m, &mut wire).expect("decoded messages are encodable");
    }
    let mut d = Decoder::new(framing, MAX);
    for m in &got {
        let again = d.decode(&mut wire).expect("re-decodes").expect("complete");
        // A line decoder strips one trailing `\r`; the original could have had two.
        if framing == Framing::Length || !m.ends_with(b"\r") {
            assert_eq!(&again, m);
        }
    }
});
