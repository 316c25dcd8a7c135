//! The OLM bundle, installed the way Operator Lifecycle Manager installs it
//! (the objects its CSV describes, made in `tests/src/olm.rs`), against the
//! test API server: the objects apply (server-side dry run, then for real),
//! each service account may do what its binary needs and nothing dangerous,
//! and an operator running with the operator account's CSV grants alone runs
//! the agents from the image the CSV gives it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;
use serde_json::Value;
use tessera_api::names::{AGENT, NAMESPACE, OPERATOR};
use tessera_tests::olm::{self, Bundle};
use tessera_tests::procs::{KillOnDrop, operator_run};
use tessera_tests::{ControlPlane, eventually, free_port, rbac, repo_root};

mod common;

/// The value of the operator container's environment variable `name` in the
/// CSV's Deployment.
fn csv_env(csv: &Value, name: &str) -> Option<String> {
    csv["spec"]["install"]["spec"]["deployments"][0]["spec"]["template"]["spec"]["containers"][0]
        ["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_owned)
}

/// The namespace OLM installs into (the CSV's suggested one, privileged as
/// the agents need), then everything the CSV describes: dry run, then for
/// real.
fn install(cp: &ControlPlane, bundle: &Bundle) -> Result<()> {
    let suggested =
        bundle.csv["metadata"]["annotations"]["operatorframework.io/suggested-namespace"]
            .as_str()
            .context("the CSV suggests no namespace")?;
    assert_eq!(suggested, NAMESPACE);
    let namespace = cp.dir().join("olm-namespace.yaml");
    std::fs::write(
        &namespace,
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{pod-security.kubernetes.io/enforce: privileged}}}}\n"
        ),
    )?;
    cp.kubectl_output(&["apply", "--server-side", "-f", namespace.to_str().unwrap()])?;
    let objects = cp.dir().join("olm-install.yaml");
    std::fs::write(&objects, olm::to_yaml(&bundle.install_objects(NAMESPACE)?)?)?;
    let file = objects.to_str().unwrap();
    let dry = cp
        .kubectl_output(&["apply", "--server-side", "--dry-run=server", "-f", file])
        .context("the server-side dry run of the CSV's objects failed")?;
    assert!(dry.contains("(server dry run)"), "{dry}");
    cp.kubectl_output(&["apply", "--server-side", "-f", file])?;
    cp.kubectl_output(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd",
        "--all",
    ])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_installs_as_olm_does_and_its_grants_alone_run_the_agents() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let bundle = Bundle::read(&repo_root().join("olm/bundle"))?;
    install(&cp, &bundle)?;

    let operator = rbac::service_account(NAMESPACE, OPERATOR);
    let agent = rbac::service_account(NAMESPACE, AGENT);
    let mut operator_needs = common::grants::operator_needs();
    let agent_set = format!("daemonsets.apps/{AGENT}");
    operator_needs.extend([
        ("create", "daemonsets.apps".to_owned(), Some(NAMESPACE)),
        ("patch", agent_set.clone(), Some(NAMESPACE)),
        ("patch", format!("{agent_set}#status"), Some(NAMESPACE)),
        ("list", "events".to_owned(), Some(NAMESPACE)),
    ]);
    let mut forbidden = common::grants::forbidden_to_both();
    // Running the agents gives the operator no other DaemonSet.
    let other_set = (
        "patch",
        "daemonsets.apps/kube-proxy".to_owned(),
        Some(NAMESPACE),
    );
    rbac::assert_grants(
        &cp,
        &operator,
        &operator_needs,
        &[forbidden.clone(), vec![other_set]].concat(),
    );
    forbidden.extend(common::grants::forbidden_to_agent());
    forbidden.push(("create", "daemonsets.apps".to_owned(), Some(NAMESPACE)));
    rbac::assert_grants(&cp, &agent, &common::grants::agent_needs(), &forbidden);

    // The operator with the CSV's grants alone and the CSV's agent image.
    let image = csv_env(&bundle.csv, "RELATED_IMAGE_AGENT")
        .context("the CSV's Deployment sets no RELATED_IMAGE_AGENT")?;
    let client = cp.client().await?;
    let token = rbac::api_token(&client, NAMESPACE, OPERATOR).await?;
    let kubeconfig = cp.kubeconfig_with_token(OPERATOR, &token)?;
    let log = cp.dir().join("olm-operator.log");
    let _operator = KillOnDrop(
        operator_run(
            std::path::Path::new(env!("CARGO_BIN_EXE_tessera-operator")),
            &kubeconfig,
            "cluster.test",
        )
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()?))
        .arg("--signer-addr=127.0.0.1:0")
        .arg("--bundle-endpoint-addr=127.0.0.1:0")
        .arg("--agent-recheck-seconds=1")
        .env("RELATED_IMAGE_AGENT", &image)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?,
    );
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let admitted = eventually(
        "the agent DaemonSet, admitted",
        std::time::Duration::from_secs(20),
        || async {
            let Some(ds) = sets.get_opt(AGENT).await? else {
                return Ok(None);
            };
            let conditions = ds.status.and_then(|s| s.conditions).unwrap_or_default();
            let ran = ds
                .spec
                .and_then(|s| s.template.spec)
                .map(|s| s.containers[0].image.clone());
            Ok(conditions
                .iter()
                .any(|c| c.type_ == "PodSecurityAdmitted" && c.status == "True")
                .then_some(ran))
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let image_run = admitted.with_context(|| format!("operator log:\n{text}"))?;
    assert_eq!(image_run.flatten().as_deref(), Some(image.as_str()));
    if text.contains("forbidden") {
        bail!("the operator was refused something with the CSV's grants:\n{text}");
    }
    Ok(())
}
