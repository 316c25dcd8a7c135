//! SPIRE mode end to end, as root: a real spire-server for `cluster.test`
//! and a spire-agent for node-a (join token, its alias
//! `spiffe://cluster.test/tessera/node/node-a`) whose Delegated Identity API
//! authorizes the Tessera agent; the operator registers the pods' identities
//! (`--svid-source spire`) and `tessera-agent run --svid-source spire` gets
//! their SVIDs from the SPIRE agent and serves them on its Workload API. A
//! process in the pod's cgroup fetches an SVID issued by SPIRE's CA, with
//! SPIRE's bundle, and a JWT-SVID SPIRE signed (its own Workload API
//! validates it); once the pod is gone its entry goes too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::resources;
use tessera_tests::spire::{SpireAgent, SpireServer};

mod common;
use common::{PodCgroup, fetch_jwt, validate_jwt};

const DELEGATE: &str = "spiffe://cluster.test/tessera/agent/node-a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_a_spire_issued_svid_through_the_delegated_identity_api() {
    let bins = tessera_tests::TestBins::locate().unwrap();
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spire = SpireServer::start(
        &bins.spire_server,
        &dir.path().join("spire-server"),
        "cluster.test",
        "5s",
    )
    .await
    .unwrap();
    let spire_agent = SpireAgent::start(
        &bins.spire_agent,
        &dir.path().join("spire-agent"),
        &spire,
        "tessera/node/node-a",
        &[DELEGATE],
    )
    .await
    .unwrap();
    // The Tessera agent itself (root on this host) is a workload of the
    // SPIRE agent, with the delegate's SPIFFE ID.
    spire
        .create_entry(&spire_agent.id, DELEGATE, &["unix:uid:0"], &[])
        .unwrap();

    let signer_port = tessera_tests::free_port().unwrap();
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
    let _operator = common::Proc(
        tessera_tests::procs::operator_run(
            &tessera_tests::workspace_bin("tessera-operator").unwrap(),
            cp.kubeconfig(),
            "cluster.test",
        )
        .args(["--metrics-addr=127.0.0.1:0", "--lease-duration=3"])
        .arg(format!("--signer-addr=127.0.0.1:{signer_port}"))
        .arg("--svid-source=spire")
        .arg("--spire-server-socket")
        .arg(&spire.socket)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let builtin_pem = resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let token = resources::agent_token(&client, "node-a", TOKEN_AUDIENCE)
        .await
        .unwrap();
    let (_agent, socket) = common::spawn_agent_with(
        cp.kubeconfig(),
        "node-a",
        signer_port,
        &token,
        dir.path(),
        &[
            "--svid-source=spire".to_owned(),
            format!(
                "--spire-admin-socket={}",
                spire_agent.admin_socket.display()
            ),
        ],
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let web = tessera_tests::fixtures::PodBuilder::new("shop", "web")
        .node("node-a")
        .build();
    let web = pods.create(&PostParams::default(), &web).await.unwrap();
    let cgroup = PodCgroup::create("spire-web", web.metadata.uid.as_deref().unwrap());
    let out = dir.path().join("web");
    let socket_arg = socket.to_str().unwrap().to_owned();
    let out_arg = out.to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let (ok, text, err) = cgroup.run(
            &bins.spire_agent,
            &[
                "api",
                "fetch",
                "x509",
                "-socketPath",
                &socket_arg,
                "-write",
                &out_arg,
            ],
        );
        if ok {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no SVID within 60 s: {text}{err}\nspire-agent log:\n{}",
            spire_agent.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        text.contains("spiffe://cluster.test/ns/shop/sa/default"),
        "{text}"
    );
    // Issued by SPIRE: the bundle served is SPIRE's, not the operator's CA.
    let bundle = std::fs::read_to_string(out.join("bundle.0.pem")).unwrap();
    let spire_pem = spire.cli(&["bundle", "show"]).unwrap();
    assert_eq!(bundle.trim(), spire_pem.trim());
    assert_ne!(bundle.trim(), builtin_pem.trim());
    let verified = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.0.pem"))
        .arg(out.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");

    // JWT-SVIDs come from SPIRE too: the pod's token validates with SPIRE's
    // own Workload API (SPIRE's JWT authorities) and with Tessera's (which
    // follows them through the Delegated Identity API).
    let (token, jwt_bundles) = fetch_jwt(&bins.spire_agent, &socket, Some(&cgroup), "shop-api");
    assert_eq!(jwt_bundles, ["spiffe://cluster.test"]);
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &spire_agent.socket,
        None,
        "shop-api",
        &token,
    );
    assert!(
        ok && out.contains("SPIFFE ID : spiffe://cluster.test/ns/shop/sa/default"),
        "SPIRE must accept the token as its own:\n{out}"
    );
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &socket,
        Some(&cgroup),
        "shop-api",
        &token,
    );
    assert!(ok, "{out}");
    let (ok, out) = validate_jwt(
        &bins.spire_agent,
        &socket,
        Some(&cgroup),
        "elsewhere",
        &token,
    );
    assert!(!ok && out.contains("not valid"), "wrong audience:\n{out}");

    // The pod goes: so does its entry (and the agent's subscription).
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = spire.cli(&["entry", "show"]).unwrap();
        if !entries.contains("spiffe://cluster.test/ns/shop/sa/default") {
            break;
        }
        assert!(Instant::now() < deadline, "the entry stayed:\n{entries}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
