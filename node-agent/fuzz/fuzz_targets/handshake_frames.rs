//! Fuzzes the handshake's frame layer with what a peer may send after TLS:
//! frames are split off one by one and each is read as an initiator's hello
//! and as a vouching frame. Never a panic, every frame taken lies inside the
//! input, and a vouching frame read encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::mesh::handshake::{Vouched, read_hello, split_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Some(((head, body), tail)) = split_frame(rest) {
        assert_eq!(body.len() + tail.len() + 2, rest.len());
        if let Ok((node, _)) = read_hello(head, body) {
            assert!(body.ends_with(node.as_bytes()));
        }
        if let Ok(v) = Vouched::decode(body) {
            assert_eq!(Vouched::encode(&v.uid, &v.ips), body);
        }
        rest = tail;
    }
});
