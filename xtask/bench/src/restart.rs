//! `cargo xtask bench restart` (root): an agent that starts with an empty
//! cache on a node with 100 pods authenticates every pair that policy makes
//! possible with the 1,000 pods of another node, as the product runs: the
//! release operator on a test control plane assigns one identity per pod
//! and signs the SVIDs, one AuthPolicy lets every client pod (node-a) reach
//! every server pod (node-b) with authentication, and the release agents
//! choose the 100,000 pairs from the compiled policy, run the handshakes
//! over their channel and write each result into the auth cache and the
//! eBPF auth map. Each agent is pinned to a core of its own.
//!
//! node-b's agent starts first and gets its 1,000 SVIDs; node-a's agent
//! then starts from nothing (what a node restart leaves). Reported: the
//! wall time from its start until its auth map holds every pair (and from
//! its first completed handshake), the CPU time per pair of each agent
//! meanwhile, and each agent's peak RSS.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_tests::cluster::{Agent, AgentLaunch, SimCluster};
use tessera_tests::resources;

use crate::datapath::{Batch, agent_launch, live, pod_objects, start_agent};
use crate::report::Figure;
use crate::system::{cpu_seconds, start_operator};

/// Pods on the restarting agent's node.
const CLIENTS: usize = 100;
/// Pods on the other node, each its own identity.
const SERVERS: usize = 1000;
const PAIRS: usize = CLIENTS * SERVERS;
const NODES: [(&str, &str); 2] = [("node-a", "198.18.0.1"), ("node-b", "198.18.0.2")];
/// How long the restarted agent gets before the run fails.
const LIMIT: Duration = Duration::from_secs(600);
const INITIATED_OK: &str = r#"tessera_agent_handshakes_total{role="initiator",result="ok"}"#;
const INITIATED_FAILED: &str = r#"tessera_agent_handshakes_total{role="initiator",result="error"}"#;

/// One identity per pod; clients may reach servers on 5432, authenticated.
const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: restart}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: restart}
---
apiVersion: tessera.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: per-pod, namespace: restart}
spec:
  spiffeIDTemplate: "spiffe://{trustDomain}/ns/{namespace}/pod/{podName}"
  podSelector: {matchLabels: {restart: "yes"}}
---
apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {name: servers-from-clients, namespace: restart}
spec:
  selector: {matchLabels: {role: server}}
  rules:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 5432}]
"#;

/// Runs the benchmark; its figures.
pub async fn run(operator: &Path, agent: &Path) -> Result<Vec<Figure>> {
    let Some(cgroup_root) = tessera_tests::cluster::pod_cgroup_root("the restart benchmark") else {
        bail!("the restart benchmark needs root and cgroup v2 (run as root)");
    };
    tessera_bpf::pinning::ensure_bpffs(Path::new(tessera_tests::cluster::BPFFS))?;
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    resources::apply_manifest(&client, OBJECTS).await?;
    let (_operator, signer_port, _) =
        start_operator(operator, &cp, &client, "restart-operator.log").await?;
    let tag = format!("tessera-restart-{}", std::process::id());
    let mut cluster = SimCluster::create(client.clone(), cgroup_root, &tag, &NODES).await;
    let t = Instant::now();
    create_pods(&cluster).await;
    println!(
        "{} pods created in {:.1} s",
        CLIENTS + SERVERS,
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let launch = agent_launch(agent, &cp, signer_port, dir.path());
    start_pinned(&mut cluster, &launch, "node-b", 1).await?;
    let t = Instant::now();
    until_logged(cluster.agent("node-b"), "X.509-SVID issued", SERVERS).await?;
    println!(
        "node-b's agent holds its {SERVERS} SVIDs after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Quiet before the measurement: the sweep of node-b's agent only.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let figures = measure(&mut cluster, &launch).await?;
    save_logs(&cluster)?;
    drop(cluster);
    drop(cp);
    Ok(figures)
}

/// The client pods on node-a (198.20.0.0/16) and the server pods on node-b
/// (198.19.0.0/16), each with an identity of its own.
async fn create_pods(cluster: &SimCluster) {
    let clients = Batch {
        namespace: "restart",
        prefix: "client",
        labels: &[("restart", "yes"), ("role", "client")],
    };
    let servers = Batch {
        namespace: "restart",
        prefix: "server",
        labels: &[("restart", "yes"), ("role", "server")],
    };
    let at = |net: u8| move |i: usize| format!("198.{net}.{}.{}", i / 200, i % 200 + 10);
    pod_objects(cluster, &servers, 0..SERVERS, |_| "node-b", at(19)).await;
    pod_objects(cluster, &clients, 0..CLIENTS, |_| "node-a", at(20)).await;
}

/// Starts `node`'s agent and pins every thread of it to `core`.
async fn start_pinned(
    cluster: &mut SimCluster,
    launch: &AgentLaunch,
    node: &str,
    core: usize,
) -> Result<()> {
    let pid = start_agent(cluster, launch, node).await?;
    // Threads started later inherit the mask of the thread starting them.
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset could not pin {node}'s agent (pid {pid}) to core {core}");
    }
    Ok(())
}

/// Starts node-a's agent with an empty state directory and waits until it
/// authenticated every pair; the figures.
async fn measure(cluster: &mut SimCluster, launch: &AgentLaunch) -> Result<Vec<Figure>> {
    let b_pid = cluster.agent("node-b").proc.0.id();
    let b_cpu = cpu_seconds(b_pid)?;
    let started = Instant::now();
    start_pinned(cluster, launch, "node-a", 0).await?;
    let a = cluster.agent("node-a");
    let a_pid = a.proc.0.id();
    let mut first = None;
    loop {
        let ok = a.metric(INITIATED_OK).unwrap_or(0.0) as usize;
        if ok > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if ok >= PAIRS {
            break;
        }
        if started.elapsed() > LIMIT {
            bail!(
                "node-a's agent authenticated {ok} of {PAIRS} pairs in {LIMIT:?} ({} handshakes failed)",
                a.metric(INITIATED_FAILED).unwrap_or(0.0)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed();
    let a_cpu = cpu_seconds(a_pid)?;
    let b_cpu = cpu_seconds(b_pid)? - b_cpu;
    let failed = a.metric(INITIATED_FAILED).unwrap_or(0.0);
    let in_map = live(cluster, "node-a")?.auths()?.len();
    let first = first.unwrap_or(wall);
    println!(
        "node-a's agent: first handshake done {:.2} s after its start, every pair {:.2} s after it; \
         {in_map} entries in its auth map, {failed} handshakes failed",
        first.as_secs_f64(),
        wall.as_secs_f64()
    );
    let per_pair_us = |s: f64| s * 1e6 / PAIRS as f64;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(vec![
        Figure::new("restart_agents_pairs_in_auth_map", in_map as f64, "pairs")
            .with_target(">= 100000"),
        Figure::new("restart_agents_failed_handshakes", failed, "handshakes"),
        Figure::new("restart_agents_wall", wall.as_secs_f64(), "s").with_target("<= 60"),
        Figure::new(
            "restart_agents_wall_from_first_handshake",
            (wall - first).as_secs_f64(),
            "s",
        ),
        Figure::new(
            "restart_agents_initiator_cpu_per_pair",
            per_pair_us(a_cpu),
            "us",
        ),
        Figure::new(
            "restart_agents_responder_cpu_per_pair",
            per_pair_us(b_cpu),
            "us",
        ),
        Figure::new(
            "restart_agents_initiator_peak_rss",
            mib(cluster.agent("node-a").rss_kib().1),
            "MiB",
        ),
        Figure::new(
            "restart_agents_responder_peak_rss",
            mib(cluster.agent("node-b").rss_kib().1),
            "MiB",
        ),
    ])
}

/// Waits until `agent` logged `needle` `count` times.
async fn until_logged(agent: &Agent, needle: &str, count: usize) -> Result<()> {
    let what = format!("{}'s agent to log {needle:?} {count} times", agent.node);
    tessera_tests::eventually(&what, LIMIT, || async {
        Ok((agent.count(needle) >= count).then_some(()))
    })
    .await
}

/// Writes both agents' logs under target/bench.
fn save_logs(cluster: &SimCluster) -> Result<()> {
    for agent in &cluster.agents {
        let path = tessera_tests::repo_root()
            .join(format!("target/bench/restart-agent-{}.log", agent.node));
        let lines = agent.lines.lock().map(|l| l.join("\n")).unwrap_or_default();
        std::fs::write(&path, lines)?;
        println!("{}'s agent log: {}", agent.node, path.display());
    }
    Ok(())
}
