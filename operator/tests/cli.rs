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

#[tokio::test]
async fn run_publishes_the_bundle_annotates_pods_and_stops_on_sigterm() -> Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use kube::api::{Api, PostParams};
    use std::time::{Duration, Instant};

    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    resources::install_crds(&client, &tessera_api::crd::all()).await?;
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tessera-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: default}
"#;
    for obj in resources::parse_manifest(manifest)? {
        resources::create(&client, &obj, false).await?;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args([
            "run",
            "--trust-domain",
            "cluster.test",
            "--namespace",
            "tessera-system",
        ])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}]}}))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let annotations = pods
            .get("p")
            .await?
            .metadata
            .annotations
            .unwrap_or_default();
        if annotations
            .get(tessera_api::annotations::SPIFFE_ID)
            .map(String::as_str)
            == Some("spiffe://cluster.test/ns/default/sa/default")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod never got its identity; annotations {annotations:?}"
        );
        assert!(child.try_wait()?.is_none(), "the operator exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bundle = Api::<ConfigMap>::namespaced(client.clone(), "tessera-system")
        .get("tessera-trust-bundle")
        .await?;
    let pem = bundle
        .data
        .unwrap_or_default()
        .remove("bundle.pem")
        .unwrap_or_default();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait()? {
            break exit;
        }
        assert!(Instant::now() < deadline, "the operator ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut log = String::new();
    if let Some(mut err) = child.stderr.take() {
        std::io::Read::read_to_string(&mut err, &mut log)?;
    }
    assert!(exit.success(), "exit {exit}; log:\n{log}");
    assert!(
        log.contains("bundle published") && log.contains("shutting down"),
        "{log}"
    );
    Ok(())
}
