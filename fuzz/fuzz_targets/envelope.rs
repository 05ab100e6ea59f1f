//! The cluster envelope decoder on arbitrary bytes: never panics, and whatever
//! it accepts re-encodes to bytes that decode to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_core::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        let again = Envelope::decode(&env.encode()).expect("re-encoded envelope decodes");
        assert_eq!(again, env);
    }
});
