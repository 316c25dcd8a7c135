//! SPIRE registration against a real SPIRE server: the dry run prints the
//! plan and changes nothing; `run --svid-source spire` registers one entry
//! per identity and node (in batches), parented to each node's SPIRE agent,
//! follows pods, WorkloadIdentity changes and deletions, and never changes
//! or deletes an entry it does not own, even one for the same SPIFFE ID and
//! parent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::Value;
use tessera_tests::fixtures::PodBuilder;
use tessera_tests::procs::{KillOnDrop, operator_run};
use tessera_tests::resources;
use tessera_tests::spire::SpireServer;
use tessera_tests::{TestBins, eventually, free_port};

const PREFIX: &str = "tessera-test-";
const BATCH_PODS: usize = 60;

fn pod(name: &str, app: &str, node: &str) -> Pod {
    PodBuilder::new("shop", name)
        .label("app", app)
        .node(node)
        .build()
}

/// Every entry on the server, as `entry show -output json` prints them.
fn entries(spire: &SpireServer) -> Vec<Value> {
    let out = spire.cli(&["entry", "show", "-output", "json"]).unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    doc["entries"].as_array().cloned().unwrap_or_default()
}

fn ours(spire: &SpireServer) -> Vec<Value> {
    entries(spire)
        .into_iter()
        .filter(|e| e["id"].as_str().unwrap_or_default().starts_with(PREFIX))
        .collect()
}

fn foreign(spire: &SpireServer) -> Vec<Value> {
    let mut them: Vec<Value> = entries(spire)
        .into_iter()
        .filter(|e| !e["id"].as_str().unwrap_or_default().starts_with(PREFIX))
        .collect();
    them.sort_by_key(|e| e["id"].as_str().unwrap_or_default().to_owned());
    them
}

fn id_of(v: &Value) -> String {
    format!(
        "spiffe://{}{}",
        v["trust_domain"].as_str().unwrap_or_default(),
        v["path"].as_str().unwrap_or_default()
    )
}

/// Our entry for `spiffe_id`, parented to `parent`.
fn find<'a>(all: &'a [Value], spiffe_id: &str, parent: &str) -> Option<&'a Value> {
    all.iter()
        .find(|e| id_of(&e["spiffe_id"]) == spiffe_id && id_of(&e["parent_id"]) == parent)
}

fn operator(cp: &tessera_tests::ControlPlane, spire: &SpireServer, extra: &[&str]) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cp.dir().join("operator.log"))
        .unwrap();
    KillOnDrop(
        operator_run(
            std::path::Path::new(env!("CARGO_BIN_EXE_tessera-operator")),
            cp.kubeconfig(),
            "cluster.test",
        )
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port().unwrap()))
        .arg("--signer-addr=127.0.0.1:0")
        .arg("--lease-duration=2")
        .arg("--spire-server-socket")
        .arg(&spire.socket)
        .arg(format!("--spire-entry-id-prefix={PREFIX}"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    )
}

#[tokio::test]
async fn the_operator_registers_what_runs_and_touches_nothing_else() -> Result<()> {
    let bins = TestBins::locate()?;
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    let spire = SpireServer::start(
        &bins.spire_server,
        &cp.dir().join("spire"),
        "cluster.test",
        "5s",
    )
    .await?;
    // SPIRE only accepts federatesWith for trust domains it has a bundle of.
    let partner = rcgen::CertifiedIssuer::self_signed(
        {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        },
        rcgen::KeyPair::generate()?,
    )?;
    let partner_pem = cp.dir().join("b.test.pem");
    std::fs::write(&partner_pem, partner.pem())?;
    spire.cli(&[
        "bundle",
        "set",
        "-id",
        "spiffe://b.test",
        "-path",
        partner_pem.to_str().unwrap(),
    ])?;

    // Entries of another owner: one for exactly the SPIFFE ID and parent
    // Tessera will register, and an unrelated one.
    spire.create_entry(
        "spiffe://cluster.test/tessera/node/node-a",
        "spiffe://cluster.test/ns/shop/web",
        &["k8s:ns:shop"],
        &[],
    )?;
    spire.create_entry(
        "spiffe://cluster.test/legacy-node",
        "spiffe://cluster.test/legacy",
        &["unix:uid:1000"],
        &[],
    )?;
    let theirs = foreign(&spire);
    assert_eq!(theirs.len(), 2);

    // Identities: web pods on both nodes (30 minute SVIDs, federating with
    // b.test), and 60 batch pods with an identity each on node-a.
    resources::apply_manifest(
        &client,
        r#"
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: web}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/ns/{namespace}/web"
  podSelector: {matchLabels: {app: web}}
  ttl: 30m
  federatesWith: [b.test]
---
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: batch}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/batch/{podName}"
  podSelector: {matchLabels: {app: batch}}
"#,
    )
    .await?;
    // node-b's SPIRE agent is named by an annotation, node-a's by the template.
    let agent_b = "spiffe://cluster.test/spire/agent/join_token/node-b-token";
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .patch(
            "node-b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"tessera.dev/spire-agent-id": agent_b}}})),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    pods.create(&pp, &pod("web-a", "web", "node-a")).await?;
    pods.create(&pp, &pod("web-b", "web", "node-b")).await?;
    for i in 0..BATCH_PODS {
        pods.create(&pp, &pod(&format!("batch-{i}"), "batch", "node-a"))
            .await?;
    }

    // The identity controller (builtin mode) records the pods' identities.
    let first = operator(&cp, &spire, &[]);
    let records = Api::<tessera_api::crd::PodIdentity>::all(client.clone());
    eventually(
        "every pod to get its identity",
        std::time::Duration::from_secs(20),
        || async {
            let all = pods.list(&Default::default()).await?.items;
            let recorded = records.list(&Default::default()).await?.items;
            Ok(all
                .iter()
                .all(|p| {
                    recorded
                        .iter()
                        .any(|r| Some(&r.spec.pod_uid) == p.metadata.uid.as_ref())
                })
                .then_some(()))
        },
    )
    .await?;
    drop(first);

    // Dry run: the plan is printed, nothing changes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(["spire-plan", "--trust-domain", "cluster.test"])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .arg("--spire-server-socket")
        .arg(&spire.socket)
        .arg(format!("--spire-entry-id-prefix={PREFIX}"))
        .output()?;
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{plan}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = BATCH_PODS + 2;
    assert!(
        plan.contains(&format!(
            "{expected} to create, 0 to update, 0 to delete; 2 entries of other owners left alone"
        )),
        "{plan}"
    );
    assert_eq!(
        plan.lines().filter(|l| l.starts_with("create ")).count(),
        expected
    );
    assert!(plan.contains(&format!("create {PREFIX}")), "{plan}");
    assert!(ours(&spire).is_empty(), "a dry run changes nothing");
    assert_eq!(foreign(&spire), theirs);

    // SPIRE mode: every identity registered on the node it runs on.
    let _operator = operator(&cp, &spire, &["--svid-source=spire"]);
    let registered = eventually(
        "the entries to be registered",
        std::time::Duration::from_secs(20),
        || async {
            let now = ours(&spire);
            Ok((now.len() == expected).then_some(now))
        },
    )
    .await?;
    let web_a = find(
        &registered,
        "spiffe://cluster.test/ns/shop/web",
        "spiffe://cluster.test/tessera/node/node-a",
    )
    .expect("web on node-a, parented to node-a's agent (template)");
    assert_eq!(web_a["x509_svid_ttl"], 1800);
    assert_eq!(web_a["federates_with"], serde_json::json!(["b.test"]));
    assert_eq!(
        web_a["selectors"],
        serde_json::json!([{"type": "tessera", "value": "spiffe_id:spiffe://cluster.test/ns/shop/web"}])
    );
    assert!(
        find(&registered, "spiffe://cluster.test/ns/shop/web", agent_b).is_some(),
        "web on node-b, parented to the agent its annotation names"
    );
    assert!(
        find(
            &registered,
            "spiffe://cluster.test/batch/batch-59",
            "spiffe://cluster.test/tessera/node/node-a"
        )
        .is_some()
    );
    assert_eq!(
        foreign(&spire),
        theirs,
        "other owners' entries are untouched"
    );

    // A WorkloadIdentity change updates its entries; a pod leaving a node
    // removes that node's entry; other owners' entries stay as they were.
    Api::<tessera_api::crd::WorkloadIdentity>::all(client.clone())
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ttl": "45m"}})),
        )
        .await?;
    eventually(
        "the web entries to get the new TTL",
        std::time::Duration::from_secs(20),
        || async {
            let now = ours(&spire);
            Ok(now
                .iter()
                .filter(|e| id_of(&e["spiffe_id"]) == "spiffe://cluster.test/ns/shop/web")
                .all(|e| e["x509_svid_ttl"] == 2700)
                .then_some(()))
        },
    )
    .await?;
    pods.delete("web-b", &DeleteParams::default()).await?;
    eventually(
        "node-b's web entry to go",
        std::time::Duration::from_secs(20),
        || async {
            Ok(
                find(&ours(&spire), "spiffe://cluster.test/ns/shop/web", agent_b)
                    .is_none()
                    .then_some(()),
            )
        },
    )
    .await?;
    for i in 0..BATCH_PODS {
        pods.delete(&format!("batch-{i}"), &DeleteParams::default())
            .await?;
    }
    let left = eventually(
        "the batch entries to go",
        std::time::Duration::from_secs(20),
        || async {
            let now = ours(&spire);
            Ok((now.len() == 1).then_some(now))
        },
    )
    .await?;
    assert_eq!(
        id_of(&left[0]["spiffe_id"]),
        "spiffe://cluster.test/ns/shop/web"
    );
    assert_eq!(
        foreign(&spire),
        theirs,
        "other owners' entries are untouched"
    );

    // A pod on node-b whose author wrote web's identity onto it gets an
    // entry for its own identity there, never one for web's.
    let mut forger = pod("forger", "forger", "node-b");
    forger.metadata.annotations = Some(
        [
            ("tessera.dev/spiffe-id", "spiffe://cluster.test/ns/shop/web"),
            ("tessera.dev/identity-source", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    pods.create(&pp, &forger).await?;
    let own = "spiffe://cluster.test/ns/shop/sa/default";
    let now = eventually(
        "the forger's own entry on node-b",
        std::time::Duration::from_secs(20),
        || async {
            let now = ours(&spire);
            Ok(find(&now, own, agent_b).is_some().then_some(now))
        },
    )
    .await?;
    assert!(
        find(&now, "spiffe://cluster.test/ns/shop/web", agent_b).is_none(),
        "an entry for web's identity was made on the forger's node"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
