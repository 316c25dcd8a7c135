//! Mutual authentication in the data path, end to end, as root: etcd and
//! kube-apiserver, `tessera-operator run`, and one `tessera-agent run
//! --cgroup-root ...` per simulated node with real eBPF programs attached to
//! the node's cgroup. Pods are network namespaces on one bridge
//! (198.18.0.0/15) with a cgroup each; their traffic is real TCP from
//! Python's socket module.
//!
//! Shows: an allowed, authenticated pair connects on the first try; a pair
//! no policy allows fails at connect(); a peer without an SVID (its node has
//! no agent) is refused at the destination; removing the allowing policy
//! stops new connections within 1 s, and established connections end
//! within 1 s of losing their allow, their peer or their CA while others
//! carry on; a pod that takes over a deleted pod's
//! address with another identity inherits nothing; enforcement goes on
//! while an agent is down, which after a restart repeats no handshake; and
//! short-lived SVIDs rotate without a single failed connection. Also: what
//! floods of idle connections cost the agent, and that restored
//! authentications are only ever the agent's own, capped by its SVIDs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use tessera_agent::datapath::authcache::Entry;
use tessera_agent::svid::trust::{BUNDLE_CONFIGMAP, BUNDLE_KEY};
use tessera_tests::cluster::{AgentLaunch, PodSpec, SimCluster, SimPod};
use tessera_tests::resources;

mod common;

const PORT: u16 = 5432;
/// X.509-SVID lifetime: short, so SVIDs rotate (at half-life) during the test.
const SVID_TTL: u64 = 30;
/// Creates pod `name` in `shop` (label `app`, service account `sa`) on
/// `node` with `ip`, with a TCP server on [`PORT`].
async fn pod(
    cluster: &SimCluster,
    name: &str,
    app: &str,
    sa: &str,
    node: &str,
    ip: &str,
) -> SimPod {
    cluster
        .pod(
            PodSpec {
                namespace: "shop",
                name,
                labels: &[("app", app)],
                service_account: sa,
                node,
                ip,
                ..Default::default()
            },
            Some(PORT),
        )
        .await
}

/// `target` accepts [`PORT`] from `from`, with mutual authentication.
async fn policy(cluster: &SimCluster, name: &str, target: &str, from: &str) {
    resources::apply_manifest(
        &cluster.client,
        &format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: {target}}}}}\n  rules:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{port: {PORT}}}]\n"
        ),
    )
    .await
    .unwrap();
}

fn ok(out: &str) -> bool {
    out.starts_with("ok ")
}

/// Whether a connection that needs an authentication the agents cannot
/// make was stopped at its source: refused at connect() (EPERM, once the
/// handshake failed), ended while it waited for it (ECONNABORTED), or
/// still waiting when the client gave up; never answered by the peer.
fn stopped_at_source(out: &str) -> bool {
    out.starts_with("errno 1 ") || out.starts_with("errno 103 ") || out.starts_with("timeout ")
}

/// Retries a connection until it succeeds (pre-authentication may still be
/// under way): the first success's output and the attempts it took.
async fn until_ok(from: &SimPod, ip: &str) -> (String, usize) {
    for attempt in 1..=100 {
        let out = from.connect(ip, PORT);
        if ok(&out) {
            return (out, attempt);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{} never reached {ip}", from.name);
}

/// The tests of this file share the simulated topology's names and
/// addresses: one at a time.
static TOPOLOGY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Values Tessera once took from pod annotations: a pod author writes
/// web's onto pods whose own identity assigns (app=other) or fails
/// (app=forger). Neither reaches db, whose policy admits only web.
async fn forged_identity_is_refused(cluster: &SimCluster, db: &SimPod) {
    let web_id = "spiffe://cluster.test/ns/shop/sa/web";
    let number = Api::<tessera_api::crd::NumericIdentity>::all(cluster.client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|n| n.spec.spiffe_id == web_id)
        .map(|n| format!("{}/{}", n.spec.id, n.spec.generation))
        .unwrap();
    let forged = serde_json::json!({"metadata": {"annotations": {
        "tessera.dev/spiffe-id": web_id,
        "tessera.dev/identity": number,
        "tessera.dev/identity-source": "default"}}});
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), "shop");
    let forgers = [
        pod(
            cluster,
            "forger",
            "forger",
            "other",
            "node-a",
            "198.18.1.12",
        )
        .await,
        pod(
            cluster,
            "borrower",
            "other",
            "other",
            "node-a",
            "198.18.1.13",
        )
        .await,
    ];
    for forger in &forgers {
        pods.patch(
            &forger.name,
            &PatchParams::default(),
            &Patch::Merge(&forged),
        )
        .await
        .unwrap();
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for forger in &forgers {
            let out = forger.connect(&db.ip, PORT);
            assert!(
                !ok(&out),
                "{} -> db with web's forged identity: {out}",
                forger.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The mutual-authentication scenario's pods and policies, and its first
/// checks: web (node-a) may reach db (node-b) with mutual authentication
/// and does on the first try; other -> db is refused by connect(); a pod
/// claiming web's identity on node-c (no agent, so no SVID) is refused at
/// db's node. Returns web, other and db.
async fn authenticated_pair(cluster: &SimCluster) -> (SimPod, SimPod, SimPod) {
    let web = pod(cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let other = pod(cluster, "other", "other", "other", "node-a", "198.18.1.11").await;
    let db = pod(cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    policy(cluster, "db-from-web", "db", "web").await;
    policy(cluster, "db-from-monitor", "db", "monitor").await;
    // Converged once both agents recorded the pair (pre-authentication).
    cluster.agents[0]
        .wait_for("spiffe://cluster.test/ns/shop/sa/db", 1)
        .await;
    cluster.agents[0].wait_for("authenticated", 1).await;
    cluster.agents[1]
        .wait_for("authenticated (answered)", 1)
        .await;

    // Allowed pair: first try.
    let first = web.connect(&db.ip, PORT);
    assert!(ok(&first) && first.ends_with(" db"), "web -> db: {first}");
    // No policy allows other -> db: refused by connect() itself (EPERM).
    let out = other.connect(&db.ip, PORT);
    assert!(out.starts_with("errno 1 "), "other -> db: {out}");
    // A pod claiming web's identity on a node without an agent has no SVID:
    // nobody can authenticate it, and db's node drops its connection.
    let intruder = pod(cluster, "intruder", "web", "web", "node-c", "198.18.3.10").await;
    let out = intruder.connect(&db.ip, PORT);
    assert!(!ok(&out), "intruder -> db: {out}");
    forged_identity_is_refused(cluster, &db).await;
    (web, other, db)
}

/// Identity confusion: db goes, and cache takes its address on node-c (no
/// agent: nobody can authenticate it). web's authentication with db does
/// not carry over to the new owner of the address.
async fn no_inherited_authentication(cluster: &SimCluster, web: &SimPod, mut db: SimPod) {
    policy(cluster, "cache-from-web", "cache", "web").await;
    let ip = db.ip.clone();
    cluster.delete_pod(&mut db).await;
    let cache = pod(cluster, "cache", "cache", "cache", "node-c", &ip).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let out = web.connect(&cache.ip, PORT);
        assert!(
            stopped_at_source(&out),
            "web -> cache at db's old address: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_pairs_connect_and_nothing_else_does() {
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (mut cluster, token_files) = common::cluster_with_agents(&client, &launch).await;
    let (web, other, db) = authenticated_pair(&cluster).await;
    // The agents' metrics tell the same story (decisions are read from the
    // kernel's counters at most a second late).
    for (agent, sample) in [
        (
            0,
            r#"tessera_agent_handshakes_total{role="initiator",result="ok"}"#,
        ),
        (
            1,
            r#"tessera_agent_handshakes_total{role="responder",result="ok"}"#,
        ),
        (
            0,
            r#"tessera_agent_datapath_decisions_total{reason="allow_authenticated"}"#,
        ),
        (
            0,
            r#"tessera_agent_datapath_decisions_total{reason="deny_default"}"#,
        ),
        (
            1,
            r#"tessera_agent_datapath_decisions_total{reason="allow_authenticated"}"#,
        ),
        (0, "tessera_agent_datapath_in_sync"),
        (0, "tessera_agent_local_identities"),
    ] {
        let agent = &cluster.agents[agent];
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.metric(sample).unwrap_or(0.0) < 1.0 {
            assert!(
                Instant::now() < deadline,
                "{}'s {sample} is {:?}, not >= 1",
                agent.node,
                agent.metric(sample)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let port = cluster.agents[0].metrics_port().unwrap();
    assert_eq!(tessera_tests::http_get(port, "/readyz").unwrap().0, 200);
    settled_agents_write_nothing(&cluster).await;

    // Enforcement while node-a's agent is down (killed: no cleanup at all).
    let handshakes_before = cluster.agents[0].count("authenticated");
    let killed = cluster.agents.remove(0);
    drop(killed);
    assert!(
        ok(&web.connect(&db.ip, PORT)),
        "web -> db with node-a's agent down"
    );
    assert!(
        other.connect(&db.ip, PORT).starts_with("errno 1 "),
        "other -> db with the agent down"
    );
    // Restarted, it restores the auth map from its cache: no new handshake.
    cluster.start_agent(&launch, "node-a", &token_files[0]);
    let restarted = cluster.agent("node-a");
    restarted.wait_for("data path in sync", 1).await;
    assert_eq!(
        restarted.count("restored=1"),
        1,
        "the valid entry is restored"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        ok(&web.connect(&db.ip, PORT)),
        "web -> db after the restart"
    );
    assert_eq!(
        restarted.count("authenticated"),
        0,
        "a handshake was repeated after the restart ({handshakes_before} before)"
    );
    // node-a's agent is last now.
    cluster.agents.rotate_right(1);

    // Removing the allowing policy stops new connections within 1 s.
    let policies: Api<tessera_api::crd::AuthPolicy> = Api::namespaced(client.clone(), "shop");
    policies
        .delete("db-from-web", &Default::default())
        .await
        .unwrap();
    let removed = Instant::now();
    loop {
        let out = web.connect(&db.ip, PORT);
        if !ok(&out) {
            assert!(out.starts_with("errno 1 "), "{out}");
            break;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "still allowed 5 s after deletion"
        );
    }
    let took = removed.elapsed();
    println!("policy deletion enforced after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    policy(&cluster, "db-from-web", "db", "web").await;
    let (_, attempts) = until_ok(&web, &db.ip).await;
    println!("web -> db allowed again after {attempts} attempt(s)");

    // Across SVID rotations (renewal at half-life) and expiries the pair is
    // re-authenticated ahead of time: not one connection fails meanwhile.
    let renewals_before = cluster.agents[0].count("authenticated local=");
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(SVID_TTL + 5) {
        let out = web.connect(&db.ip, PORT);
        attempts += 1;
        assert!(
            ok(&out),
            "web -> db failed {:?} into the rotation phase: {out}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewals = cluster.agents[0].count("authenticated local=") - renewals_before;
    println!("{attempts} connections across {renewals} re-authentication(s), none failed");
    assert!(
        renewals >= 1,
        "no re-authentication within {} s of {SVID_TTL} s SVIDs",
        SVID_TTL + 5
    );

    // A CA joining the bundle revokes nothing; the CA that signed every SVID
    // leaving it revokes every authentication at once (the agents bump the
    // epoch), and no new one can be made until it is back.
    let bundles: Api<ConfigMap> = Api::namespaced(client.clone(), tessera_tests::procs::NAMESPACE);
    let original = bundles
        .get(BUNDLE_CONFIGMAP)
        .await
        .unwrap()
        .data
        .and_then(|d| d.get(BUNDLE_KEY).cloned())
        .unwrap();
    let foreign = foreign_ca_pem();
    let updated = "own trust bundle updated";
    let seen: Vec<usize> = cluster.agents.iter().map(|a| a.count(updated)).collect();
    set_bundle(&bundles, &format!("{original}{foreign}")).await;
    for (agent, seen) in cluster.agents.iter().zip(seen) {
        agent.wait_for(updated, seen + 1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ok(&web.connect(&db.ip, PORT)),
        "web -> db after a CA joined the bundle"
    );
    let revoked = "a CA left the trust bundles";
    for agent in &cluster.agents {
        assert_eq!(
            agent.count(revoked),
            0,
            "a CA joining revoked on {}",
            agent.node
        );
    }
    set_bundle(&bundles, &foreign).await;
    for agent in &cluster.agents {
        agent.wait_for(revoked, 1).await;
    }
    // Nothing gets through meanwhile: each connection is either refused at
    // connect() (the pair's last handshake failed) or held for the retry
    // and ended when that fails too.
    let left = Instant::now();
    while left.elapsed() < Duration::from_secs(3) {
        let out = web.connect(&db.ip, PORT);
        assert!(
            stopped_at_source(&out),
            "web -> db {:?} after its CA left the bundle: {out}",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Right after a failed retry, connections wait for the next one no
    // more: connect() is refused at once (for RETRY_AFTER).
    let node_a = cluster.agent("node-a");
    let failed = "until it is retried local=spiffe://cluster.test/ns/shop/sa/web \
                  remote=spiffe://cluster.test/ns/shop/sa/db ";
    let failures = node_a.count(failed);
    node_a.wait_for(failed, failures + 1).await;
    let out = web.connect(&db.ip, PORT);
    assert!(
        out.starts_with("errno 1 "),
        "web -> db right after node-a logged a failed handshake for the pair: {out}"
    );
    set_bundle(&bundles, &original).await;
    let (_, attempts) = until_ok(&web, &db.ip).await;
    println!("web -> db allowed again {attempts} attempt(s) after the CA came back");

    no_inherited_authentication(&cluster, &web, db).await;
    drop(cluster);
    drop(cp);
}

/// The same mutual authentication with SVIDs from SPIRE: a real
/// spire-server for cluster.test, a spire-agent per node (join token, alias
/// `spiffe://cluster.test/tessera/node/<node>`) whose Delegated Identity
/// API authorizes that node's Tessera agent, the operator registering the
/// identities (`--svid-source spire`) and the agents getting the SVIDs from
/// their SPIRE agent; the handshakes verify them against SPIRE's bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_pairs_connect_with_spire_issued_svids() {
    use tessera_tests::spire::{SpireAgent, SpireServer};
    let _one_at_a_time = TOPOLOGY.lock().await;
    let bins = tessera_tests::TestBins::locate().unwrap();
    let (cp, client) = common::control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let spire = SpireServer::start(
        &bins.spire_server,
        &dir.path().join("spire-server"),
        "cluster.test",
        "5s",
    )
    .await
    .unwrap();
    let mut spire_agents = Vec::new();
    let mut extra = Vec::new();
    for node in ["node-a", "node-b"] {
        let delegate = format!("spiffe://cluster.test/tessera/agent/{node}");
        let agent = SpireAgent::start(
            &bins.spire_agent,
            &dir.path().join(format!("spire-agent-{node}")),
            &spire,
            &format!("tessera/node/{node}"),
            &[delegate.as_str()],
        )
        .await
        .unwrap();
        // The Tessera agent (root here) is the SPIRE agent's delegate.
        spire
            .create_entry(&agent.id, &delegate, &["unix:uid:0"], &[])
            .unwrap();
        extra.push((
            node.to_owned(),
            vec![
                "--svid-source=spire".to_owned(),
                format!("--spire-admin-socket={}", agent.admin_socket.display()),
            ],
        ));
        spire_agents.push(agent);
    }
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator_with(
        cp.kubeconfig(),
        signer_port,
        SVID_TTL,
        &[
            "--svid-source=spire".to_owned(),
            format!("--spire-server-socket={}", spire.socket.display()),
        ],
    );
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, extra);
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let (web, _other, db) = authenticated_pair(&cluster).await;
    for agent in &cluster.agents {
        assert!(
            agent.count("X.509-SVID received from the SPIRE agent") >= 1,
            "{} got no SVID from SPIRE",
            agent.node
        );
        assert_eq!(
            agent.count("X.509-SVID issued"),
            0,
            "{} asked the operator's signer",
            agent.node
        );
    }
    no_inherited_authentication(&cluster, &web, db).await;
    drop(cluster);
    drop(spire_agents);
    drop(cp);
}

/// A CA of nobody's: a self-signed P-256 CA certificate, PEM.
fn foreign_ca_pem() -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

/// Replaces the trust bundle the agents follow (as an administrator would
/// by hand; the operator republishes it only when it rotates its CA).
async fn set_bundle(maps: &Api<ConfigMap>, pem: &str) {
    let patch = serde_json::json!({ "data": { BUNDLE_KEY: pem } });
    maps.patch(
        BUNDLE_CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

/// Open descriptors of process `pid`.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Idle connections a flood holds: this many, by four helper processes
/// (each within the machine's per-process descriptor limit).
const FLOOD: usize = 20_000;

/// Opens [`FLOOD`] idle connections to `host:port`, from network namespace
/// `netns` (this one if `None`), and holds them until dropped.
fn hold_connections(
    netns: Option<&str>,
    host: &str,
    port: u16,
) -> Vec<tessera_tests::procs::KillOnDrop> {
    let hold = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
print("ready", flush=True)
sys.stdin.read()
"#;
    let share = (FLOOD / 4).to_string();
    let port = port.to_string();
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut command = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => std::process::Command::new("python3"),
        };
        let mut child = command
            .args(["-c", hold, host, &port, &share])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "a holder could not open its connections"
        );
        holders.push(tessera_tests::procs::KillOnDrop(child));
    }
    holders
}

/// While a flood is held: the Workload API answers within 100 ms, and a
/// process of pod `web` still gets its SVID.
async fn workload_api_still_answers(socket: &Path, web: &SimPod) {
    for _ in 0..20 {
        let asked = Instant::now();
        let channel = common::workload_api_channel(socket).await;
        let answer = common::fetch_x509_once(channel).await;
        let took = asked.elapsed();
        assert_eq!(
            answer.unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "this test process is in no pod"
        );
        assert!(took < Duration::from_millis(100), "answered after {took:?}");
    }
    let client_bin = env!("CARGO_BIN_EXE_tessera-agent");
    let out = tessera_tests::netns::spawn_in_cgroup(
        &web.cgroup.0,
        None,
        client_bin,
        &["fetch-x509", "--socket", socket.to_str().unwrap()],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .contains("spiffe://cluster.test/ns/shop/sa/web"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Floods of idle connections, first to the agent's handshake port, then
/// to a port whose external peers the agent terminates TLS for: each time
/// the agent's descriptors stay within one peer's share, the Workload API
/// answers at once, and the connections admitted are at most a peer's
/// share per handshake timeout (admitted ones give their slot back when
/// it expires).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_idle_connections_cost_the_agent_little() {
    use tessera_agent::mesh::limits::{EXTERNAL_PER_PEER, HANDSHAKES_PER_PEER};
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let socket = dir.path().join("node-a.sock");
    let agent = cluster.agent("node-a");
    let pid = agent.proc.0.id();
    let capped = || {
        agent
            .metric("tessera_agent_connections_capped_total")
            .unwrap_or(0.0)
    };

    // The handshake port, from the host.
    let before = open_files(pid);
    let started = Instant::now();
    let holders = hold_connections(None, "198.18.0.1", 4434);
    println!("{FLOOD} idle connections opened in {:?}", started.elapsed());
    let during = open_files(pid);
    println!("handshake port: agent descriptors {before} before, {during} with them held");
    assert!(
        during <= before + HANDSHAKES_PER_PEER + 16,
        "the agent holds {during} descriptors ({before} before)"
    );
    workload_api_still_answers(&socket, &web).await;
    let rounds = started.elapsed().as_secs_f64()
        / tessera_agent::mesh::handshake::HANDSHAKE_TIMEOUT.as_secs_f64()
        + 2.0;
    let admitted = FLOOD as f64 - capped();
    println!("handshake port: {admitted} connections admitted");
    assert!(
        admitted <= HANDSHAKES_PER_PEER as f64 * rounds,
        "{admitted} connections were admitted"
    );
    drop(holders);

    // A terminated port, from outside the mesh.
    resources::apply_manifest(
        &client,
        &format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: web-external, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{spiffeIDs: [\"spiffe://b.test/client\"]}}]\n    ports: [{{port: {PORT}}}]\n    externalPeers: TerminateTLS\n"
        ),
    )
    .await
    .unwrap();
    agent.wait_for("terminating TLS of external peers", 1).await;
    let outside = cluster.outside("198.18.9.10");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = open_files(pid);
    let capped_before = capped();
    let started = Instant::now();
    let holders = hold_connections(Some(&outside), &web.ip, PORT);
    println!("{FLOOD} idle connections opened in {:?}", started.elapsed());
    let during = open_files(pid);
    println!("terminated port: agent descriptors {before} before, {during} with them held");
    assert!(
        during <= before + EXTERNAL_PER_PEER + 16,
        "the agent holds {during} descriptors ({before} before)"
    );
    workload_api_still_answers(&socket, &web).await;
    let rounds = started.elapsed().as_secs_f64()
        / tessera_agent::mesh::external::HANDSHAKE_TIMEOUT.as_secs_f64()
        + 2.0;
    let admitted = FLOOD as f64 - (capped() - capped_before);
    println!("terminated port: {admitted} connections admitted");
    assert!(
        admitted <= EXTERNAL_PER_PEER as f64 * rounds,
        "{admitted} connections were admitted"
    );
    drop(holders);
}

/// With nothing changing, an agent's passes (one a second) write nothing
/// to the maps: every write moves the inputs version on, which voids every
/// cached verdict and sweeps the established connections of every local
/// pod. Renewals of authentications may move it on now and then (SVIDs of
/// 30 s), so some span of three passes without a write is enough.
async fn settled_agents_write_nothing(cluster: &SimCluster) {
    for node in ["node-a", "node-b"] {
        let mut dp = pinned(cluster, node);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = dp.inputs_version().unwrap();
            tokio::time::sleep(Duration::from_millis(3500)).await;
            let after = dp.inputs_version().unwrap();
            if after == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{node}'s agent moves the inputs version on every few passes with nothing changing ({before} -> {after})"
            );
        }
    }
}

/// `node`'s agent's pinned data path, opened in this process (its live maps).
fn pinned(cluster: &SimCluster, node: &str) -> tessera_bpf::datapath::Datapath {
    let dir = tessera_bpf::pinning::version_dir(&cluster.pin_root(node));
    tessera_bpf::datapath::Datapath::open(Some(&dir)).unwrap()
}

/// What the test reads from node-b's pinned maps while its agent is down:
/// the auth cache's MAC key and the endpoints of `db` and `intruder`.
fn pinned_state(cluster: &SimCluster, db: &SimPod, intruder: &SimPod) -> ([u8; 32], Entry) {
    let mut dp = pinned(cluster, "node-b");
    let local = dp.endpoint_ip(db.ip.parse().unwrap()).unwrap().unwrap();
    let remote = dp
        .endpoint_ip(intruder.ip.parse().unwrap())
        .unwrap()
        .unwrap();
    let now = tessera_agent::clock::unix_now();
    // db accepting web's identity from node-c, where no agent could have
    // authenticated it: current generations, a year ahead.
    let forged = Entry {
        key: tessera_bpf::abi::AuthKey {
            local: local.id,
            remote: remote.id,
            remote_node: remote.node,
            pad: 0,
        },
        local_gen: local.gen_,
        remote_gen: remote.gen_,
        not_after: now + 365 * 24 * 3600,
        made: now,
        local_id: "spiffe://cluster.test/ns/shop/sa/db".into(),
        remote_id: "spiffe://cluster.test/ns/shop/sa/web".into(),
        remote_node: "node-c".into(),
    };
    (dp.cache_key().unwrap(), forged)
}

/// How long the auth entry under `key` in node-b's pinned map has left,
/// if it is there.
fn auth_left(cluster: &SimCluster, key: &tessera_bpf::abi::AuthKey) -> Option<Duration> {
    let mut dp = pinned(cluster, "node-b");
    let now = tessera_bpf::monotonic_ns();
    dp.auths()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| Duration::from_nanos(v.expires_ns.saturating_sub(now)))
}

/// Stops node-b's agent (the last one).
fn stop_node_b(cluster: &mut SimCluster) {
    let stopped = cluster.agents.pop().unwrap();
    assert_eq!(stopped.node, "node-b");
    drop(stopped);
}

/// Starts node-b's agent again and waits until its data path is in sync.
async fn start_node_b(cluster: &mut SimCluster, launch: &AgentLaunch, token_file: &Path) {
    cluster.start_agent(launch, "node-b", token_file);
    cluster
        .agent("node-b")
        .wait_for("data path in sync", 1)
        .await;
}

/// The auth cache as an attacker who can write the agent's state
/// directory would use it, against a real agent restarted on it: db
/// (node-b) admits web's identity only with an authentication, and a pod
/// claiming web's identity on node-c (no agent) has none. A record for it
/// with current generations and a year to run, MACed under any key but the
/// agent's, is not restored; a cache sled cannot read is discarded and the
/// agent starts with none restored; and a record sealed with the agent's
/// own key (taken from its pinned map: root's power, beyond the state
/// directory) counts no longer than the SVID the agent holds for db.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_authentications_are_the_agents_own_and_end_with_its_svids() {
    use tessera_agent::datapath::authcache::{AuthCache, MacKey};
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (mut cluster, token_files) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    let intruder = pod(&cluster, "intruder", "web", "web", "node-c", "198.18.3.10").await;
    policy(&cluster, "db-from-web", "db", "web").await;
    until_ok(&web, &db.ip).await;
    let refused = |why: &str| {
        for _ in 0..3 {
            let out = intruder.connect(&db.ip, PORT);
            assert!(!ok(&out), "intruder -> db {why}: {out}");
        }
    };
    // db's policy is in node-b's maps once the intruder is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok(&intruder.connect(&db.ip, PORT)) {
        assert!(Instant::now() < deadline, "db's policy never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused("before any tampering");

    let cache_dir = launch.dir.join("node-b").join("authcache");

    // 1. Forged under a key of the attacker's choosing.
    stop_node_b(&mut cluster);
    let (agents_key, forged) = pinned_state(&cluster, &db, &intruder);
    {
        let (forger, _) = AuthCache::open(&cache_dir, &MacKey::new(&[7; 32])).unwrap();
        forger.put(&forged).unwrap();
        forger.flush().unwrap();
    }
    start_node_b(&mut cluster, &launch, &token_files[1]).await;
    refused("after a forged record");
    assert_eq!(auth_left(&cluster, &forged.key), None);
    let agent = cluster.agent("node-b");
    assert_eq!(agent.count("restored=0"), 1, "nothing is restored");
    agent.wait_for("MAC does not match", 1).await;
    until_ok(&web, &db.ip).await;

    // 2. A cache sled cannot open: discarded, none restored, the agent runs.
    stop_node_b(&mut cluster);
    std::fs::remove_dir_all(&cache_dir).unwrap();
    std::fs::write(&cache_dir, b"not a sled store").unwrap();
    start_node_b(&mut cluster, &launch, &token_files[1]).await;
    let agent = cluster.agent("node-b");
    assert_eq!(agent.count("restored=0"), 1, "nothing is restored");
    agent
        .wait_for("the auth cache was damaged and is rebuilt", 1)
        .await;
    until_ok(&web, &db.ip).await;

    // 3. Sealed with the agent's own key: restored, but capped by the SVID
    // the agent holds for db (SVID_TTL), not a year.
    stop_node_b(&mut cluster);
    {
        let (cache, _) = AuthCache::open(&cache_dir, &MacKey::new(&agents_key)).unwrap();
        cache.put(&forged).unwrap();
        cache.flush().unwrap();
    }
    start_node_b(&mut cluster, &launch, &token_files[1]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = auth_left(&cluster, &forged.key).expect("restored");
        if left <= Duration::from_secs(SVID_TTL) {
            println!("the restored entry has {left:?} left");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a restored entry still has {left:?} left 10 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
        .agent("node-b")
        .wait_for("restored authentications capped by the SVIDs now held", 1)
        .await;
}

/// A dual-stack pod in `shop` on `node` with a TCP server on [`PORT`].
async fn dual_stack_pod(
    cluster: &SimCluster,
    name: &str,
    node: &str,
    ip: &str,
    ip6: &str,
) -> SimPod {
    cluster
        .pod(
            PodSpec {
                namespace: "shop",
                name,
                labels: &[("app", name)],
                service_account: name,
                node,
                ip,
                ip6: Some(ip6),
                ..Default::default()
            },
            Some(PORT),
        )
        .await
}

/// Every address of a dual-stack pod is checked: a pod its policy does
/// not admit reaches it on neither family (its IPv6 address was once
/// unmapped, so unmanaged and open), the admitted one on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_pod_is_protected_on_both_families() {
    use tessera_tests::netns::IPV6_PREFIX;
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let v6 = |host: &str| format!("{IPV6_PREFIX}::{host}");
    let web = dual_stack_pod(&cluster, "web", "node-a", "198.18.1.10", &v6("1:10")).await;
    let other = dual_stack_pod(&cluster, "other", "node-a", "198.18.1.11", &v6("1:11")).await;
    let db = dual_stack_pod(&cluster, "db", "node-b", "198.18.2.10", &v6("2:10")).await;
    policy(&cluster, "db-from-web", "db", "web").await;
    let db6 = db.ip6.clone().unwrap();
    // Allowed on both families (each retried while pre-authentication
    // finishes).
    let (out, _) = until_ok(&web, &db.ip).await;
    assert!(out.ends_with(" db"), "{out}");
    let (out, _) = until_ok(&web, &db6).await;
    assert!(out.ends_with(" db"), "web -> db over IPv6: {out}");
    // Refused on both.
    for ip in [&db.ip, &db6] {
        for _ in 0..3 {
            let out = other.connect(ip, PORT);
            assert!(!ok(&out), "other -> db at {ip}: {out}");
        }
    }
    // The ingress check alone (the connecting process in no pod's cgroup,
    // so no egress gate: a host outside the mesh) refuses it on both too.
    let outside4 = cluster.outside("198.18.9.9");
    let outside6 = cluster.outside(&v6("9:9"));
    for (outside, ip) in [(&outside4, &db.ip), (&outside6, &db6)] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", outside, "python3", "-c"])
            .args([tessera_tests::netns::CLIENT, ip, &PORT.to_string(), "1.5"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!ok(&out), "outside -> db at {ip}: {out}");
    }
}

/// Pods on the host network share their node's address with every host
/// process: the address is never mapped to their identity. db admits each
/// of two such pods' identities in turn; a plain host process on their
/// node (its connections come from the node's address) is refused at db
/// every time (it once passed as the newer pod's identity), while
/// handshakes with that node's agent still authenticate its other pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_address_never_carries_a_host_network_pods_identity() {
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let mut host_pods = Vec::new();
    for name in ["other", "cache"] {
        host_pods.push(
            cluster
                .pod(
                    PodSpec {
                        namespace: "shop",
                        name,
                        labels: &[("app", name)],
                        service_account: name,
                        node: "node-a",
                        ip: "198.18.0.1",
                        host_network: true,
                        ..Default::default()
                    },
                    None,
                )
                .await,
        );
        tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creation times
    }
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    let host_shell = || {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                tessera_tests::netns::CLIENT,
                &db.ip,
                &PORT.to_string(),
                "1.5",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for admitted in ["other", "cache"] {
        let name = format!("db-from-{admitted}");
        policy(&cluster, &name, "db", admitted).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        for _ in 0..3 {
            let out = host_shell();
            assert!(
                !ok(&out),
                "a host process on node-a reached db, which admits only {admitted}: {out}"
            );
        }
        Api::<tessera_api::crd::AuthPolicy>::namespaced(client.clone(), "shop")
            .delete(&name, &Default::default())
            .await
            .unwrap();
    }
    // Handshakes with node-a's agent still work.
    policy(&cluster, "db-from-web", "db", "web").await;
    let (out, _) = until_ok(&web, &db.ip).await;
    assert!(out.ends_with(" db"), "{out}");
    drop(host_pods);
}

/// An agent outage does not let a reused address inherit an identity:
/// node-b's agent is killed (its pinned maps stay, frozen: they still map
/// x's address to x), x (admitted at db on node-b) is deleted on node-a,
/// and y, with x's address and an identity db does not admit, is created
/// there. y's node still enforces for y: y -> db is refused, by connect()
/// and as a connection start crafted on a packet socket, while web
/// (admitted, authenticated before the outage) still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_address_inherits_nothing_while_the_peers_agent_is_down() {
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (mut cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let mut x = pod(&cluster, "x", "cache", "cache", "node-a", "198.18.1.20").await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    policy(&cluster, "db-from-web", "db", "web").await;
    policy(&cluster, "db-from-cache", "db", "cache").await;
    until_ok(&web, &db.ip).await;
    until_ok(&x, &db.ip).await;

    let killed = cluster.agents.pop().unwrap();
    assert_eq!(killed.node, "node-b");
    drop(killed);
    cluster.delete_pod(&mut x).await;
    let y = pod(&cluster, "y", "other", "other", "node-a", "198.18.1.20").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..3 {
        let out = y.connect(&db.ip, PORT);
        assert!(!ok(&out), "y, at x's address, reached db: {out}");
    }
    // Nor with a connection start crafted on a packet socket (no connect()
    // for the gate to see): node-a's check where y's traffic enters it
    // decides it as the gate would.
    let (_, db_mac) = tessera_tests::scapy::link(&db.ns);
    let sniffer = tessera_tests::scapy::Sniffer::start(&y.ns, 41010, 3.0);
    tessera_tests::scapy::send_syn(&y.ns, &db_mac, &y.ip, &db.ip, 41010, PORT);
    assert!(
        !sniffer.answered(),
        "db answered y's crafted SYN from x's address"
    );
    assert!(
        ok(&web.connect(&db.ip, PORT)),
        "web -> db during the outage"
    );
}

/// What a pod with CAP_NET_RAW tries first, crafted with scapy at the link
/// layer (no socket the egress gate sees): db admits only web, and other,
/// web's neighbour on node-a, (1) sends db a SYN with web's source address
/// (db's answer would go to web), then (2) takes web's address with
/// gratuitous ARP and sends it again (the answer would come to it). Both
/// are dropped where other's traffic enters node-a, and counted; web's own
/// crafted SYN still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_sends_only_from_its_own_addresses() {
    use tessera_tests::scapy::{self, Sniffer};
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let other = pod(&cluster, "other", "other", "other", "node-a", "198.18.1.11").await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    policy(&cluster, "db-from-web", "db", "web").await;
    until_ok(&web, &db.ip).await;
    let (_, db_mac) = scapy::link(&db.ns);
    let spoofed_before = cluster.agents[0]
        .metric(r#"tessera_agent_datapath_decisions_total{reason="deny_spoofed"}"#)
        .unwrap_or(0.0);

    // web's own crafted SYN is answered: the path works.
    let sniffer = Sniffer::start(&web.ns, 41001, 3.0);
    scapy::send_syn(&web.ns, &db_mac, &web.ip, &db.ip, 41001, PORT);
    assert!(sniffer.answered(), "web's own SYN was not answered");

    // (1) other, with web's source address; web would get the answer.
    let sniffer = Sniffer::start(&web.ns, 41002, 3.0);
    scapy::send_syn(&other.ns, &db_mac, &web.ip, &db.ip, 41002, PORT);
    assert!(!sniffer.answered(), "db answered a SYN other sent as web");

    // (2) other takes web's address, then sends as web.
    scapy::claim_arp(&other.ns, &web.ip);
    let sniffer = Sniffer::start(&other.ns, 41003, 3.0);
    scapy::send_syn(&other.ns, &db_mac, &web.ip, &db.ip, 41003, PORT);
    assert!(
        !sniffer.answered(),
        "other took web's address by ARP and db answered it"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let spoofed = cluster.agents[0]
            .metric(r#"tessera_agent_datapath_decisions_total{reason="deny_spoofed"}"#)
            .unwrap_or(0.0);
        if spoofed >= spoofed_before + 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deny_spoofed went {spoofed_before} -> {spoofed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // web still works.
    let out = web.connect(&db.ip, PORT);
    assert!(ok(&out), "web -> db after other's attempts: {out}");
}

/// Waits for `held` to end within 1 s of `since`; panics with `what` if it
/// does not.
fn ends_within_a_second(held: &mut tessera_tests::netns::Held, since: Instant, what: &str) {
    let limit = Duration::from_secs(1).saturating_sub(since.elapsed());
    match held.ended_within(limit) {
        Some((how, _)) => println!("{what}: ended ({how}) {:?} after", since.elapsed()),
        None => panic!("{what}: the connection still stands 1 s after"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_end_with_what_admitted_them() {
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _token_files) = common::cluster_with_agents(&client, &launch).await;
    let web = pod(&cluster, "web", "web", "web", "node-a", "198.18.1.10").await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    let mut cache = pod(&cluster, "cache", "cache", "cache", "node-b", "198.18.2.11").await;
    let free = pod(&cluster, "free", "free", "other", "node-b", "198.18.2.12").await;
    policy(&cluster, "db-from-web", "db", "web").await;
    policy(&cluster, "db-from-monitor", "db", "monitor").await;
    policy(&cluster, "cache-from-web", "cache", "web").await;
    until_ok(&web, &db.ip).await;
    until_ok(&web, &cache.ip).await;
    let mut to_db = web.hold(&db.ip, PORT);
    let mut to_cache = web.hold(&cache.ip, PORT);
    let mut to_free = web.hold(&free.ip, PORT);
    for held in [&mut to_db, &mut to_cache, &mut to_free] {
        assert!(held.connected(), "web could not connect: {}", held.first);
        assert!(held.alive());
    }

    // The policy that allowed web -> db goes (another still selects db).
    let policies: Api<tessera_api::crd::AuthPolicy> = Api::namespaced(client.clone(), "shop");
    let change = Instant::now();
    policies
        .delete("db-from-web", &Default::default())
        .await
        .unwrap();
    ends_within_a_second(&mut to_db, change, "web -> db after its policy went");
    assert!(to_cache.alive(), "web -> cache ended with db's policy");
    assert!(to_free.alive(), "web -> free ended with db's policy");

    // cache's node dies without a word (no FIN, no reset reaches web), the
    // pod is deleted and its address goes to a pod of another identity.
    cluster.cut_off(&cache);
    let change = Instant::now();
    cluster.delete_pod(&mut cache).await;
    ends_within_a_second(
        &mut to_cache,
        change,
        "web -> cache after cache was deleted",
    );
    let newcomer = pod(
        &cluster,
        "newcomer",
        "other",
        "other",
        "node-b",
        "198.18.2.11",
    )
    .await;
    assert!(to_free.alive(), "web -> free ended with cache");
    drop(newcomer);

    // A connection resting on an authentication whose CA leaves the bundle.
    policy(&cluster, "db-from-web", "db", "web").await;
    until_ok(&web, &db.ip).await;
    let mut to_db = web.hold(&db.ip, PORT);
    assert!(to_db.connected(), "web -> db again: {}", to_db.first);
    let bundles: Api<ConfigMap> = Api::namespaced(client.clone(), tessera_tests::procs::NAMESPACE);
    let change = Instant::now();
    set_bundle(&bundles, &foreign_ca_pem()).await;
    ends_within_a_second(&mut to_db, change, "web -> db after its CA left the bundle");
    assert!(
        to_free.alive(),
        "web -> free (no authentication) ended with the CA"
    );
    // web's node reset web's end (and logged which); whichever node resets
    // first, its reset ends the other end too (the held client saw it).
    cluster.agents[0].wait_for("connection reset", 1).await;
}

/// The endpoint `node`'s pinned maps hold for `ip`, if any.
fn mapped(cluster: &SimCluster, node: &str, ip: &str) -> Option<tessera_bpf::abi::Endpoint> {
    let mut dp = pinned(cluster, node);
    dp.endpoint_ip(ip.parse().unwrap()).unwrap()
}

/// `node`'s data-path counter for `reason`.
fn decided(cluster: &SimCluster, node: &str, reason: tessera_bpf::abi::Reason) -> u64 {
    let mut dp = pinned(cluster, node);
    dp.counter(reason).unwrap()
}

/// Waits up to 10 s for `node` to map `ip`; the endpoint.
async fn until_mapped(cluster: &SimCluster, node: &str, ip: &str) -> tessera_bpf::abi::Endpoint {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ep) = mapped(cluster, node, ip) {
            return ep;
        }
        assert!(Instant::now() < deadline, "{node} never mapped {ip}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new pod's address reaches both nodes' maps from its sandbox before the
/// kubelet writes it into the status (node-a's agent reads it there and
/// vouches for it in its handshake with db's node, which knows node-a's
/// agent from its Node object: no pod of node-a has a status yet), so the
/// pod's first
/// connection start is admitted as sent: nothing dropped at db's node for
/// an unknown source. And what a pod author could do with it gets nothing:
/// a pod that adds its neighbour's address, and one of another node's
/// range, to its sandbox is vouched for with neither; its neighbour keeps
/// its address and its access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pods_address_reaches_its_peers_before_its_status() {
    use tessera_bpf::abi::Reason;
    let _one_at_a_time = TOPOLOGY.lock().await;
    let (cp, client) = common::control_plane().await;
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, 3600);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = common::launch(&cp, dir.path(), signer_port, Vec::new());
    let (cluster, _) = common::cluster_with_agents(&client, &launch).await;
    let db = pod(&cluster, "db", "db", "db", "node-b", "198.18.2.10").await;
    for from in ["web", "other", "cache"] {
        policy(&cluster, &format!("db-from-{from}"), "db", from).await;
    }

    // web, node-a's first pod (db's node knows node-a's agent by its Node
    // object): its sandbox has its address, its status none yet.
    let web_spec = PodSpec {
        namespace: "shop",
        name: "web",
        labels: &[("app", "web")],
        service_account: "web",
        node: "node-a",
        ip: "198.18.1.10",
        ..Default::default()
    };
    let web = cluster.pod_before_status(web_spec, Some(PORT)).await;
    let at_b = until_mapped(&cluster, "node-b", &web.ip).await;
    assert_eq!(
        Some(at_b),
        mapped(&cluster, "node-a", &web.ip),
        "both nodes map web's address to the same identity and generation"
    );
    let dropped = decided(&cluster, "node-b", Reason::DenyDefault);
    let held = decided(&cluster, "node-a", Reason::HoldPodPending);
    let out = web.connect(&db.ip, PORT);
    assert!(ok(&out), "web -> db before web's status: {out}");
    assert_eq!(
        decided(&cluster, "node-b", Reason::DenyDefault),
        dropped,
        "db's node dropped a connection start of web's"
    );
    assert_eq!(decided(&cluster, "node-a", Reason::HoldPodPending), held);
    cluster.set_running(web_spec).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mapped(&cluster, "node-b", &web.ip),
        Some(at_b),
        "the status changes nothing"
    );

    let other = pod(&cluster, "other", "other", "other", "node-a", "198.18.1.11").await;
    until_ok(&other, &db.ip).await;
    let others = mapped(&cluster, "node-b", &other.ip).expect("other mapped");

    // mallory (identity cache): its own address, plus other's and one of
    // node-b's range added to its sandbox before its status.
    let mallory = cluster
        .pod_before_status(
            PodSpec {
                namespace: "shop",
                name: "mallory",
                labels: &[("app", "cache")],
                service_account: "cache",
                node: "node-a",
                ip: "198.18.1.30",
                ..Default::default()
            },
            Some(PORT),
        )
        .await;
    for ip in ["198.18.1.11/32", "198.18.2.77/32"] {
        tessera_tests::netns::sh("ip", &["-n", &mallory.ns, "addr", "add", ip, "dev", "lo"]);
    }
    let malloryd = until_mapped(&cluster, "node-b", &mallory.ip).await;
    assert_ne!(malloryd.id, others.id);
    // Its agent looks again every few milliseconds while its status has
    // no address: long enough for the added addresses to be seen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in ["node-a", "node-b"] {
        assert_eq!(
            mapped(&cluster, node, &other.ip),
            Some(others),
            "{node}: other's address stays other's"
        );
        assert_eq!(
            mapped(&cluster, node, "198.18.2.77"),
            None,
            "{node}: not mallory's node's range"
        );
    }
    assert!(
        ok(&other.connect(&db.ip, PORT)),
        "other -> db after mallory"
    );
}
