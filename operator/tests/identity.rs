//! The identity controller against a real API server: pods get their default
//! or WorkloadIdentity-chosen SPIFFE ID and numeric identity as PodIdentity
//! records, a template that cannot render fails closed (no record),
//! identities no pod uses are released, and a restarted controller catches
//! up with what it missed (records of pods deleted meanwhile go too).
#![allow(clippy::expect_used)] // test helpers outside #[test] functions

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use tessera_api::crd::{
    NumericIdentity, PodIdentity, PodIdentitySpec, WorkloadIdentity, WorkloadIdentityStatus,
};
use tessera_operator::identity;
use tessera_tests::eventually;
use tessera_tests::fixtures::PodBuilder;
use tessera_tests::{ControlPlane, resources};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NS: &str = "shop";

/// How long the controller under test keeps an unused numeric identity.
const RELEASE_GRACE: Duration = Duration::from_secs(3);

struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Operator {
    fn start(client: kube::Client) -> Operator {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = identity::run(
                client,
                "cluster.test".parse().expect("td"),
                Default::default(),
                RELEASE_GRACE,
                None,
                shutdown,
            )
            .await
            {
                eprintln!("identity controller failed: {e}");
            }
        });
        Operator {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.task.abort();
    }
}

fn meta(name: &str, ns: Option<&str>, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}

async fn setup() -> Result<(ControlPlane, kube::Client)> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &Namespace {
                metadata: meta(NS, None, &[("team", "shop")]),
                ..Default::default()
            },
        )
        .await?;
    // No controller-manager runs, so service accounts are made by hand.
    for sa in ["default", "web-sa"] {
        Api::<ServiceAccount>::namespaced(client.clone(), NS)
            .create(
                &pp,
                &ServiceAccount {
                    metadata: meta(sa, Some(NS), &[]),
                    ..Default::default()
                },
            )
            .await?;
    }
    Ok((cp, client))
}

async fn create_pod(client: &kube::Client, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    PodBuilder::new(NS, name)
        .labels(labels)
        .service_account("web-sa")
        .node("node-a")
        .create(client)
        .await?;
    Ok(())
}

async fn create_wid(client: &kube::Client, name: &str, template: &str) -> Result<()> {
    let wid: WorkloadIdentity = serde_json::from_value(serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": name},
        "spec": {"spiffeIDTemplate": template, "podSelector": {"matchLabels": {"app": "web"}}}
    }))?;
    Api::<WorkloadIdentity>::all(client.clone())
        .create(&PostParams::default(), &wid)
        .await?;
    Ok(())
}

/// Waits until the pod's identity record (or its absence) satisfies
/// `want`, returning it.
async fn wait_pod(
    client: &kube::Client,
    name: &str,
    what: &str,
    want: impl Fn(Option<&PodIdentitySpec>) -> bool,
) -> Result<Option<PodIdentitySpec>> {
    eventually(
        &format!("pod {name}: {what}"),
        std::time::Duration::from_secs(20),
        || async {
            let r = resources::pod_identity(client, NS, name).await?;
            Ok(want(r.as_ref()).then_some(r))
        },
    )
    .await
}

/// Waits until the pod has an identity; returns it.
async fn identity_of(client: &kube::Client, name: &str) -> Result<PodIdentitySpec> {
    wait_pod(client, name, "identity", |r| r.is_some())
        .await?
        .context("identity")
}

fn spiffe_id(r: Option<&PodIdentitySpec>) -> Option<&str> {
    r.map(|r| r.spiffe_id.as_str())
}

fn pair(r: &PodIdentitySpec) -> (u32, i64) {
    (r.id, r.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_pod_keeps_the_numeric_identity_until_the_grace_ends() -> Result<()> {
    let (_cp, client) = setup().await?;
    let op = Operator::start(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let nids: Api<NumericIdentity> = Api::all(client.clone());
    let default_id = "spiffe://cluster.test/ns/shop/sa/web-sa";
    let held = || async {
        let live = nids.list(&ListParams::default()).await?;
        anyhow::Ok(live.items.iter().any(|n| n.spec.spiffe_id == default_id))
    };

    // A rolling update of a single pod: the old one goes, the new one comes.
    create_pod(&client, "old", &[]).await?;
    let old = identity_of(&client, "old").await?;
    pods.delete("old", &Default::default()).await?;
    create_pod(&client, "new", &[]).await?;
    let new = identity_of(&client, "new").await?;
    assert_eq!(
        pair(&new),
        pair(&old),
        "the replacement got a new numeric identity"
    );
    // Past the grace the replacement still holds it.
    tokio::time::sleep(RELEASE_GRACE + Duration::from_secs(1)).await;
    assert!(held().await?, "released while a pod uses it");
    let again = identity_of(&client, "new").await?;
    assert_eq!(pair(&again), pair(&old));

    // The last pod goes: kept during the grace, released after it.
    pods.delete("new", &Default::default()).await?;
    tokio::time::sleep(RELEASE_GRACE / 3).await;
    assert!(held().await?, "released before the grace ended");
    eventually(
        "release after the grace",
        std::time::Duration::from_secs(20),
        || async { Ok((!held().await?).then_some(())) },
    )
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_identities_that_follow_workload_identities() -> Result<()> {
    let (_cp, client) = setup().await?;
    let op = Operator::start(client.clone());

    // No WorkloadIdentity: the default ID from namespace and service account.
    create_pod(&client, "web-1", &[("app", "web")]).await?;
    let a = wait_pod(&client, "web-1", "default identity", |a| {
        spiffe_id(a) == Some("spiffe://cluster.test/ns/shop/sa/web-sa")
    })
    .await?
    .context("identity")?;
    assert_eq!(a.source, None);
    assert_eq!(
        (
            a.namespace.as_str(),
            a.pod_name.as_str(),
            a.node_name.as_str()
        ),
        (NS, "web-1", "node-a")
    );
    let default_pair = pair(&a);

    // A WorkloadIdentity selecting the pod takes over.
    create_wid(&client, "web", "spiffe://{trustDomain}/app/{podLabel:app}").await?;
    let a = wait_pod(
        &client,
        "web-1",
        "identity from WorkloadIdentity web",
        |a| spiffe_id(a) == Some("spiffe://cluster.test/app/web"),
    )
    .await?
    .context("identity")?;
    assert_eq!(a.source.as_deref(), Some("web"));
    assert_ne!(pair(&a), default_pair);

    // A second pod with the same SPIFFE ID shares its numeric identity.
    create_pod(&client, "web-2", &[("app", "web")]).await?;
    let b = identity_of(&client, "web-2").await?;
    assert_eq!(pair(&b), pair(&a));

    wait_status(&client, "web", "two pods, one identity", |s| {
        s.pods_selected == Some(2)
            && s.identities_rendered == Some(1)
            && ready(s) == Some(("True", "Rendered"))
    })
    .await?;

    // The default ID lost its last pod, so its numeric identity is released.
    let nids: Api<NumericIdentity> = Api::all(client.clone());
    eventually(
        "release of the default identity",
        std::time::Duration::from_secs(20),
        || async {
            let live = nids.list(&ListParams::default()).await?;
            Ok(live
                .items
                .iter()
                .all(|n| n.spec.spiffe_id != "spiffe://cluster.test/ns/shop/sa/web-sa")
                .then_some(()))
        },
    )
    .await?;

    // A WorkloadIdentity that wins (name order) but cannot render: fail closed.
    create_wid(
        &client,
        "a-needs-tier",
        "spiffe://{trustDomain}/tier/{podLabel:tier}",
    )
    .await?;
    // Fail closed: no record survives from the earlier assignment.
    wait_pod(&client, "web-1", "fail closed", |a| a.is_none()).await?;
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    eventually(
        "IdentityFailed and IdentityConflict events",
        std::time::Duration::from_secs(20),
        || async {
            let reasons: Vec<String> = events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|e| e.reason)
                .collect();
            Ok((reasons.iter().any(|r| r == "IdentityFailed")
                && reasons.iter().any(|r| r == "IdentityConflict"))
            .then_some(()))
        },
    )
    .await?;

    let failing = wait_status(&client, "a-needs-tier", "RenderFailed", |s| {
        ready(s) == Some(("False", "RenderFailed")) && s.pods_selected == Some(2)
    })
    .await?;
    let message = &failing.conditions[0].message;
    assert!(
        message.contains("2 pod(s)") && message.contains("no label \"tier\""),
        "{message}"
    );
    let loser = wait_status(&client, "web", "conflicts", |s| {
        ready(s) == Some(("True", "Conflicts"))
    })
    .await?;
    assert_eq!(loser.conflicts.len(), 2);
    assert_eq!(loser.conflicts[0].chosen, "a-needs-tier");
    assert_eq!(loser.conflicts[0].others, ["web"]);

    // Removing it restores the working identity.
    Api::<WorkloadIdentity>::all(client.clone())
        .delete("a-needs-tier", &DeleteParams::default())
        .await?;
    wait_pod(&client, "web-1", "identity restored", |a| {
        spiffe_id(a) == Some("spiffe://cluster.test/app/web")
    })
    .await?;
    wait_status(&client, "web", "conflicts gone", |s| {
        ready(s) == Some(("True", "Rendered"))
    })
    .await?;
    op.stop().await;
    Ok(())
}

fn ready(s: &WorkloadIdentityStatus) -> Option<(&str, &str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

async fn wait_status(
    client: &kube::Client,
    name: &str,
    what: &str,
    want: impl Fn(&WorkloadIdentityStatus) -> bool,
) -> Result<WorkloadIdentityStatus> {
    let wids: Api<WorkloadIdentity> = Api::all(client.clone());
    eventually(
        &format!("WorkloadIdentity {name}: {what}"),
        std::time::Duration::from_secs(20),
        || async {
            let wid = wids.get(name).await?;
            let generation = wid.metadata.generation;
            Ok(wid
                .status
                .filter(|s| s.observed_generation == generation && want(s)))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_catches_up() -> Result<()> {
    let (_cp, client) = setup().await?;
    let op = Operator::start(client.clone());
    create_pod(&client, "old", &[("app", "old")]).await?;
    let a = identity_of(&client, "old").await?;
    let generation = a.generation;
    op.stop().await;

    // While it is down: the pod goes away and a new one arrives.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.delete("old", &DeleteParams::default().grace_period(0))
        .await?;
    create_pod(&client, "new", &[("app", "new")]).await?;

    let op = Operator::start(client.clone());
    // Converged: the new pod names the one live allocation of its SPIFFE ID.
    let nids: Api<NumericIdentity> = Api::all(client.clone());
    let live = eventually(
        "the new pod to hold the live allocation",
        std::time::Duration::from_secs(20),
        || async {
            let held = resources::pod_identity(&client, NS, "new")
                .await?
                .map(|r| pair(&r));
            let live = nids.list(&ListParams::default()).await?.items;
            Ok(match (held, live.as_slice()) {
                (Some(pair), [only]) if pair == (only.spec.id, only.spec.generation) => {
                    Some(only.spec.clone())
                }
                _ => None,
            })
        },
    )
    .await?;
    assert_eq!(live.spiffe_id, "spiffe://cluster.test/ns/shop/sa/web-sa");
    assert!(live.generation >= generation);
    // The deleted pod's record went too (it was deleted while nobody watched).
    let records: Api<PodIdentity> = Api::all(client.clone());
    eventually(
        "the deleted pod's record to go",
        std::time::Duration::from_secs(20),
        || async { Ok(records.get_opt(&a.pod_uid).await?.is_none().then_some(())) },
    )
    .await?;
    op.stop().await;
    Ok(())
}
