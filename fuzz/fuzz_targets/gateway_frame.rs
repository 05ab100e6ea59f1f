//! The GatewayProtocol frame decoder on arbitrary input split at arbitrary
//! points: never panics, never returns a frame over the limit, never holds
//! more than one incomplete frame, and re-encoding what it returns gives back
//! the bytes it consumed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_gateway::protocol::{Frame, FrameDecoder};
use tokio_util::codec::Decoder;

const MAX: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(ctl).max(1);
    let mut d = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut got: Vec<Frame> = Vec::new();
    let mut consumed = 0;
    'feed: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match d.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.encoded_len() <= MAX);
                    assert_eq!(before - buf.len(), f.encoded_len());
                    consumed += f.encoded_len();
                    got.push(f);
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        assert!(buf.len() < MAX);
    }
    let mut wire = BytesMut::new();
    for f in &got {
        f.encode(&mut wire);
    }
    assert_eq!(&wire[..], &input[..consumed]);
});
