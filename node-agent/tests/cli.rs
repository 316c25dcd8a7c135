//! The agent binary's SPIFFE ID check, run as a user would.

use std::process::Command;

#[test]
fn validate_id_reports_each_id() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-agent"))
        .args([
            "validate-id",
            "spiffe://example.org/ns/a/sa/b",
            "spiffe://Example.org/x",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains(
            "spiffe://example.org/ns/a/sa/b: valid (trust domain example.org, path \"/ns/a/sa/b\")"
        ),
        "{text}"
    );
    assert!(
        text.contains("spiffe://Example.org/x: invalid: trust domain has 'E' at byte 9"),
        "{text}"
    );
}
