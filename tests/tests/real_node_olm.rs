//! Tessera installed through OLM v0 on a real node (`tessera_tests::realnode`
//! and its `olm`): a catalog of `olm/bundle/` served by `opm serve`, a
//! CatalogSource naming it by address, an OperatorGroup (AllNamespaces) and a
//! Subscription. OLM resolves an InstallPlan, unpacks the bundle image in a
//! job on the node, creates the CRDs, service accounts and RBAC from the
//! CSV, and runs the operator, which runs the agent DaemonSet: the CSV
//! reaches Succeeded, the operator's pods and the agent's pod are Ready,
//! and the checks of `on_node` pass on that install. Deleting the
//! Subscription and the CSV leaves no Tessera pod. As root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use tessera_api::install::olm::{CHANNEL, PACKAGE};
use tessera_api::names::{AGENT, NAMESPACE, OPERATOR};
use tessera_tests::olm::catalog;
use tessera_tests::realnode::olm::{CATALOG_SOURCE, OLM_NAMESPACE, Olm};
use tessera_tests::realnode::{self, RealNode};
use tessera_tests::{ControlPlane, eventually, repo_root, resources};

mod on_node;
use on_node::{CGROUP_ROOT, logs, ready};

/// How long OLM gets from the Subscription to a Succeeded CSV.
const INSTALL: Duration = Duration::from_secs(300);

/// `kubectl get <what> -o jsonpath=<path>` in the install namespace; empty
/// when absent.
fn jsonpath(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get", "-n", NAMESPACE, "--ignore-not-found"];
    args.extend_from_slice(what);
    let path = format!("-o=jsonpath={path}");
    args.push(&path);
    cp.kubectl_output(&args).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tessera_installs_through_olm_and_runs_on_the_real_node() -> Result<()> {
    let cp = realnode::control_plane().await?;
    let node = RealNode::start(&cp).await?;
    let bundle_digest = node.import_tessera()?;
    let mut olm = Olm::start(&cp, &node)?;
    let bundle = repo_root().join("olm/bundle");
    let source = olm.serve_catalog(&bundle, &bundle_digest)?;
    let client = cp.client().await?;
    resources::apply_manifest(&client, &source).await?;
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels: {{pod-security.kubernetes.io/enforce: privileged}}\n---\n\
             apiVersion: operators.coreos.com/v1\nkind: OperatorGroup\nmetadata: {{name: tessera, namespace: {NAMESPACE}}}\nspec: {{}}\n---\n\
             apiVersion: operators.coreos.com/v1alpha1\nkind: Subscription\nmetadata: {{name: tessera, namespace: {NAMESPACE}}}\n\
             spec:\n  channel: {CHANNEL}\n  name: {PACKAGE}\n  source: {CATALOG_SOURCE}\n  sourceNamespace: {OLM_NAMESPACE}\n\
             \x20 installPlanApproval: Automatic\n  config:\n    env: [{{name: TESSERA_AGENT_CGROUP_ROOT, value: {CGROUP_ROOT}}}]\n"
        ),
    )
    .await?;
    let csv = catalog::csv_name(&bundle)?;
    eventually("the CSV Succeeded", INSTALL, || async {
        let phase = jsonpath(&cp, &["csv", &csv], "{.status.phase}");
        Ok((phase == "Succeeded").then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "{}; the InstallPlans: {}; the Subscription: {}",
            logs(),
            jsonpath(&cp, &["installplans"], "{.items[*].status}"),
            jsonpath(&cp, &["subscription", "tessera"], "{.status.conditions}")
        )
    })?;
    eventually(
        "the InstallPlan Complete",
        Duration::from_secs(60),
        || async {
            let plan = jsonpath(&cp, &["installplans"], "{.items[*].status.phase}");
            Ok((plan == "Complete").then_some(()))
        },
    )
    .await?;
    // What OLM created from the CSV: both service accounts, the CRDs.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    for account in [OPERATOR, AGENT] {
        assert!(
            accounts.get_opt(account).await?.is_some(),
            "OLM made no {account} ServiceAccount"
        );
    }
    cp.kubectl_output(&["get", "crd", "authpolicies.tessera.dev"])?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let within = Duration::from_secs(120);
    eventually(
        "the operator's pods and the agent's pod Ready",
        within,
        || async {
            let operators = ready(&pods, &format!("app.kubernetes.io/name={OPERATOR}")).await?;
            let agents = ready(&pods, &format!("app.kubernetes.io/name={AGENT}")).await?;
            Ok((operators == (2, 2) && agents == (1, 1)).then_some(()))
        },
    )
    .await
    .with_context(logs)?;
    let trust_domain = on_node::trust_domain(&client).await?;
    on_node::identities(&cp, &node, &trust_domain).await?;
    on_node::mutual_authentication(&cp, &node).await?;

    // Uninstall as OLM's docs say: the Subscription, then the CSV.
    cp.kubectl_output(&["delete", "-n", NAMESPACE, "subscription", "tessera"])?;
    cp.kubectl_output(&["delete", "-n", NAMESPACE, "csv", &csv])?;
    eventually("no Tessera pod left", within, || async {
        let left = pods.list(&Default::default()).await?.items;
        Ok(left.is_empty().then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "pods left in {NAMESPACE}: {}",
            jsonpath(&cp, &["pods"], "{.items[*].metadata.name}")
        )
    })?;
    drop(olm);
    Ok(())
}
