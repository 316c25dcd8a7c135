//! Fuzzes the SPIFFE bundle decoder with untrusted bytes: it may refuse them
//! but never panic, and whatever it accepts encodes and decodes back to the
//! same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_api::bundle::SpiffeBundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = SpiffeBundle::from_json(data) {
        let again = decoded
            .bundle
            .to_json()
            .and_then(|json| SpiffeBundle::from_json(&json))
            .map(|d| d.bundle);
        assert_eq!(again, Ok(decoded.bundle), "re-encoding changed the bundle");
    }
});
