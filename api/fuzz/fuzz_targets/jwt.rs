//! Fuzzes the JWT-SVID verifier and the JWK set parser with untrusted bytes:
//! the first half is read as a JWK set, the rest as a token. Neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_api::jwt::{JwkSet, verify};

fuzz_target!(|data: &[u8]| {
    let (bundle, token) = data.split_at(data.len() / 2);
    let set = JwkSet::from_json(bundle).unwrap_or_default();
    if let Ok(token) = std::str::from_utf8(token) {
        let _ = verify(token, "aud", 1_700_000_000, |_| Some(&set));
    }
});
