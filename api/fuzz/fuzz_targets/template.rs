//! SPIFFE ID templates from arbitrary bytes: parsing and rendering never
//! panic, and a rendered ID is always a valid SPIFFE ID.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tessera_api::template::{PodFacts, Template};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = text.parse::<Template>() else {
        return;
    };
    assert_eq!(template.to_string(), text);
    let td: TrustDomain = "example.org".parse().unwrap();
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let facts = PodFacts {
        trust_domain: Some(&td),
        namespace: "default",
        service_account: "sa",
        pod_name: "pod-1",
        node_name: "node-1",
        labels: &labels,
    };
    if let Ok(id) = template.render(&facts) {
        assert_eq!(id.to_string().parse::<SpiffeId>().as_ref(), Ok(&id));
    }
});
