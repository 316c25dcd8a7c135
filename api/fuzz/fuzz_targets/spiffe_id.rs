//! SPIFFE IDs and trust domains from arbitrary bytes: parsing never panics,
//! and whatever parses round-trips and splits consistently.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_api::spiffe::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<SpiffeId>() {
        assert_eq!(id.to_string(), text);
        let td = id.trust_domain();
        assert!(id.is_member_of(&td));
        assert_eq!(format!("spiffe://{td}{}", id.path()), text);
        assert_eq!(td.to_string().parse::<TrustDomain>().as_ref(), Ok(&td));
    }
    if let Ok(td) = text.parse::<TrustDomain>() {
        assert_eq!(td.to_string(), text);
        assert_eq!(td.id().trust_domain(), td);
    }
});
