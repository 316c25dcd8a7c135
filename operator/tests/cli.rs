//! The operator binary against a real control plane.

use std::process::Command;

use anyhow::Result;
use tessera_tests::{ControlPlane, resources};

mod common;
use common::{RunningOperator, http_get, metric};

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

async fn cluster_with_namespaces() -> Result<(ControlPlane, kube::Client)> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    let manifest = "apiVersion: v1\nkind: Namespace\nmetadata: {name: tessera-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n";
    for obj in resources::parse_manifest(manifest)? {
        resources::create(&client, &obj, false).await?;
    }
    Ok((cp, client))
}

async fn create_pod_and_wait(client: &kube::Client, name: &str) -> Result<()> {
    use std::time::{Duration, Instant};
    tessera_tests::fixtures::PodBuilder::new("default", name)
        .create(client)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let record = tessera_tests::resources::pod_identity(client, "default", name).await?;
        if record.as_ref().map(|r| r.spiffe_id.as_str())
            == Some("spiffe://cluster.test/ns/default/sa/default")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("pod {name} never got its identity; its record: {record:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_publishes_the_bundle_annotates_pods_serves_metrics_and_stops_on_sigterm() -> Result<()>
{
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;

    let (cp, client) = cluster_with_namespaces().await?;
    let op = RunningOperator::start(&cp, 15)?;
    create_pod_and_wait(&client, "p").await?;
    let bundle = Api::<ConfigMap>::namespaced(client.clone(), "tessera-system")
        .get("tessera-trust-bundle")
        .await?;
    let pem = bundle
        .data
        .unwrap_or_default()
        .remove("bundle.pem")
        .unwrap_or_default();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    assert_eq!(http_get(op.port, "/healthz")?.0, 200);
    assert_eq!(http_get(op.port, "/readyz")?.0, 200);
    assert_eq!(http_get(op.port, "/nope")?.0, 404);
    assert!(op.is_leader());
    assert_eq!(metric(op.port, "tessera_operator_ca_roots"), Some(1.0));
    assert!(metric(op.port, "tessera_operator_identities_assigned_total").unwrap_or(0.0) >= 1.0);

    let (ok, log) = op.terminate().await?;
    assert!(ok, "log:\n{log}");
    assert!(
        log.contains("bundle published") && log.contains("shutting down"),
        "{log}"
    );
    assert!(log.contains("signing service listening"), "{log}");
    Ok(())
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over() -> Result<()> {
    use std::time::{Duration, Instant};

    let (cp, client) = cluster_with_namespaces().await?;
    let a = RunningOperator::start(&cp, 4)?;
    let b = RunningOperator::start(&cp, 4)?;
    create_pod_and_wait(&client, "first").await?;
    // Exactly one leader (allow the metrics of both to settle).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (leader, standby) = loop {
        match (a.is_leader(), b.is_leader()) {
            (true, false) => break (a, b),
            (false, true) => break (b, a),
            (both, _) => assert!(!both || Instant::now() < deadline, "two leaders at once"),
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        http_get(standby.port, "/readyz")?.0,
        200,
        "a standby is ready too"
    );

    let (ok, log) = leader.terminate().await?;
    assert!(ok, "{log}");
    // The standby takes over and keeps assigning identities.
    create_pod_and_wait(&client, "second").await?;
    assert!(standby.is_leader());
    Ok(())
}
