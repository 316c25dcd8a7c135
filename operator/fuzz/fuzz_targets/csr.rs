//! Fuzzes the signer's CSR reader with what an agent may send: it may refuse
//! the bytes with an error but never panic, and a leaf it signs names
//! exactly the SPIFFE ID the signer chose, whatever the CSR asked for.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_operator::ca::authority::{TrustDomainCa, new_root};
use tessera_operator::ca::signer::sign_x509_svid;

static CA: LazyLock<TrustDomainCa> = LazyLock::new(|| {
    let now = time::OffsetDateTime::now_utc();
    let root = new_root(&"fuzz.test".parse().unwrap(), now, Duration::from_secs(3600)).unwrap();
    TrustDomainCa::in_memory(vec![root])
});

fuzz_target!(|data: &[u8]| {
    let id = "spiffe://fuzz.test/ns/a/sa/b".parse().unwrap();
    let now = time::OffsetDateTime::now_utc();
    match sign_x509_svid(&CA, &id, data, Duration::from_secs(600), now) {
        Ok((leaf, _)) => {
            let read = tessera_api::svid::leaf(&leaf).expect("a signed leaf reads back");
            assert_eq!(read.id, id, "the leaf names another SPIFFE ID");
        }
        Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
    }
});
