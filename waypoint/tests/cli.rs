//! The waypoint binary reading the sample HTTP policy, and a bad file.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;

fn waypoint(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-waypoint"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn prints_the_http_rules_of_the_sample() {
    let sample = tessera_tests::repo_root().join("crds/examples/authpolicy-http.yaml");
    let (ok, text) = waypoint(&["rules", sample.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("invoices-partner-read rule 0: Allow [(8080, None)] methods [Get, Head]"),
        "{text}"
    );
}

#[test]
fn names_the_file_and_document_of_a_non_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    let (ok, text) = waypoint(&["rules", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains("bad.yaml document 1: not an AuthPolicy"),
        "{text}"
    );
}
