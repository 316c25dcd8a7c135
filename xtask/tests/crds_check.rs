//! `cargo xtask crds --check` fails on a hand-edited CRD manifest and passes
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions
//! on the checked-in ones.

use std::process::Command;

fn xtask(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("xtask runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_passes_on_the_repository_and_fails_on_a_hand_edit() {
    let (ok, text) = xtask(&["crds", "--check"]);
    assert!(ok, "{text}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, text) = xtask(&["crds", "--dir", d]);
    assert!(ok, "{text}");
    let (ok, text) = xtask(&["crds", "--check", "--dir", d]);
    assert!(ok, "{text}");

    let file = dir.path().join("tessera.dev_federatedtrustdomains.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    // A reviewer "relaxing" a rule by hand instead of in the Rust types.
    let edited = yaml.replace("bundleEndpointURL must be an https:// URL", "any URL");
    assert_ne!(edited, yaml);
    std::fs::write(&file, edited).unwrap();
    let (ok, text) = xtask(&["crds", "--check", "--dir", d]);
    assert!(!ok, "a hand-edited CRD passed the check");
    assert!(
        text.contains("tessera.dev_federatedtrustdomains.yaml differs from the Rust types"),
        "{text}"
    );
    assert!(text.contains("run `cargo xtask crds`"), "{text}");
}
