//! A real node (containerd, runc, CNI, kubelet; `tessera_tests::realnode`)
//! registered with the test API server runs a pod from a locally imported
//! image, and the pod answers TCP on its CNI address. As root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tessera_tests::realnode::RealNode;
use tessera_tests::{ControlPlane, eventually, resources};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_from_a_local_image_runs_on_the_real_node_and_answers() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let node = RealNode::start(&cp).await?;
    let client = cp.client().await?;
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: default}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  nodeName: {node_name}\n  automountServiceAccountToken: false\n\
             \x20 containers:\n  - name: web\n    image: {image}\n    imagePullPolicy: Never\n\
             \x20   args: [serve, \"8080\"]\n",
            node_name = tessera_tests::realnode::NODE_NAME,
            image = node.images().workload,
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ip = eventually("web Running with an address", || async {
        let pod = pods.get("web").await?;
        let status = pod.status.unwrap_or_default();
        Ok((status.phase.as_deref() == Some("Running"))
            .then_some(status.pod_ip)
            .flatten())
    })
    .await
    .with_context(|| {
        format!(
            "the node's logs are kept in {}",
            std::env::temp_dir()
                .join(tessera_tests::realnode::LOGS)
                .display()
        )
    })?;
    let mut answer = String::new();
    let mut conn = std::net::TcpStream::connect_timeout(
        &format!("{ip}:8080").parse()?,
        Duration::from_secs(5),
    )?;
    conn.read_to_string(&mut answer)?;
    assert_eq!(answer.trim(), "ok web");
    Ok(())
}
