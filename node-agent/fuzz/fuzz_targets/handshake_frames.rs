//! Fuzzes the handshake's frame layer with what a peer may send after TLS:
//! frames are split off one by one and each is read as an initiator's hello.
//! Never a panic, and every frame taken lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::handshake::{hello_node, split_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Some(((head, body), tail)) = split_frame(rest) {
        assert_eq!(body.len() + tail.len() + 2, rest.len());
        if let Ok(node) = hello_node(head, body.to_vec()) {
            assert_eq!(node.as_bytes(), body);
        }
        rest = tail;
    }
});
