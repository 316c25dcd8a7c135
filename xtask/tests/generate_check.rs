//! `cargo xtask generate --check` passes on the checked-in `crds/` and
//! `deploy/` and fails on a hand edit of either.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

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

/// Generates into a temporary root, checks it clean, applies `edit` to
/// `file` below it and returns what the check then says.
fn check_after_edit(file: &str, edit: impl Fn(&str) -> String) -> String {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let (ok, text) = xtask(&["generate", "--root", root]);
    assert!(ok, "{text}");
    let (ok, text) = xtask(&["generate", "--check", "--root", root]);
    assert!(ok, "{text}");
    let path = dir.path().join(file);
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = edit(&original);
    assert_ne!(edited, original, "the edit changed nothing");
    std::fs::write(&path, edited).unwrap();
    let (ok, text) = xtask(&["generate", "--check", "--root", root]);
    assert!(!ok, "a hand-edited {file} passed the check");
    assert!(text.contains("run `cargo xtask generate`"), "{text}");
    text
}

#[test]
fn check_passes_on_the_repository() {
    let (ok, text) = xtask(&["generate", "--check"]);
    assert!(ok, "{text}");
}

#[test]
fn check_fails_on_a_hand_edited_crd() {
    // A reviewer "relaxing" a rule by hand instead of in the Rust types.
    let text = check_after_edit("crds/tessera.dev_federatedtrustdomains.yaml", |y| {
        y.replace("bundleEndpointURL must be an https:// URL", "any URL")
    });
    assert!(
        text.contains("tessera.dev_federatedtrustdomains.yaml differs from what the Rust types in api/src/crd generate"),
        "{text}"
    );
}

#[test]
fn check_fails_on_a_hand_widened_role() {
    // Someone granting the agent more by hand.
    let text = check_after_edit("deploy/rbac-agent.yaml", |y| {
        y.replacen("- watch\n", "- watch\n  - delete\n", 1)
    });
    assert!(
        text.contains("rbac-agent.yaml differs from what api/src/install generates"),
        "{text}"
    );
}
