//! Fuzzes the auth cache's record decoder with whatever a state directory
//! may hold: the first 12 bytes as the stored key, the rest as the value,
//! once as it is (refused by the MAC check) and once sealed with the key's
//! MAC (so the decoding behind the check is reached too). It may refuse
//! them but never panic; whatever it accepts encodes back to the same
//! bytes (so a record means one thing only).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::datapath::authcache::{
    MacKey, decode_record, encode_record, record_key, seal_record,
};

fuzz_target!(|data: &[u8]| {
    let secret = MacKey::new(&[7; 32]);
    let (key, body) = data.split_at(data.len().min(12));
    let sealed = seal_record(&secret, key, body);
    for value in [body, &sealed[..]] {
        if let Ok(entry) = decode_record(&secret, key, value) {
            assert_eq!(record_key(&entry)[..], key[..], "the key changed");
            let again = encode_record(&secret, &entry).expect("an accepted record encodes");
            assert_eq!(again, value, "re-encoding changed the record");
        }
    }
});
