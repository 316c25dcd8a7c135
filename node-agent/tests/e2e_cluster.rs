//! End to end, as root, with every part a real process: etcd and
//! kube-apiserver, the `tessera-operator run` binary, and one `tessera-agent
//! run` per node (node-a and node-b) with node-bound tokens. Workloads are
//! processes in pod cgroups using real clients: `tessera-agent fetch-x509` /
//! `fetch-jwt` (the `spiffe` crate) and SPIRE's `spire-agent api`.
//!
//! Shows: each agent serves only its own node's pods; JWT-SVIDs are fetched,
//! validated by the agent and verified offline; and open Workload API streams
//! keep delivering valid, rotated SVIDs while the operator is killed and
//! restarted and while the API server is killed and restarted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::resources;

mod common;
use common::{PodCgroup, Proc, first_fetch};

/// X.509-SVID lifetime for this test: short, so rotations happen during it,
/// long enough that a held SVID outlives each outage (renewal at half-life).
const SVID_TTL: u64 = 30;

fn pod(name: &str, node: &str) -> Pod {
    tessera_tests::fixtures::PodBuilder::new("shop", name)
        .node(node)
        .build()
}

/// Lines a child prints, collected by a thread.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_jwt_and_restarts_of_operator_and_api_server() {
    let (mut cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();
    let signer_port = tessera_tests::free_port().unwrap();
    let mut operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    // Agents need the published bundle to trust the signer.
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for node in ["node-a", "node-b"] {
        let token = resources::agent_token(&client, node, TOKEN_AUDIENCE)
            .await
            .unwrap();
        let (agent, socket) =
            common::spawn_agent(cp.kubeconfig(), node, signer_port, &token, dir.path());
        agents.push(agent);
        sockets.push(socket);
    }
    let (socket_a, socket_b) = (&sockets[0], &sockets[1]);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let mut cgroups = Vec::new();
    for (name, node) in [("web-a", "node-a"), ("web-b", "node-b")] {
        let created = pods
            .create(&PostParams::default(), &pod(name, node))
            .await
            .unwrap();
        cgroups.push(PodCgroup::create(
            &format!("cluster-{name}"),
            created.metadata.uid.as_deref().unwrap(),
        ));
    }
    let (web_a, web_b) = (&cgroups[0], &cgroups[1]);

    // Each agent serves its own node's pod...
    let id = "spiffe://cluster.test/ns/shop/sa/default";
    assert!(first_fetch(web_a, socket_a).await.contains(id));
    assert!(first_fetch(web_b, socket_b).await.contains(id));
    // ...and not the other node's: node-a's agent never heard of web-b.
    let out = web_b
        .spawn_client(socket_a, &[])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success(), "node-a's agent served a node-b pod");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // JWT-SVIDs through the spiffe crate: fetched, validated by the agent
    // (ValidateJWTSVID) and verified offline against FetchJWTBundles.
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_tessera-agent"));
    let socket_arg = socket_a.to_str().unwrap();
    let (ok, out, err) = web_a.run(
        agent_bin,
        &[
            "fetch-jwt",
            "--socket",
            socket_arg,
            "--audience",
            "db",
            "--audience",
            "cache",
        ],
    );
    assert!(ok, "fetch-jwt failed:\n{out}\n{err}");
    assert!(out.contains(&format!("SPIFFE ID: {id}")), "{out}");
    assert!(
        out.contains("JWT bundle: cluster.test (has the token's key: true)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("validated by the agent: {id}")),
        "{out}"
    );
    assert!(out.contains(&format!("verified offline: {id}")), "{out}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_owned();

    // SPIRE's client: fetch and validate a JWT-SVID through the same socket.
    let spire_agent = tessera_tests::TestBins::locate().unwrap().spire_agent;
    let (ok, out, err) = web_a.run(
        &spire_agent,
        &[
            "api",
            "fetch",
            "jwt",
            "-audience",
            "db",
            "-socketPath",
            socket_arg,
        ],
    );
    assert!(
        ok && out.contains(id),
        "spire-agent api fetch jwt:\n{out}\n{err}"
    );
    let spire_validate = |audience: &str, token: &str| {
        web_a.run(
            &spire_agent,
            &[
                "api",
                "validate",
                "jwt",
                "-audience",
                audience,
                "-svid",
                token,
                "-socketPath",
                socket_arg,
            ],
        )
    };
    let (ok, out, err) = spire_validate("cache", &token);
    assert!(
        ok && out.contains(id),
        "spire-agent api validate jwt:\n{out}\n{err}"
    );
    // Wrong audience and a tampered token are refused.
    let (ok, out, err) = spire_validate("other", &token);
    assert!(!ok, "validated for the wrong audience:\n{out}");
    assert!(err.contains("audience"), "{err}");
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let (ok, out, err) = spire_validate("db", &forged);
    assert!(!ok, "a tampered token validated:\n{out}");
    assert!(err.contains("signature"), "{err}");

    // Open streams on web-a: the spiffe crate's (4 updates = 3 rotations)
    // and `spire-agent api watch`.
    let mut watcher = Proc(web_a.spawn_client(socket_a, &["--updates", "4"]));
    let updates = lines_of(&mut watcher.0);
    let mut spire_watch =
        Proc(web_a.spawn(&spire_agent, &["api", "watch", "-socketPath", socket_arg]));
    let spire_lines = lines_of(&mut spire_watch.0);
    let first = updates.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.starts_with("update 1: "), "{first}");

    // Kill the operator (no clean lease release) and start it again.
    drop(operator);
    tokio::time::sleep(Duration::from_secs(2)).await;
    operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    // Kill the API server, keep it down, start it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.restart_apiserver(Duration::from_secs(3)).await.unwrap();

    // The stream goes on: three rotations, each a new, still-valid leaf.
    let mut lines = vec![first];
    let deadline = Instant::now() + Duration::from_secs(5 * SVID_TTL);
    while lines.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        match updates.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("only {} updates arrived: {lines:?}", lines.len()),
        }
    }
    let mut leaves = Vec::new();
    for line in &lines {
        let after = line.split(" leaf ").nth(1).unwrap();
        let mut words = after.split(' ');
        leaves.push(words.next().unwrap().to_owned());
        let secs: i64 = words.nth(1).unwrap().trim_end_matches('s').parse().unwrap();
        assert!(secs > 0, "an expired SVID was served: {line}");
        assert!(line.contains(id), "{line}");
    }
    leaves.sort();
    leaves.dedup();
    assert_eq!(leaves.len(), 4, "a rotation repeated a leaf: {lines:?}");
    let status = watcher.0.wait().unwrap();
    assert!(
        status.success(),
        "the stream ended with an error after {lines:?}"
    );

    // spire-agent's watch saw the rotations as well.
    drop(spire_watch);
    let spire_out: Vec<String> = spire_lines.try_iter().collect();
    let received = spire_out
        .iter()
        .filter(|l| l.contains("Received") && l.contains("svid"))
        .count();
    assert!(
        received >= 2,
        "spire-agent api watch saw no rotation:\n{}",
        spire_out.join("\n")
    );

    // After both restarts, new work still flows: a new pod on node-b gets an
    // SVID, and web-a gets a JWT-SVID.
    let late = pods
        .create(&PostParams::default(), &pod("late", "node-b"))
        .await
        .unwrap();
    let late_cg = PodCgroup::create("cluster-late", late.metadata.uid.as_deref().unwrap());
    assert!(first_fetch(&late_cg, socket_b).await.contains(id));
    let (ok, out, err) = web_a.run(
        agent_bin,
        &[
            "fetch-jwt",
            "--socket",
            socket_arg,
            "--audience",
            "after-restart",
        ],
    );
    assert!(ok, "fetch-jwt after the restarts:\n{out}\n{err}");
    drop(operator);
    drop(agents);
}
