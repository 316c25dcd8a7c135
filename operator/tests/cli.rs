//! The operator binary against a real control plane.

use std::process::Command;

use anyhow::Result;
use tessera_tests::{ControlPlane, resources};

fn operator(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

#[tokio::test]
async fn check_reports_missing_then_ready_crds() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let kubeconfig = cp.kubeconfig().display().to_string();

    let (ok, text) = operator(&["check", "--kubeconfig", &kubeconfig])?;
    assert!(!ok, "check passed without CRDs:\n{text}");
    assert!(
        text.contains("workloadidentities.tessera.dev: missing"),
        "{text}"
    );

    // What `crds` prints is exactly what makes the check pass.
    let (ok, yaml) = operator(&["crds"])?;
    assert!(ok);
    let client = cp.client().await?;
    let crds = resources::parse_manifest(&yaml)?
        .into_iter()
        .map(|obj| serde_json::from_value(serde_json::to_value(obj)?))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(crds.len(), tessera_api::crd::all().len());
    resources::install_crds(&client, &crds).await?;
    let (ok, text) = operator(&["check", "--kubeconfig", &kubeconfig])?;
    assert!(ok, "{text}");
    assert!(text.contains("API server v1."), "{text}");
    assert_eq!(text.matches(": ready").count(), crds.len(), "{text}");
    Ok(())
}

#[test]
fn check_explains_an_unreadable_kubeconfig() -> Result<()> {
    let (ok, text) = operator(&["check", "--kubeconfig", "/nonexistent/kubeconfig"])?;
    assert!(!ok);
    assert!(
        text.contains("cannot read kubeconfig /nonexistent/kubeconfig"),
        "{text}"
    );
    Ok(())
}
