//! A real node (containerd, runc, CNI, kubelet, kube-proxy, the scheduler
//! and the controller manager; `tessera_tests::realnode`) registered with the
//! test API server: a pod from a locally imported image answers TCP at its
//! CNI address, and a Deployment's pod behind a Service answers another
//! pod through the Service's address. As root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use tessera_tests::realnode::{self, LOGS, NODE_NAME, RealNode};
use tessera_tests::{eventually, resources};

/// Where the node's logs are, for failures.
fn logs() -> String {
    format!(
        "the node's logs are kept in {}",
        std::env::temp_dir().join(LOGS).display()
    )
}

/// A pod that runs `workload <args>` once (no restart): its phase says how
/// it ended.
fn one_shot(name: &str, image: &str, args: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  restartPolicy: Never\n  automountServiceAccountToken: false\n\
         \x20 containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n\
         \x20   args: {args:?}\n"
    )
}

/// The phase `name` ends in: Succeeded or Failed.
async fn outcome(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(
        &format!("{name} to finish"),
        std::time::Duration::from_secs(20),
        || async {
            let phase = pods.get(name).await?.status.and_then(|s| s.phase);
            Ok(phase.filter(|p| p == "Succeeded" || p == "Failed"))
        },
    )
    .await
    .with_context(logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_from_local_images_and_reach_each_other_directly_and_through_a_service()
-> Result<()> {
    let cp = realnode::control_plane().await?;
    let node = RealNode::start(&cp).await?;
    let client = cp.client().await?;
    let image = &node.images().workload;
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  nodeName: {NODE_NAME}\n  automountServiceAccountToken: false\n\
             \x20 containers:\n  - name: web\n    image: {image}\n    imagePullPolicy: Never\n\
             \x20   args: [serve, \"8080\"]\n"
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ip = eventually(
        "web Running with an address",
        std::time::Duration::from_secs(20),
        || async {
            let status = pods.get("web").await?.status.unwrap_or_default();
            Ok((status.phase.as_deref() == Some("Running"))
                .then_some(status.pod_ip)
                .flatten())
        },
    )
    .await
    .with_context(logs)?;
    let mut answer = String::new();
    let addr = format!("{ip}:8080").parse()?;
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?
        .read_to_string(&mut answer)?;
    assert_eq!(answer.trim(), "ok web");

    // A Deployment (scheduled, its ReplicaSet made by the controller
    // manager) behind a Service (kube-proxy's rules).
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: db, namespace: default}}\n\
             spec:\n  replicas: 1\n  selector: {{matchLabels: {{app: db}}}}\n  template:\n\
             \x20   metadata: {{labels: {{app: db}}}}\n    spec:\n      automountServiceAccountToken: false\n\
             \x20     containers:\n      - name: db\n        image: {image}\n        imagePullPolicy: Never\n\
             \x20       args: [serve, \"5432\"]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: default}}\n\
             spec:\n  selector: {{app: db}}\n  ports: [{{port: 80, targetPort: 5432}}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: nobody, namespace: default}}\n\
             spec:\n  selector: {{app: nobody}}\n  ports: [{{port: 80, targetPort: 5432}}]\n"
        ),
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let address = |name: &'static str| {
        let services = services.clone();
        async move {
            let service = services.get(name).await?;
            service
                .spec
                .and_then(|s| s.cluster_ip)
                .context("no cluster IP")
        }
    };
    let (db, nobody) = (address("db").await?, address("nobody").await?);
    let db_pod = eventually(
        "db's pod Ready",
        std::time::Duration::from_secs(20),
        || async {
            let list = pods
                .list(&kube::api::ListParams::default().labels("app=db"))
                .await?;
            Ok(list.items.iter().find_map(|p| {
                let status = p.status.as_ref()?;
                let ready = status
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then(|| status.pod_ip.clone()).flatten()
            }))
        },
    )
    .await
    .with_context(logs)?;
    // kube-proxy programs the Service after the endpoints change; a client
    // started before that would find no rule (what the test checks is the
    // path through the rules, not how soon kube-proxy writes them).
    eventually(
        "kube-proxy's rules for db",
        std::time::Duration::from_secs(20),
        || async {
            let nat = realnode::iptables_rules("nat")?;
            Ok((nat.contains(&format!("-d {db}/32"))
                && nat.contains(&format!("--to-destination {db_pod}:5432")))
            .then_some(()))
        },
    )
    .await
    .with_context(logs)?;
    let to_db = format!("{db}:80");
    let to_nobody = format!("{nobody}:80");
    resources::apply_manifest(&client, &one_shot("to-db", image, &["connect", &to_db])).await?;
    resources::apply_manifest(
        &client,
        &one_shot("to-nobody", image, &["connect", &to_nobody]),
    )
    .await?;
    assert_eq!(outcome(&pods, "to-db").await?, "Succeeded");
    // A Service without endpoints: the same client fails.
    assert_eq!(outcome(&pods, "to-nobody").await?, "Failed");
    Ok(())
}
