//! The policy compiler against a real API server (with the identity
//! controller giving pods their SPIFFE IDs): AuthPolicies become
//! IdentityPolicy objects that follow pod churn, AuthPolicy status says where
//! a policy applies or why it cannot be compiled, and deleting a policy
//! deletes its compiled rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use tessera_api::crd::auth_policy::{Authentication, PolicyAction};
use tessera_api::crd::{AuthPolicy, IdentityPolicy};
use tessera_operator::{identity, policy};
use tessera_tests::eventually;
use tessera_tests::resources;
use tokio::sync::oneshot;

const NS: &str = "shop";
const DB: &str = "spiffe://cluster.test/ns/shop/sa/db";
const WEB: &str = "spiffe://cluster.test/ns/shop/sa/web";
const WEB2: &str = "spiffe://cluster.test/ns/shop/sa/web2";

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?;
    Ok(())
}

async fn pod(client: &kube::Client, name: &str, app: &str, sa: &str, node: &str) -> Result<()> {
    let pod = tessera_tests::fixtures::PodBuilder::new(NS, name)
        .label("app", app)
        .service_account(sa)
        .node(node);
    pod.create(client).await.map(drop)
}

/// The compiled policy of `spiffe_id`, once `want` holds for it (None: absent).
async fn compiled(
    client: &kube::Client,
    spiffe_id: &str,
    what: &str,
    want: impl Fn(Option<&IdentityPolicy>) -> bool,
) -> Result<Option<IdentityPolicy>> {
    let api = Api::<IdentityPolicy>::all(client.clone());
    eventually(what, std::time::Duration::from_secs(20), || async {
        let all = api.list(&ListParams::default()).await?;
        let found = all
            .items
            .into_iter()
            .find(|p| p.spec.spiffe_id == spiffe_id);
        Ok(want(found.as_ref()).then_some(found))
    })
    .await
}

fn peers(p: &IdentityPolicy) -> Vec<String> {
    p.spec.rules[0].from[0]
        .spiffe_ids
        .clone()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_policies_compile_into_identity_policies_that_follow_the_pods() -> Result<()> {
    let (_cp, client) = resources::control_plane_with_crds().await?;
    create(
        &Api::<Namespace>::all(client.clone()),
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    for sa in ["db", "web", "web2"] {
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), NS),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": NS}}),
        )
        .await?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (stop_tx2, stop_rx2) = oneshot::channel::<()>();
    let preview = Arc::new(policy::Preview::default());
    let ids = tokio::spawn(identity::run(
        client.clone(),
        "cluster.test".parse()?,
        Default::default(),
        Duration::from_secs(30),
        Some(preview.clone()),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let compiler = tokio::spawn(policy::run(
        client.clone(),
        Default::default(),
        preview,
        async move {
            let _ = stop_rx2.await;
        },
    ));
    pod(&client, "db-0", "db", "db", "node-a").await?;
    pod(&client, "web-0", "web", "web", "node-b").await?;

    let policies = Api::<AuthPolicy>::namespaced(client.clone(), NS);
    create(
        &policies,
        serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": "db-from-web", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "db"}}, "rules": [{
                "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                "ports": [{"port": 5432}]
            }]}
        }),
    )
    .await?;
    let db = compiled(&client, DB, "db's compiled policy naming web", |p| {
        p.is_some_and(|p| peers(p) == [WEB])
    })
    .await?
    .unwrap();
    assert!(db.spec.default_deny);
    assert_eq!(db.spec.sources, vec!["shop/db-from-web".to_owned()]);
    assert_eq!(db.spec.rules[0].action, PolicyAction::Allow);
    assert_eq!(db.spec.rules[0].authentication, Authentication::Mutual);
    assert_eq!(db.spec.rules[0].ports[0].port, 5432);
    // The status is written after the IdentityPolicies, and an earlier pass
    // may have seen the policy before the pods: wait for the count to settle.
    let status = eventually(
        "the AuthPolicy's status counting db-0",
        std::time::Duration::from_secs(20),
        || async {
            let p = policies.get("db-from-web").await?;
            Ok(p.status.filter(|s| {
                s.observed_generation.is_some() && (s.endpoints, s.nodes) == (Some(1), Some(1))
            }))
        },
    )
    .await?;
    assert_eq!(status.conditions[0].status, "True", "{status:?}");

    // A new pod the peer selector picks, with another SPIFFE ID, joins the rule.
    pod(&client, "web2-0", "web", "web2", "node-b").await?;
    let db = compiled(&client, DB, "the new web pod's ID in db's rule", |p| {
        p.is_some_and(|p| peers(p) == [WEB, WEB2])
    })
    .await?
    .unwrap();
    // ... and did so before the pod got its identity: agents put a pod on
    // the data path only once it has one, so its first connection never
    // meets rules that do not know it yet. (Resource versions are etcd
    // revisions here: one store, comparable; nothing else writes either
    // object in between.)
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let records = Api::<tessera_api::crd::PodIdentity>::all(client.clone());
    let web2 = eventually(
        "web2-0's identity",
        std::time::Duration::from_secs(20),
        || async {
            let uid = pods.get("web2-0").await?.metadata.uid.unwrap_or_default();
            Ok(records
                .get_opt(&uid)
                .await?
                .filter(|r| r.spec.spiffe_id == WEB2))
        },
    )
    .await?;
    let revision = |rv: &Option<String>| -> u64 { rv.as_deref().unwrap().parse().unwrap() };
    assert!(
        revision(&db.metadata.resource_version) < revision(&web2.metadata.resource_version),
        "db's rules naming web2 (rv {:?}) were written after web2-0 got its identity (rv {:?})",
        db.metadata.resource_version,
        web2.metadata.resource_version
    );
    // When its pod goes, it leaves the rule.
    Api::<Pod>::namespaced(client.clone(), NS)
        .delete("web2-0", &Default::default())
        .await?;
    compiled(&client, DB, "web2 gone from db's rule", |p| {
        p.is_some_and(|p| peers(p) == [WEB])
    })
    .await?;

    // A policy the data path cannot hold is reported and enforced fail-closed.
    create(
        &policies,
        serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": "web-wide", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "Deny",
                "rules": [{"ports": [{"port": 1000, "endPort": 9000}]}]}
        }),
    )
    .await?;
    let status = eventually(
        "the wide policy's status",
        std::time::Duration::from_secs(20),
        || async {
            let p = policies.get("web-wide").await?;
            Ok(p.status.filter(|s| s.observed_generation.is_some()))
        },
    )
    .await?;
    assert_eq!(status.conditions[0].status, "False");
    assert_eq!(status.conditions[0].reason, "Invalid");
    assert!(
        status.conditions[0].message.contains("cover 8001 ports"),
        "{}",
        status.conditions[0].message
    );
    let web = compiled(&client, WEB, "web denies everything", |p| p.is_some())
        .await?
        .unwrap();
    assert_eq!(web.spec.rules.len(), 1);
    assert_eq!(web.spec.rules[0].action, PolicyAction::Deny);
    assert!(web.spec.rules[0].from.is_empty() && web.spec.rules[0].ports.is_empty());

    // Deleting a policy deletes what it compiled to.
    policies.delete("db-from-web", &Default::default()).await?;
    compiled(&client, DB, "db's compiled policy deleted", |p| p.is_none()).await?;

    let _ = stop_tx.send(());
    let _ = stop_tx2.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), compiler).await;
    ids.abort();
    Ok(())
}
