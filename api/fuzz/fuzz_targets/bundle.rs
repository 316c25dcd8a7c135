//! Fuzzes the SPIFFE bundle decoder with untrusted bytes: it may refuse them
//! but never panic, and whatever it accepts encodes and decodes back to the
//! same bundle. The same bytes go to the X509-SVID leaf reader (a bundle
//! endpoint's certificate is as untrusted as its bundle).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_api::bundle::SpiffeBundle;

fuzz_target!(|data: &[u8]| {
    let _ = tessera_api::svid::leaf(data);
    if let Ok(decoded) = SpiffeBundle::from_json(data) {
        let again = decoded
            .bundle
            .to_json()
            .and_then(|json| SpiffeBundle::from_json(&json))
            .map(|d| d.bundle);
        assert_eq!(again, Ok(decoded.bundle), "re-encoding changed the bundle");
    }
});
