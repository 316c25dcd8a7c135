//! Fuzzes the waypoint's path normalisation with any request target: it may
//! refuse one with an error but never panic, and a path it accepts is
//! canonical (absolute, no dot segments, no empty segments, no encoded
//! slash, backslash or NUL) and normalises to itself, so no rule can see
//! one path while the workload gets another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_waypoint::policy::normalise;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((path, _query)) = normalise(target) else {
        return;
    };
    assert!(path.starts_with('/'), "{target:?} -> {path:?}");
    assert!(!path.contains("//"), "{target:?} -> {path:?}");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "{target:?} -> {path:?}");
    }
    let lower = path.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00", "\\", "\0"] {
        assert!(!lower.contains(bad), "{target:?} -> {path:?}");
    }
    let again = normalise(&path).expect("a canonical path normalises again");
    assert_eq!(again.0, path, "not idempotent for {target:?}");
});
