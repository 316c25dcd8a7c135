//! Tessera installed from `deploy/` on a real node (`tessera_tests::realnode`)
//! with images made from this workspace's binaries: the operator's pods and
//! the agent DaemonSet's pod run and become Ready, the operators elect a
//! leader, and the CA Secret and the trust bundle appear. Then, on that
//! install, the checks of `on_node`: identities for workload containers,
//! mutual authentication between real pods, an agent restart. As root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tessera_api::names::{AGENT, BUNDLE_CONFIGMAP, CA_SECRET, NAMESPACE, OPERATOR};
use tessera_tests::realnode::{self, RealNode};
use tessera_tests::{eventually, repo_root};

mod on_node;
use on_node::{CGROUP_ROOT, logs, ready};

/// Points the agent DaemonSet's `--cgroup-root` at this node's pod cgroups.
async fn set_cgroup_root(sets: &Api<DaemonSet>) -> Result<()> {
    let ds = sets.get(AGENT).await?;
    let args = ds
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.args)
        .context("the agent DaemonSet has no args")?;
    let index = args
        .iter()
        .position(|a| a.starts_with("--cgroup-root="))
        .context("the agent DaemonSet gives no --cgroup-root")?;
    let patch = serde_json::json!([{
        "op": "replace",
        "path": format!("/spec/template/spec/containers/0/args/{index}"),
        "value": format!("--cgroup-root={CGROUP_ROOT}"),
    }]);
    sets.patch(
        AGENT,
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(patch)?),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tessera_installs_from_deploy_and_runs_on_the_real_node() -> Result<()> {
    let cp = realnode::control_plane().await?;
    let node = RealNode::start(&cp).await?;
    node.import_tessera()?;
    let deploy = repo_root().join("deploy");
    cp.kubectl_output(&[
        "apply",
        "--server-side",
        "-f",
        deploy.join("namespace.yaml").to_str().unwrap(),
    ])?;
    cp.kubectl_output(&["apply", "--server-side", "-k", deploy.to_str().unwrap()])?;
    let client = cp.client().await?;
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    set_cgroup_root(&sets).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let within = Duration::from_secs(120);
    eventually("both operator pods Ready", within, || async {
        let (all, ready) = ready(&pods, &format!("app.kubernetes.io/name={OPERATOR}")).await?;
        Ok((all == 2 && ready == 2).then_some(()))
    })
    .await
    .with_context(logs)?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("a leader", within, || async {
        let holder = leases
            .get_opt(OPERATOR)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        Ok(holder)
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    eventually("the CA Secret and the trust bundle", within, || async {
        Ok((secrets.get_opt(CA_SECRET).await?.is_some()
            && maps.get_opt(BUNDLE_CONFIGMAP).await?.is_some())
        .then_some(()))
    })
    .await?;
    eventually("the agent's pod Ready", within, || async {
        let (all, ready) = ready(&pods, &format!("app.kubernetes.io/name={AGENT}")).await?;
        Ok((all == 1 && ready == 1).then_some(()))
    })
    .await
    .with_context(logs)?;
    let trust_domain = on_node::trust_domain(&client).await?;
    on_node::identities(&cp, &node, &trust_domain).await?;
    on_node::mutual_authentication(&cp, &node).await
}
