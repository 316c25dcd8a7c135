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
//! stops new connections within 1 s; a pod that takes over a deleted pod's
//! address with another identity inherits nothing; enforcement goes on
//! while an agent is down, which after a restart repeats no handshake; and
//! short-lived SVIDs rotate without a single failed connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::resources;

mod common;
use common::Proc;
use tessera_tests::netns::{self, Cgroup, Topology};

const PORT: u16 = 5432;
/// X.509-SVID lifetime: short, so SVIDs rotate (at half-life) during the test.
const SVID_TTL: u64 = 30;
const NODE_IPS: [&str; 3] = ["198.18.0.1", "198.18.0.2", "198.18.0.3"];

/// A simulated pod: its Pod object, network namespace and cgroup.
struct SimPod {
    name: String,
    ip: String,
    ns: String,
    cgroup: Cgroup,
    server: Option<Proc>,
}

impl SimPod {
    /// One connection attempt from this pod: "ok <secs> <banner>",
    /// "errno <n> <secs>" or "timeout <secs>".
    fn connect(&self, ip: &str) -> String {
        netns::connect(
            &self.cgroup,
            &self.ns,
            ip,
            PORT,
            Duration::from_millis(1500),
        )
    }
}

struct Cluster {
    client: kube::Client,
    topology: Topology,
    node_cgroups: Vec<Cgroup>,
}

impl Cluster {
    fn node_cgroup(&self, node: &str) -> &Path {
        let i = ["node-a", "node-b", "node-c"]
            .iter()
            .position(|n| *n == node)
            .unwrap();
        &self.node_cgroups[i].0
    }

    /// Creates a pod object on `node` with `ip`, its namespace and cgroup,
    /// and a TCP server in it.
    async fn pod(&self, name: &str, app: &str, sa: &str, node: &str, ip: &str) -> SimPod {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "shop");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        let uid = created.metadata.uid.clone().unwrap();
        let host = NODE_IPS[["node-a", "node-b", "node-c"]
            .iter()
            .position(|n| *n == node)
            .unwrap()];
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host
            }})),
        )
        .await
        .unwrap();
        let ns = self.topology.pod(ip);
        let cgroup = Cgroup::create(self.node_cgroup(node).join(format!("pod{uid}")));
        let server = netns::serve(&cgroup, &ns, PORT, name);
        SimPod {
            name: name.into(),
            ip: ip.into(),
            ns,
            cgroup,
            server: Some(Proc(server)),
        }
    }

    async fn delete_pod(&self, pod: &mut SimPod) {
        pod.server.take();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "shop");
        pods.delete(&pod.name, &Default::default()).await.unwrap();
        self.topology.remove_pod(&pod.ns);
    }

    async fn policy(&self, name: &str, target: &str, from: &str) {
        resources::apply_manifest(
            &self.client,
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec:\n  selector: {{matchLabels: {{app: {target}}}}}\n  rules:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{port: {PORT}}}]\n"
            ),
        )
        .await
        .unwrap();
    }
}

/// A running agent with its log lines.
struct Agent {
    proc: Proc,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    async fn wait_for(&self, needle: &str, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count(needle) < at_least {
            assert!(
                Instant::now() < deadline,
                "the agent never logged {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn start_agent(
    kubeconfig: &Path,
    node: &str,
    signer_port: u16,
    token_file: &Path,
    dir: &Path,
    cgroup: &Path,
) -> Agent {
    let ip = NODE_IPS[["node-a", "node-b"]
        .iter()
        .position(|n| *n == node)
        .unwrap()];
    let bin = Path::new(env!("CARGO_BIN_EXE_tessera-agent"));
    let mut child = tessera_tests::procs::agent_run(
        bin,
        kubeconfig,
        node,
        signer_port,
        token_file,
        &dir.join(format!("{node}.sock")),
    )
    .arg("--cgroup-root")
    .arg(cgroup)
    .arg(format!(
        "--pin-name=tessera-e2e-{}-{node}",
        std::process::id()
    ))
    .arg(format!("--handshake-addr={ip}:4434"))
    .arg("--state-dir")
    .arg(dir.join(node))
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = netns::collect_stderr(&mut child, node, true);
    Agent {
        proc: Proc(child),
        lines,
    }
}

/// Removes the agents' pinned maps and links when the test ends.
struct Pins;

impl Drop for Pins {
    fn drop(&mut self) {
        for node in ["node-a", "node-b"] {
            let dir =
                Path::new("/sys/fs/bpf").join(format!("tessera-e2e-{}-{node}", std::process::id()));
            let _ = tessera_bpf::datapath::Datapath::remove_pins(
                &tessera_bpf::pinning::version_dir(&dir),
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn ok(out: &str) -> bool {
    out.starts_with("ok ")
}

/// Retries a connection until it succeeds (pre-authentication may still be
/// under way): the first success's output and the attempts it took.
async fn until_ok(from: &SimPod, ip: &str) -> (String, usize) {
    for attempt in 1..=100 {
        let out = from.connect(ip);
        if ok(&out) {
            return (out, attempt);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{} never reached {ip}", from.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_pairs_connect_and_nothing_else_does() {
    assert!(
        tessera_bpf::pinning::ensure_bpffs(Path::new("/sys/fs/bpf")).is_ok(),
        "no bpffs at /sys/fs/bpf: this test needs root"
    );
    let (cp, client) = resources::control_plane_with_crds().await.unwrap();
    resources::apply_manifest(&client, resources::TWO_NODES)
        .await
        .unwrap();
    for sa in ["web", "other", "db", "cache"] {
        resources::apply_manifest(
            &client,
            &format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: shop}}\n"
            ),
        )
        .await
        .unwrap();
    }
    let signer_port = tessera_tests::free_port().unwrap();
    let _operator = common::start_operator(cp.kubeconfig(), signer_port, SVID_TTL);
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60))
        .await
        .unwrap();

    let _pins = Pins;
    let top =
        Cgroup::create(common::cgroup2_root().join(format!("tessera-e2e-{}", std::process::id())));
    let cluster = Cluster {
        client: client.clone(),
        topology: Topology::create(&NODE_IPS),
        node_cgroups: ["node-a", "node-b", "node-c"]
            .iter()
            .map(|n| Cgroup::create(top.0.join(n)))
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut token_files = Vec::new();
    for node in ["node-a", "node-b"] {
        let token_file = resources::agent_token_file(&client, node, TOKEN_AUDIENCE, dir.path())
            .await
            .unwrap();
        agents.push(start_agent(
            cp.kubeconfig(),
            node,
            signer_port,
            &token_file,
            dir.path(),
            cluster.node_cgroup(node),
        ));
        token_files.push(token_file);
    }
    for agent in &agents {
        agent.wait_for("data path in sync", 1).await;
    }

    // web (node-a) may reach db (node-b) with mutual authentication; db is
    // otherwise closed (an Allow policy selects it).
    let web = cluster
        .pod("web", "web", "web", "node-a", "198.18.1.10")
        .await;
    let other = cluster
        .pod("other", "other", "other", "node-a", "198.18.1.11")
        .await;
    let mut db = cluster.pod("db", "db", "db", "node-b", "198.18.2.10").await;
    cluster.policy("db-from-web", "db", "web").await;
    cluster.policy("db-from-monitor", "db", "monitor").await;
    // Converged once both agents recorded the pair (pre-authentication).
    agents[0]
        .wait_for("spiffe://cluster.test/ns/shop/sa/db", 1)
        .await;
    agents[0].wait_for("authenticated", 1).await;
    agents[1].wait_for("authenticated (answered)", 1).await;

    // Allowed pair: first try.
    let first = web.connect(&db.ip);
    assert!(ok(&first) && first.ends_with(" db"), "web -> db: {first}");
    // No policy allows other -> db: refused by connect() itself (EPERM).
    let out = other.connect(&db.ip);
    assert!(out.starts_with("errno 1 "), "other -> db: {out}");

    // A pod claiming web's identity on a node without an agent has no SVID:
    // nobody can authenticate it, and db's node drops its connection.
    let intruder = cluster
        .pod("intruder", "web", "web", "node-c", "198.18.3.10")
        .await;
    let out = intruder.connect(&db.ip);
    assert!(!ok(&out), "intruder -> db: {out}");

    // Enforcement while node-a's agent is down (killed: no cleanup at all).
    let handshakes_before = agents[0].count("authenticated");
    let killed = agents.remove(0);
    drop(killed.proc);
    assert!(
        ok(&web.connect(&db.ip)),
        "web -> db with node-a's agent down"
    );
    assert!(
        other.connect(&db.ip).starts_with("errno 1 "),
        "other -> db with the agent down"
    );
    // Restarted, it restores the auth map from its cache: no new handshake.
    let restarted = start_agent(
        cp.kubeconfig(),
        "node-a",
        signer_port,
        &token_files[0],
        dir.path(),
        cluster.node_cgroup("node-a"),
    );
    restarted.wait_for("data path in sync", 1).await;
    assert_eq!(
        restarted.count("restored=1"),
        1,
        "the valid entry is restored"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(ok(&web.connect(&db.ip)), "web -> db after the restart");
    assert_eq!(
        restarted.count("authenticated"),
        0,
        "a handshake was repeated after the restart ({handshakes_before} before)"
    );
    agents.insert(0, restarted);

    // Removing the allowing policy stops new connections within 1 s.
    let policies: Api<tessera_api::crd::AuthPolicy> = Api::namespaced(client.clone(), "shop");
    policies
        .delete("db-from-web", &Default::default())
        .await
        .unwrap();
    let removed = Instant::now();
    loop {
        let out = web.connect(&db.ip);
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
    cluster.policy("db-from-web", "db", "web").await;
    let (_, attempts) = until_ok(&web, &db.ip).await;
    println!("web -> db allowed again after {attempts} attempt(s)");

    // Across SVID rotations (renewal at half-life) and expiries the pair is
    // re-authenticated ahead of time: not one connection fails meanwhile.
    let renewals_before = agents[0].count("authenticated local=");
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(SVID_TTL + 5) {
        let out = web.connect(&db.ip);
        attempts += 1;
        assert!(
            ok(&out),
            "web -> db failed {:?} into the rotation phase: {out}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewals = agents[0].count("authenticated local=") - renewals_before;
    println!("{attempts} connections across {renewals} re-authentication(s), none failed");
    assert!(
        renewals >= 1,
        "no re-authentication within {} s of {SVID_TTL} s SVIDs",
        SVID_TTL + 5
    );

    // Identity confusion: db goes, and cache takes its address on node-c
    // (no agent: nobody can authenticate it). web's authentication with db
    // does not carry over to the new owner of the address.
    cluster.policy("cache-from-web", "cache", "web").await;
    let ip = db.ip.clone();
    cluster.delete_pod(&mut db).await;
    let cache = cluster.pod("cache", "cache", "cache", "node-c", &ip).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let out = web.connect(&cache.ip);
        assert!(
            out.starts_with("errno 1 "),
            "web -> cache at db's old address: {out}"
        );
    }
    drop(cache);
    drop(agents);
    drop(cp);
}
