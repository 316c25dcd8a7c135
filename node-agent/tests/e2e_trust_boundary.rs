//! The trust boundary, end to end as root: a user who may only manage pods in
//! namespace `dev` tries to give a pod another workload's identity by
//! writing the values Tessera once read from pod annotations, on create and
//! by patching running pods (one whose identity assigns, and ones whose
//! WorkloadIdentity template fails for them). Real API server with RBAC,
//! the real operator and node agent processes, and processes in the pods'
//! cgroups asking the Workload API. No pod of `dev` ever gets the victim's
//! SVID: the forged pods get their own or nothing; and the user cannot
//! write the PodIdentity records the operator keeps instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tessera_api::crd::{NumericIdentity, PodIdentity};
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::resources;

mod common;
use common::{PodCgroup, first_fetch};

const VICTIM: &str = "spiffe://cluster.test/payments/ledger";
const DEV_DEFAULT: &str = "spiffe://cluster.test/ns/dev/sa/default";
const JANE: &str = "jane";

/// The victim's namespace and WorkloadIdentity; `dev`, where jane may manage
/// pods (the verbs the built-in `edit` role gives on pods), and a
/// WorkloadIdentity whose template fails for `dev` pods without a `tier`
/// label.
const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: payments}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: dev}
---
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: ledger}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/payments/ledger"
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: payments}}
  podSelector: {matchLabels: {app: ledger}}
---
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: tools}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/dev/{podLabel:tier}"
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
  podSelector: {matchLabels: {app: tool}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-editor, namespace: dev}
rules:
- apiGroups: [""]
  resources: [pods, pods/attach, pods/exec, pods/portforward, pods/proxy]
  verbs: [create, delete, deletecollection, get, list, patch, update, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: jane-pod-editor, namespace: dev}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-editor}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: jane}
"#;

fn pod(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    notes: &BTreeMap<String, String>,
) -> Pod {
    tessera_tests::fixtures::PodBuilder::new(namespace, name)
        .labels(labels)
        .annotations(notes.clone())
        .node("node-a")
        .build()
}

/// Every value Tessera ever read from a pod's annotations, set to the victim's.
fn forged(victim_number: &str) -> BTreeMap<String, String> {
    [
        ("tessera.dev/spiffe-id", VICTIM),
        ("tessera.dev/identity", victim_number),
        ("tessera.dev/identity-source", "ledger"),
        ("tessera.dev/federates-with", "cluster.test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// What SPIRE's own Workload API client (`spire-agent api fetch x509`),
/// run in `cgroup`, answered: its output with the SVID, or the error.
fn fetch(cgroup: &PodCgroup, socket: &std::path::Path) -> Result<String, String> {
    let spire_agent = tessera_tests::TestBins::locate().unwrap().spire_agent;
    let out = cgroup
        .spawn(
            &spire_agent,
            &[
                "api",
                "fetch",
                "x509",
                "-timeout",
                "1s",
                "-socketPath",
                socket.to_str().unwrap(),
            ],
        )
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && text.contains("SPIFFE ID:") {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_author_cannot_give_a_pod_another_workloads_identity() {
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();
    resources::apply_manifest(&client, SETUP).await.unwrap();
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let token = resources::agent_token(&client, "node-a", TOKEN_AUDIENCE)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_agent, socket) =
        common::spawn_agent(cp.kubeconfig(), "node-a", signer_port, &token, dir.path());

    // The victim, and the number its identity holds.
    let victim = Api::<Pod>::namespaced(client.clone(), "payments")
        .create(
            &PostParams::default(),
            &pod(
                "payments",
                "ledger-0",
                &[("app", "ledger")],
                &BTreeMap::new(),
            ),
        )
        .await
        .unwrap();
    let victim_cg = PodCgroup::create("tb-ledger", victim.metadata.uid.as_deref().unwrap());
    assert!(first_fetch(&victim_cg, &socket).await.contains(VICTIM));
    let numbers = Api::<NumericIdentity>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let number = numbers
        .items
        .iter()
        .find(|n| n.spec.spiffe_id == VICTIM)
        .map(|n| format!("{}/{}", n.spec.id, n.spec.generation))
        .expect("the victim's numeric identity");
    let notes = forged(&number);

    // Jane, who may manage pods in dev and nothing else.
    let jane = cp.client_as(JANE).await.unwrap();
    let dev: Api<Pod> = Api::namespaced(jane.clone(), "dev");
    // 1. Created with the victim's values, its template failing.
    let created = dev
        .create(
            &PostParams::default(),
            &pod("dev", "forged", &[("app", "tool")], &notes),
        )
        .await
        .unwrap();
    let forged_cg = PodCgroup::create("tb-forged", created.metadata.uid.as_deref().unwrap());
    // 2. A running pod with its own identity, then patched.
    let created = dev
        .create(
            &PostParams::default(),
            &pod("dev", "honest", &[("app", "other")], &BTreeMap::new()),
        )
        .await
        .unwrap();
    let honest_cg = PodCgroup::create("tb-honest", created.metadata.uid.as_deref().unwrap());
    assert!(first_fetch(&honest_cg, &socket).await.contains(DEV_DEFAULT));
    // 3. A running pod whose template fails, then patched.
    let created = dev
        .create(
            &PostParams::default(),
            &pod("dev", "broken", &[("app", "tool")], &BTreeMap::new()),
        )
        .await
        .unwrap();
    let broken_cg = PodCgroup::create("tb-broken", created.metadata.uid.as_deref().unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in ["honest", "broken"] {
        let patch = serde_json::json!({"metadata": {"annotations": notes}});
        dev.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    // For a while, every answer to the dev pods is their own SVID or a
    // refusal; never the victim's.
    let until = Instant::now() + Duration::from_secs(8);
    let mut honest_served = 0;
    while Instant::now() < until {
        for (name, cg) in [("forged", &forged_cg), ("broken", &broken_cg)] {
            match fetch(cg, &socket) {
                Ok(svid) => panic!("pod dev/{name}, whose template fails, got an SVID:\n{svid}"),
                Err(e) => assert!(e.contains("PermissionDenied"), "dev/{name}: {e}"),
            }
        }
        match fetch(&honest_cg, &socket) {
            Ok(svid) => {
                assert!(
                    svid.contains(DEV_DEFAULT) && !svid.contains(VICTIM),
                    "pod dev/honest got another identity:\n{svid}"
                );
                honest_served += 1;
            }
            Err(e) => panic!("pod dev/honest lost its own SVID: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(honest_served > 0);
    // The victim still has its own.
    assert!(fetch(&victim_cg, &socket).unwrap().contains(VICTIM));

    // Nor can jane write the record the operator keeps for a pod: neither
    // create one for her pod nor change the honest pod's.
    let records: Api<PodIdentity> = Api::all(jane.clone());
    let uid = pod_uid(&client, "forged").await;
    let record: PodIdentity = serde_json::from_value(serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "PodIdentity", "metadata": {"name": uid},
        "spec": {"podUID": uid, "namespace": "dev", "podName": "forged", "nodeName": "node-a",
            "spiffeID": VICTIM, "id": 300, "generation": 1}
    }))
    .unwrap();
    let refused = records.create(&PostParams::default(), &record).await;
    assert!(
        forbidden(&refused),
        "jane created a PodIdentity: {refused:?}"
    );
    let honest_uid = pod_uid(&client, "honest").await;
    let rewrite = serde_json::json!({"spec": {"spiffeID": VICTIM}});
    let refused = records
        .patch(&honest_uid, &PatchParams::default(), &Patch::Merge(rewrite))
        .await;
    assert!(
        forbidden(&refused),
        "jane patched a PodIdentity: {refused:?}"
    );
    let honest = resources::pod_identity(&client, "dev", "honest")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(honest.spiffe_id, DEV_DEFAULT);
    assert_eq!(
        resources::pod_identity(&client, "dev", "forged")
            .await
            .unwrap(),
        None
    );
}

/// The UID of pod `dev/name`.
async fn pod_uid(client: &kube::Client, name: &str) -> String {
    Api::<Pod>::namespaced(client.clone(), "dev")
        .get(name)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap()
}

fn forbidden<T: std::fmt::Debug>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}
