//! PHP `unserialize` and `json_decode` on arbitrary bytes: never panic, and
//! whatever they accept encodes to a canonical form that decodes back to the
//! same canonical form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::protocol::php;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = php::unserialize(data) {
        let bytes = php::to_bytes(&v);
        let again = php::unserialize(&bytes).expect("serialize output unserializes");
        // Compared as bytes: NaN is not equal to itself.
        assert_eq!(php::to_bytes(&again), bytes);
        // A lenient prefix decode agrees with the strict one.
        assert_eq!(
            php::unserialize_prefix(data).map(|(_, end)| end),
            Ok(data.len())
        );
    }
    if let Ok(v) = php::json_decode(data) {
        if let Ok(json) = php::json_encode(&v) {
            let again = php::json_decode(&json).expect("json_encode output decodes");
            assert_eq!(php::json_encode(&again).expect("encodes again"), json);
        }
    }
});
