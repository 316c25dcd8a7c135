//! Where the operator is given the agent's image (OLM installs give it as
//! RELATED_IMAGE_AGENT), it runs the node agents: against the test API
//! server, the leader applies the agent DaemonSet with that image in its
//! namespace and sets the condition PodSecurityAdmitted on it, False with
//! what to change while the namespace enforces Pod Security `baseline`,
//! True once it is `privileged`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tessera_api::names::{AGENT, NAMESPACE};
use tessera_tests::procs::{KillOnDrop, operator_run};
use tessera_tests::{eventually, free_port, resources};

const IMAGE: &str = "registry.example/tessera-agent:under-test";

/// The agent DaemonSet's PodSecurityAdmitted condition: (status, reason,
/// message), once there is one.
async fn admitted(sets: &Api<DaemonSet>) -> Option<(String, String, String)> {
    let ds = sets.get_opt(AGENT).await.ok()??;
    let image = ds.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some(IMAGE));
    ds.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "PodSecurityAdmitted")
        .map(|c| {
            (
                c.status,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_the_agents_and_says_when_pod_security_refuses_them() {
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{pod-security.kubernetes.io/enforce: baseline}}}}\n"
        ),
    )
    .await
    .unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tessera-operator"));
    let _operator = KillOnDrop(
        operator_run(bin, cp.kubeconfig(), "cluster.test")
            .arg(format!("--metrics-addr=127.0.0.1:{}", free_port().unwrap()))
            .arg("--signer-addr=127.0.0.1:0")
            .arg("--agent-recheck-seconds=1")
            .env("RELATED_IMAGE_AGENT", IMAGE)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let refused = eventually(
        "PodSecurityAdmitted=False on the agent DaemonSet",
        std::time::Duration::from_secs(20),
        || async {
            Ok(admitted(&sets)
                .await
                .filter(|(status, _, _)| status == "False"))
        },
    )
    .await
    .unwrap();
    assert_eq!(refused.1, "Forbidden");
    assert!(refused.2.contains("privileged"), "{}", refused.2);

    Api::<Namespace>::all(client.clone())
        .patch(
            NAMESPACE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "privileged"}}})),
        )
        .await
        .unwrap();
    let admitted_now = eventually(
        "PodSecurityAdmitted=True once the namespace is privileged",
        std::time::Duration::from_secs(20),
        || async {
            Ok(admitted(&sets)
                .await
                .filter(|(status, _, _)| status == "True"))
        },
    )
    .await
    .unwrap();
    assert_eq!(admitted_now.1, "Admitted");
}
