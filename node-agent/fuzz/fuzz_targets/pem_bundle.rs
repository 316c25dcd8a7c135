//! Fuzzes the trust-bundle reader with what the bundle ConfigMap may hold:
//! it may refuse the text but never panic, and what it accepts is the DER
//! of certificates it can read back one by one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(der) = tessera_agent::svid::trust::parse_pem_bundle(text) {
        assert!(!der.is_empty());
        tessera_agent::svid::store::split_der(&der).expect("accepted DER splits into certificates");
    }
});
