//! End to end, as root: a real API server; the operator's identity
//! controller, CA and signing service; the `tessera-agent run` process for
//! node-a with a node-bound token; and a client process inside a pod's
//! cgroup fetching its X.509-SVID over the Workload API. A pod on another node
//! gets nothing from node-a's agent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_operator::ca::authority::{CaConfig, TrustDomainCa};
use tessera_operator::ca::signer::{self, SignerConfig, SignerService};
use tessera_tests::resources;
use time::OffsetDateTime;

mod common;
use common::PodCgroup;

fn pod(name: &str, node: &str) -> Pod {
    tessera_tests::fixtures::PodBuilder::new("shop", name)
        .node(node)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_fetches_an_svid_signed_by_the_cluster_ca() {
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();

    // The operator's parts, in this process.
    let td: tessera_api::spiffe::TrustDomain = "cluster.test".parse().unwrap();
    let ca_cfg = CaConfig::new(td.clone(), "tessera-system");
    let now = OffsetDateTime::now_utc();
    let ca = TrustDomainCa::load_or_create(&client, &ca_cfg, now)
        .await
        .unwrap();
    ca.publish_bundle(&client, &ca_cfg, now).await.unwrap();
    let name = tessera_tests::procs::SIGNER_NAME.to_owned();
    let identity = signer::server_identity(&ca, &td, std::slice::from_ref(&name)).unwrap();
    let service = SignerService::new(
        client.clone(),
        SignerConfig {
            trust_domain: td.clone(),
            agent_username: "system:serviceaccount:tessera-system:tessera-agent".into(),
            svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
        },
        Arc::new(tokio::sync::RwLock::new(ca)),
    );
    let (addr, _signer) = signer::serve(
        "127.0.0.1:0".parse().unwrap(),
        service,
        identity,
        std::future::pending(),
    )
    .await
    .unwrap();
    let controller = tokio::spawn(tessera_operator::identity::controller::run(
        client.clone(),
        td,
        Default::default(),
        Duration::from_secs(30),
        None,
        std::future::pending(),
    ));

    // The agent for node-a, as a real process with a node-bound token.
    let token = resources::agent_token(&client, "node-a", TOKEN_AUDIENCE)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_agent, socket) =
        common::spawn_agent(cp.kubeconfig(), "node-a", addr.port(), &token, dir.path());

    // A pod on node-a, and a process in its cgroup.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let created = pods
        .create(&PostParams::default(), &pod("web", "node-a"))
        .await
        .unwrap();
    let cgroup = PodCgroup::create("e2e-web", created.metadata.uid.as_deref().unwrap());
    let out = common::first_fetch(&cgroup, &socket).await;
    assert!(
        out.contains("SPIFFE ID: spiffe://cluster.test/ns/shop/sa/default (chain of 1"),
        "{out}"
    );
    assert!(
        out.contains("bundle: cluster.test (1 authorities)"),
        "{out}"
    );

    // SPIRE's own client, which also verifies the SVID against the bundle.
    let spire_agent = tessera_tests::TestBins::locate().unwrap().spire_agent;
    let socket_arg = socket.to_str().unwrap();
    let output = cgroup
        .spawn(
            &spire_agent,
            &["api", "fetch", "x509", "-socketPath", socket_arg],
        )
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "spire-agent failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("SPIFFE ID:") && text.contains("spiffe://cluster.test/ns/shop/sa/default"),
        "{text}"
    );
    println!("spire-agent api fetch x509:\n{text}");

    // A pod on node-b gets nothing from node-a's agent, even once it has an identity.
    let other = pods
        .create(&PostParams::default(), &pod("elsewhere", "node-b"))
        .await
        .unwrap();
    resources::wait_for_pod_identity(&client, "shop", "elsewhere")
        .await
        .unwrap();
    let foreign = PodCgroup::create("e2e-elsewhere", other.metadata.uid.as_deref().unwrap());
    let output = foreign
        .spawn_client(&socket, &[])
        .wait_with_output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .to_lowercase()
            .contains("permission denied")
    );
    controller.abort();
}
