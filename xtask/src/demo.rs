//! `cargo xtask demo`: what Tessera does today, on this machine.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use tessera_tests::{ControlPlane, repo_root, resources};

/// An object the API server must refuse: an http:// bundle endpoint and an
/// https_spiffe profile without the endpoint's SPIFFE ID.
const INVALID: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: FederatedTrustDomain
metadata:
  name: broken
spec:
  trustDomain: partner.test
  bundleEndpointURL: http://bundles.partner.test/bundle
  bundleEndpointProfile:
    type: https_spiffe
"#;

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

/// Runs the demo; the control plane is stopped and deleted when it returns.
pub async fn run() -> Result<()> {
    step(
        1,
        "start a local control plane (etcd + kube-apiserver from the Go module proxy)",
    );
    let started = Instant::now();
    let cp = ControlPlane::start().await?;
    println!(
        "API server ready at {} after {:.1}s (kubeconfig {})",
        cp.server(),
        started.elapsed().as_secs_f64(),
        cp.kubeconfig().display()
    );
    let client = cp.client().await?;

    step(
        2,
        "install the Tessera CRDs and wait until they are Established",
    );
    let crds = tessera_api::crd::all();
    resources::install_crds(&client, &crds).await?;
    for crd in &crds {
        println!(
            "established: {}",
            crd.metadata.name.as_deref().unwrap_or_default()
        );
    }

    step(3, "apply the samples in crds/examples");
    let dir = repo_root().join("crds/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in &files {
        let yaml = std::fs::read_to_string(file)?;
        for obj in resources::apply_manifest(&client, &yaml).await? {
            let kind = obj.types.as_ref().map_or("?", |t| t.kind.as_str());
            println!(
                "created {kind}/{}",
                obj.metadata.name.as_deref().unwrap_or_default()
            );
        }
    }

    step(4, "kubectl get shows them with their printer columns");
    for args in [
        &["get", "workloadidentities", "-o", "wide"][..],
        &["get", "authpolicies", "--all-namespaces", "-o", "wide"],
        &["get", "federatedtrustdomains", "-o", "wide"],
    ] {
        println!("$ kubectl {}", args.join(" "));
        print!("{}", cp.kubectl_output(args)?);
    }

    step(5, "the API server itself rejects an invalid object");
    println!("{INVALID}");
    let obj = resources::parse_manifest(INVALID)?
        .pop()
        .context("the invalid sample has no object")?;
    match resources::create(&client, &obj, false).await {
        Ok(_) => bail!(
            "the API server accepted an invalid FederatedTrustDomain; the CRD validation is broken"
        ),
        Err(e) => println!("rejected: {}", resources::api_message(&e)),
    }

    step(6, "stop the control plane and delete its files");
    let dir = cp.dir().to_path_buf();
    cp.stop();
    println!("stopped; {} removed: {}", dir.display(), !dir.exists());
    println!("\nNot shown yet: the operator, node agents and workloads (see README, Status).");
    Ok(())
}
