//! Tessera installed from `deploy/` on a real node (`tessera_tests::realnode`)
//! with images made from this workspace's binaries: the operator's pods and
//! the agent DaemonSet's pod run and become Ready, the operators elect a
//! leader, and the CA Secret and the trust bundle appear. Then, on that
//! install: workload containers fetch their own X.509-SVIDs through the
//! agent's socket (a host path), one of them with SPIRE's agent as the
//! client, and a process of the host outside any pod is refused. As root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use tessera_api::names::{AGENT, BUNDLE_CONFIGMAP, CA_SECRET, NAMESPACE, OPERATOR};
use tessera_tests::realnode::{self, LOGS, RealNode};
use tessera_tests::{ControlPlane, TestBins, eventually_for, repo_root, resources};

/// Where the agent's Workload API socket is on the host (`deploy/agent.yaml`).
const SOCKET_DIR: &str = "/run/tessera";
/// The workloads' namespace.
const WORKLOADS: &str = "default";

/// The node's pod cgroup root on this machine: the kubelet's cgroupfs
/// driver, in the cgroup v2 hierarchy of a hybrid host.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/kubepods";

fn logs() -> String {
    format!(
        "the node's logs are kept in {}",
        std::env::temp_dir().join(LOGS).display()
    )
}

/// The pods matching `labels` in the namespace, and how many are Ready.
async fn ready(pods: &Api<Pod>, labels: &str) -> Result<(usize, usize)> {
    let list = pods.list(&ListParams::default().labels(labels)).await?;
    let ready = list
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    Ok((list.items.len(), ready))
}

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
    eventually_for("both operator pods Ready", within, || async {
        let (all, ready) = ready(&pods, &format!("app.kubernetes.io/name={OPERATOR}")).await?;
        Ok((all == 2 && ready == 2).then_some(()))
    })
    .await
    .with_context(logs)?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    eventually_for("a leader", within, || async {
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
    eventually_for("the CA Secret and the trust bundle", within, || async {
        Ok((secrets.get_opt(CA_SECRET).await?.is_some()
            && maps.get_opt(BUNDLE_CONFIGMAP).await?.is_some())
        .then_some(()))
    })
    .await?;
    eventually_for("the agent's pod Ready", within, || async {
        let (all, ready) = ready(&pods, &format!("app.kubernetes.io/name={AGENT}")).await?;
        Ok((all == 1 && ready == 1).then_some(()))
    })
    .await
    .with_context(logs)?;
    let trust_domain = maps
        .get(BUNDLE_CONFIGMAP)
        .await?
        .data
        .and_then(|mut d| d.remove("trustDomain"))
        .context("the bundle ConfigMap names no trustDomain")?;
    identities(&cp, &node, &trust_domain).await
}

/// Two pods of different service accounts fetch their own SVIDs from inside
/// their containers (`web` with the test program's go-spiffe client, `db`
/// with `spire-agent api fetch x509`); a host process outside any pod is
/// refused.
async fn identities(cp: &ControlPlane, node: &RealNode, trust_domain: &str) -> Result<()> {
    let client = cp.client().await?;
    let images = node.images();
    let socket = format!("{SOCKET_DIR}/agent.sock");
    for (name, image, args) in [
        ("web", &images.workload, vec!["svid", socket.as_str()]),
        (
            "db",
            &images.spire_agent,
            vec!["api", "fetch", "x509", "-socketPath", socket.as_str()],
        ),
    ] {
        resources::apply_manifest(&client, &format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {WORKLOADS}}}\n")).await?;
        resources::apply_manifest(&client, &socket_pod(name, image, &args)).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client, WORKLOADS);
    for (name, shows) in [("web", ""), ("db", "SPIFFE ID:")] {
        let phase = finished(&pods, name).await?;
        let log = node.container_log(WORKLOADS, name, "c");
        let want = format!("spiffe://{trust_domain}/ns/{WORKLOADS}/sa/{name}");
        assert_eq!(phase, "Succeeded", "{name}'s fetch failed: {log}");
        assert!(
            log.lines()
                .any(|l| l.contains(shows) && l.split_whitespace().any(|w| w == want)),
            "{name} should have fetched {want}; it printed: {log}"
        );
    }
    // The test itself: a host process in no pod.
    let out = std::process::Command::new(&TestBins::locate()?.spire_agent)
        .args([
            "api",
            "fetch",
            "x509",
            "-timeout",
            "5s",
            "-socketPath",
            &socket,
        ])
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a host process got an SVID: {text}");
    assert!(
        text.contains("PermissionDenied"),
        "refused for another reason: {text}"
    );
    Ok(())
}

/// A one-shot pod of service account `name` running `image` with `args`,
/// the agent's socket directory mounted read-only.
fn socket_pod(name: &str, image: &str, args: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {WORKLOADS}, labels: {{app: {name}}}}}\n\
         spec:\n  serviceAccountName: {name}\n  restartPolicy: Never\n  automountServiceAccountToken: false\n\
         \x20 containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n\
         \x20   args: {args:?}\n    volumeMounts: [{{name: spiffe, mountPath: {SOCKET_DIR}, readOnly: true}}]\n\
         \x20 volumes: [{{name: spiffe, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}]\n"
    )
}

/// The phase pod `name` ends in: Succeeded or Failed.
async fn finished(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually_for(
        &format!("{name} to finish"),
        Duration::from_secs(60),
        || async {
            let phase = pods.get(name).await?.status.and_then(|s| s.phase);
            Ok(phase.filter(|p| p == "Succeeded" || p == "Failed"))
        },
    )
    .await
    .with_context(logs)
}
