//! The CRDs install into a real API server, every sample is accepted and reads
//! back into the Rust types with the schema's defaults applied, and kubectl
//! shows the printer columns and short names.

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use tessera_api::crd::auth_policy::{Authentication, Protocol};
use tessera_api::crd::{AuthPolicy, FederatedTrustDomain, WorkloadIdentity};
use tessera_tests::{ControlPlane, repo_root, resources};

fn examples() -> Result<Vec<(String, String)>> {
    let dir = repo_root().join("crds/examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            out.push((name, std::fs::read_to_string(&path)?));
        }
    }
    out.sort();
    Ok(out)
}

async fn with_examples() -> Result<(ControlPlane, kube::Client)> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    for (name, yaml) in examples()? {
        resources::apply_manifest(&client, &yaml)
            .await
            .with_context(|| format!("crds/examples/{name} was rejected"))?;
    }
    Ok((cp, client))
}

#[tokio::test]
async fn crds_are_established_and_samples_round_trip_through_the_types() -> Result<()> {
    let (_cp, client) = with_examples().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tessera_api::crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert!(
            tessera_api::crd::installed::is_established(&crds.get(&name).await?),
            "{name} not Established"
        );
    }
    let examples = examples()?;
    let count = |kind: &str| {
        examples
            .iter()
            .map(|(_, y)| y.matches(&format!("kind: {kind}\n")).count())
            .sum::<usize>()
    };
    let lp = ListParams::default();
    let wids = Api::<WorkloadIdentity>::all(client.clone())
        .list(&lp)
        .await?;
    let aps = Api::<AuthPolicy>::all(client.clone()).list(&lp).await?;
    let ftds = Api::<FederatedTrustDomain>::all(client.clone())
        .list(&lp)
        .await?;
    assert_eq!(wids.items.len(), count("WorkloadIdentity"));
    assert_eq!(aps.items.len(), count("AuthPolicy"));
    assert_eq!(ftds.items.len(), count("FederatedTrustDomain"));
    assert!(wids.items.len() >= 2 && aps.items.len() >= 2 && ftds.items.len() >= 2);

    // The samples parse with the domain types, not only with the schema.
    for w in &wids.items {
        w.spec.template()?;
        w.spec.federates_with()?;
    }
    // Defaults come from the schema, applied by the API server.
    let ledger = aps
        .items
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("ledger-allow"));
    let rule = &ledger.context("ledger-allow sample missing")?.spec.rules[0];
    assert_eq!(rule.ports[0].protocol, Protocol::Tcp);
    assert_eq!(rule.authentication, Authentication::Mutual);
    let default_wid = wids
        .items
        .iter()
        .find(|w| w.metadata.name.as_deref() == Some("default-service-accounts"));
    assert!(default_wid.context("default sample missing")?.spec.fallback);
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_short_names() -> Result<()> {
    let (cp, _client) = with_examples().await?;
    let header = |args: &[&str]| -> Result<Vec<String>> {
        let out = cp.kubectl_output(args)?;
        let first = out.lines().next().unwrap_or_default().to_owned();
        // Columns are separated by two or more spaces; names may contain one.
        Ok(first
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    };
    assert_eq!(
        header(&["get", "wid"])?,
        ["NAME", "TEMPLATE", "PODS", "READY", "AGE"]
    );
    assert_eq!(
        header(&["get", "ap", "-A"])?,
        [
            "NAMESPACE",
            "NAME",
            "ACTION",
            "ENDPOINTS",
            "NODES",
            "READY",
            "AGE"
        ]
    );
    assert_eq!(
        header(&["get", "ftd"])?,
        [
            "NAME",
            "TRUST DOMAIN",
            "PROFILE",
            "SEQUENCE",
            "READY",
            "AGE"
        ]
    );
    let rows = cp.kubectl_output(&["get", "ftd", "partner", "--no-headers"])?;
    let cells: Vec<&str> = rows.split_whitespace().collect();
    assert_eq!(cells[..3], ["partner", "partner.test", "https_spiffe"]);
    // The category lists every Tessera kind at once.
    let all = cp.kubectl_output(&["get", "tessera", "-A", "-o", "name"])?;
    for kind in ["workloadidentity", "authpolicy", "federatedtrustdomain"] {
        assert!(
            all.contains(&format!("{kind}.tessera.dev/")),
            "{kind} missing from:\n{all}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn status_conditions_merge_by_type_under_server_side_apply() -> Result<()> {
    let (_cp, client) = with_examples().await?;
    let api: Api<AuthPolicy> = Api::namespaced(client, "default");
    let condition = |type_: &str, status: &str| {
        serde_json::json!({"type": type_, "status": status, "reason": "Test",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let patch = |cond: serde_json::Value| {
        serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "AuthPolicy",
            "status": {"conditions": [cond], "endpoints": 3}})
    };
    // Two writers, each owning one condition type (the operator and, later, agents).
    for (manager, cond) in [
        ("writer-a", condition("Ready", "True")),
        ("writer-b", condition("Enforced", "False")),
    ] {
        api.patch_status(
            "ledger-allow",
            &kube::api::PatchParams::apply(manager),
            &kube::api::Patch::Apply(patch(cond)),
        )
        .await?;
    }
    let status = api
        .get_status("ledger-allow")
        .await?
        .status
        .context("no status")?;
    let mut types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    types.sort();
    assert_eq!(
        types,
        ["Enforced", "Ready"],
        "one writer's condition replaced the other's"
    );
    assert_eq!(status.endpoints, Some(3));
    // Spec is untouched by status writes.
    assert_eq!(api.get("ledger-allow").await?.spec.rules.len(), 1);
    Ok(())
}
