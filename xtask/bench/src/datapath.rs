//! The data-path benchmarks of `cargo xtask bench auth` that need a running
//! system (root): etcd and kube-apiserver, the release operator and agents
//! with their eBPF programs on simulated nodes' cgroups, pods as network
//! namespaces with real TCP.
//!
//! - First connection of a new authenticated pair: a new identity's pod is
//!   created as a kubelet would (object, sandbox, status Running), and its
//!   process connects once, with no retry, the instant the status says
//!   Running. Reported: how many such connections were refused (the
//!   application saw an error), and the added latency of the others (that
//!   connect minus a plain connect of the same pair right after). Two
//!   series: Running in the status that first gives the pod's address
//!   (the target's case, and a kubelet's usual one: it reports the
//!   sandbox's address in the first status after the containers started),
//!   and Running 500 ms after a Pending status with the address, as a
//!   kubelet reports a pod whose init containers run first.
//! - Policy change to maps: with 1,000 pods in the cluster, the time from
//!   creating (or deleting) an AuthPolicy until the destination node's
//!   kernel decides accordingly, observed by running the pinned ingress
//!   program on the agent's live maps (BPF_PROG_TEST_RUN) every 0.5 ms.
//! - Agent memory: the destination node's agent with 100 local pods, then
//!   with 10,000 identities in the cluster (one per pod).

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tessera_bpf::abi::Reason;
use tessera_bpf::datapath::Datapath;
use tessera_bpf::packets::{self, SYN, TCP};
use tessera_tests::cluster::{AgentLaunch, PodSpec, SimCluster};
use tessera_tests::resources;

use crate::report::{Figure, ms, percentile};
use crate::system::start_operator;

/// New pairs whose first connection is timed (in each series).
const FIRST_CONNECTIONS: usize = 100;
/// The second series' time from sandbox to Running: a kubelet starting
/// the pod's containers.
const STARTUP: Duration = Duration::from_millis(500);
/// Pods in the cluster while policy changes are timed.
const POLICY_PODS: usize = 1000;
/// Policies created, then deleted, while timing.
const POLICY_CHANGES: usize = 50;
/// Pods on the measured agent's node.
const LOCAL_PODS: usize = 100;
/// Identities in the cluster for the memory figure (the figure is named
/// for this default; `TESSERA_BENCH_IDENTITIES` sets another count for
/// quicker runs).
const IDENTITIES: usize = 10_000;

fn identities() -> usize {
    std::env::var("TESSERA_BENCH_IDENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IDENTITIES)
        .max(POLICY_PODS)
}
const PORT: u16 = 5432;
const NODES: [(&str, &str); 3] = [
    ("node-a", "198.18.0.1"),
    ("node-b", "198.18.0.2"),
    ("node-c", "198.18.0.3"),
];

/// Says `ready`, waits for `go` on stdin (written the instant its pod is
/// Running, which happens only after `ready`), then
/// connects once to `ip`:`port` as an application would, with no retry;
/// prints `ok <secs of that connect> <secs of a second, plain connect>`, or
/// `refused <errno> <secs>` followed by what a client retrying every 1 ms
/// would have waited in all (`retried <secs>`, for comparison only).
const FIRST: &str = r#"
import socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
def once():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((ip, port))
        s.recv(64)
    finally:
        s.close()
sys.stdin.readline()
t = time.monotonic()
try:
    once()
except OSError as e:
    print("refused %s %.6f" % (e.errno, time.monotonic() - t), flush=True)
    while time.monotonic() - t < 10:
        try:
            once()
            print("retried %.6f" % (time.monotonic() - t), flush=True)
            sys.exit(0)
        except OSError:
            time.sleep(0.001)
    print("retried never", flush=True)
    sys.exit(0)
first = time.monotonic() - t
t = time.monotonic()
once()
print("ok %.6f %.6f" % (first, time.monotonic() - t), flush=True)
"#;

fn ip(text: &str) -> Result<IpAddr> {
    text.parse().with_context(|| format!("bad address {text}"))
}

/// The pinned data path of `node`'s agent, opened in this process: the
/// agent's live maps, and a copy of its programs to test-run on them.
pub(crate) fn live(cluster: &SimCluster, node: &str) -> Result<Datapath> {
    let dir = tessera_bpf::pinning::version_dir(&cluster.pin_root(node));
    Datapath::open(Some(&dir)).with_context(|| format!("cannot open {}", dir.display()))
}

/// Address of the `i`th scale pod: 198.19.0.0/16.
fn scale_ip(i: usize) -> String {
    format!("198.19.{}.{}", i / 200, i % 200 + 10)
}

/// Runs the three benchmarks; their figures.
pub async fn run(operator: &Path, agent: &Path) -> Result<Vec<Figure>> {
    let Some(cgroup_root) = tessera_tests::cluster::pod_cgroup_root("the data-path benchmarks")
    else {
        bail!("the data-path benchmarks need root and cgroup v2 (run as root)");
    };
    tessera_bpf::pinning::ensure_bpffs(Path::new(tessera_tests::cluster::BPFFS))?;
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    resources::apply_manifest(
        &client,
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-c}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: db, namespace: shop}\n",
    )
    .await?;
    let (_operator, signer_port, _) =
        start_operator(operator, &cp, &client, "auth-operator.log").await?;

    let tag = format!("tessera-bench-{}", std::process::id());
    let mut cluster = SimCluster::create(client.clone(), cgroup_root, &tag, &NODES).await;
    let dir = tempfile::tempdir()?;
    let launch = agent_launch(agent, &cp, signer_port, dir.path());
    for node in ["node-a", "node-b"] {
        start_agent(&mut cluster, &launch, node).await?;
    }
    for node in ["node-a", "node-b"] {
        cluster.agent(node).wait_for("data path in sync", 1).await;
    }
    let mut figures = first_connections(&cluster).await?;
    for agent in &cluster.agents {
        let path =
            tessera_tests::repo_root().join(format!("target/bench/auth-agent-{}.log", agent.node));
        let lines = agent.lines.lock().map(|l| l.join("\n")).unwrap_or_default();
        std::fs::write(&path, lines)?;
        println!(
            "{}'s agent log (first connections): {}",
            agent.node,
            path.display()
        );
    }
    if std::env::var_os("TESSERA_BENCH_FIRST_ONLY").is_some() {
        return Ok(figures);
    }
    // The rest measures node-b's agent alone.
    cluster.agents.retain(|a| a.node == "node-b");
    figures.extend(policy_and_memory(&cluster).await?);
    drop(cluster);
    drop(cp);
    Ok(figures)
}

/// How the benchmarks start release agent `agent` against `cp` (the
/// operator's signer on `signer_port`), their state below `dir`.
pub(crate) fn agent_launch(
    agent: &Path,
    cp: &tessera_tests::ControlPlane,
    signer_port: u16,
    dir: &Path,
) -> AgentLaunch {
    AgentLaunch {
        bin: agent.to_owned(),
        kubeconfig: cp.kubeconfig().to_owned(),
        signer_port,
        dir: dir.to_owned(),
        echo: false,
        extra: Vec::new(),
    }
}

/// Starts `node`'s agent with a Node-bound token of its own; its pid.
pub(crate) async fn start_agent(
    cluster: &mut SimCluster,
    launch: &AgentLaunch,
    node: &str,
) -> Result<u32> {
    let token = resources::agent_token_file(
        &cluster.client,
        node,
        tessera_api::signer_api::TOKEN_AUDIENCE,
        &launch.dir,
    )
    .await?;
    Ok(cluster.start_agent(launch, node, &token).proc.0.id())
}

/// The first connection of new authenticated pairs, as their application
/// sees it: the client pod's process connects once, with no retry, the
/// instant its pod is Running.
async fn first_connections(cluster: &SimCluster) -> Result<Vec<Figure>> {
    let db = cluster
        .pod(
            PodSpec {
                namespace: "shop",
                name: "db",
                labels: &[("app", "db")],
                service_account: "db",
                node: "node-b",
                ip: "198.18.2.10",
                ..Default::default()
            },
            Some(PORT),
        )
        .await;
    resources::apply_manifest(
        &cluster.client,
        &format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: db-from-clients, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: db}}}}\n  rules:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: [{{port: {PORT}}}]\n"
        ),
    )
    .await?;
    let mut figures = Vec::new();
    // Running as soon as the sandbox is there (the target's case), then
    // Pending with the address 500 ms before Running (init containers).
    for (startup, prefix, suffix) in [
        (Duration::ZERO, "client", ""),
        (STARTUP, "late", "_after_500ms_startup"),
    ] {
        println!(
            "first connection of {FIRST_CONNECTIONS} new authenticated pairs (node-a -> db on node-b), one attempt each, from the instant the pod is Running ({} ms after its sandbox)",
            startup.as_millis()
        );
        let mut firsts = Firsts::default();
        let before = counters(cluster)?;
        for i in 0..FIRST_CONNECTIONS {
            let name = format!("{prefix}-{i}");
            let ip = format!(
                "198.18.1.{}",
                10 + i
                    + if startup.is_zero() {
                        0
                    } else {
                        FIRST_CONNECTIONS
                    }
            );
            let line = first_connection(cluster, &db.ip, &name, &ip, startup).await?;
            println!("{name}: {}", line.trim().replace('\n', "; "));
            firsts.add(&name, &line)?;
        }
        print_counter_changes(&before, &counters(cluster)?);
        figures.extend(firsts.figures(suffix, startup.is_zero()));
    }
    Ok(figures)
}

/// Every decision counter of both nodes' data paths: (node, reason, count).
fn counters(cluster: &SimCluster) -> Result<Vec<(&'static str, Reason, u64)>> {
    let mut all = Vec::new();
    for node in ["node-a", "node-b"] {
        let mut dp = live(cluster, node)?;
        for reason in Reason::ALL {
            all.push((node, reason, dp.counter(reason)?));
        }
    }
    Ok(all)
}

/// What the data paths decided during a series, by node and reason.
fn print_counter_changes(
    before: &[(&'static str, Reason, u64)],
    after: &[(&'static str, Reason, u64)],
) {
    let changes: Vec<String> = before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.2 > b.2)
        .map(|(b, a)| format!("{} {} +{}", a.0, a.1.label(), a.2 - b.2))
        .collect();
    println!(
        "data-path decisions during the series: {}",
        changes.join(", ")
    );
}

/// One new client pod `name` at `client_ip`, of a new identity, created
/// as a kubelet would (Running `startup` after its sandbox), its process
/// connecting once at Running; what the process printed.
async fn first_connection(
    cluster: &SimCluster,
    db_ip: &str,
    name: &str,
    client_ip: &str,
    startup: Duration,
) -> Result<String> {
    resources::apply_manifest(
        &cluster.client,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop}}\n"
        ),
    )
    .await?;
    let port = PORT.to_string();
    let created = std::time::SystemTime::now();
    let (_pod, mut child, _running) = cluster
        .pod_running(
            PodSpec {
                namespace: "shop",
                name,
                labels: &[("app", name), ("role", "client")],
                service_account: name,
                node: "node-a",
                ip: client_ip,
                ..Default::default()
            },
            ("python3", &["-c", FIRST, db_ip, &port]),
            startup,
        )
        .await;
    let running = std::time::SystemTime::now();
    let at = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    println!(
        "{name}: created at {:.6} (unix s), Running {:.1} ms later",
        at(created),
        (at(running) - at(created)) * 1000.0
    );
    let stdout = child.0.stdout.take().context("no stdout")?;
    let lines = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        for line in BufReader::new(stdout).lines().take(2) {
            let line = line?;
            let done = line.starts_with("ok") || line.starts_with("retried");
            out.push_str(&line);
            out.push('\n');
            if done {
                break;
            }
        }
        Ok::<_, std::io::Error>(out)
    })
    .await??;
    Ok(lines)
}

/// What the first connections gave.
#[derive(Default)]
struct Firsts {
    /// Added latency of the connections that succeeded at once.
    added: Vec<Duration>,
    plain: Vec<Duration>,
    refused: Vec<String>,
    /// How long a retrying client would have waited, for the refused ones.
    retried: Vec<Duration>,
}

impl Firsts {
    fn add(&mut self, name: &str, printed: &str) -> Result<()> {
        let words: Vec<&str> = printed.split_whitespace().collect();
        match words.as_slice() {
            ["ok", first, second] => {
                let (first, second): (f64, f64) = (first.parse()?, second.parse()?);
                self.added
                    .push(Duration::from_secs_f64((first - second).max(0.0)));
                self.plain.push(Duration::from_secs_f64(second));
            }
            ["refused", errno, _, "retried", rest @ ..] => {
                println!("{name}: first connection refused (errno {errno})");
                self.refused.push(format!("{name}: errno {errno}"));
                if let Some(Ok(secs)) = rest.first().map(|r| r.parse::<f64>()) {
                    self.retried.push(Duration::from_secs_f64(secs));
                }
            }
            _ => bail!("{name}'s client printed {printed:?}"),
        }
        Ok(())
    }

    /// The figures, named with `suffix`; with the targets when `targets`.
    fn figures(mut self, suffix: &str, targets: bool) -> Vec<Figure> {
        for v in [&mut self.added, &mut self.plain, &mut self.retried] {
            v.sort();
        }
        println!(
            "{} of {FIRST_CONNECTIONS} first connections refused (the application would have seen an error)",
            self.refused.len()
        );
        let target = |f: Figure, t: &str| if targets { f.with_target(t) } else { f };
        let added = |p: f64| ms(percentile(&self.added, p));
        let mut figures = vec![
            target(
                Figure::new(
                    &format!("first_connections_refused{suffix}"),
                    self.refused.len() as f64,
                    "count",
                ),
                "<= 0",
            ),
            Figure::new(
                &format!("first_connection_added_p50{suffix}"),
                added(50.0),
                "ms",
            ),
            target(
                Figure::new(
                    &format!("first_connection_added_p99{suffix}"),
                    added(99.0),
                    "ms",
                ),
                "<= 5",
            ),
            Figure::new(
                &format!("first_connection_added_max{suffix}"),
                added(100.0),
                "ms",
            ),
            Figure::new(
                &format!("plain_connect_p50{suffix}"),
                ms(percentile(&self.plain, 50.0)),
                "ms",
            ),
        ];
        if !self.retried.is_empty() {
            // Not what an application gets: what one retrying every 1 ms would.
            figures.push(Figure::new(
                &format!("refused_then_retried_wait_p99{suffix}"),
                ms(percentile(&self.retried, 99.0)),
                "ms",
            ));
        }
        figures
    }
}

/// Where [`pod_objects`] creates pods, and what labels they carry besides
/// `app=<prefix>-<i>`.
pub(crate) struct Batch<'a> {
    pub namespace: &'a str,
    pub prefix: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

/// Creates the pods `range` of `batch` (objects only, running), named
/// `<prefix>-<i>`, the `i`th on `node_of(i)` at `ip_of(i)`, 16 at a time.
pub(crate) async fn pod_objects(
    cluster: &SimCluster,
    batch: &Batch<'_>,
    range: std::ops::Range<usize>,
    node_of: impl Fn(usize) -> &'static str,
    ip_of: impl Fn(usize) -> String,
) {
    futures::stream::iter(range.map(|i| {
        let name = format!("{}-{i}", batch.prefix);
        let ip = ip_of(i);
        let node = node_of(i);
        async move {
            let mut labels = vec![("app", name.as_str())];
            labels.extend_from_slice(batch.labels);
            cluster
                .pod_object(PodSpec {
                    namespace: batch.namespace,
                    name: &name,
                    labels: &labels,
                    service_account: "default",
                    node,
                    ip: &ip,
                    ..Default::default()
                })
                .await;
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>()
    .await;
}

/// Waits until node-b's endpoint map holds at least `count` addresses with
/// a numeric identity; how long that took.
async fn until_endpoints(b: &mut Datapath, count: usize, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let n = b
            .endpoint_ips()?
            .iter()
            .filter(|(_, ep)| u64::from(ep.id) != tessera_bpf::abi::consts::TS_ID_UNKNOWN)
            .count();
        if n >= count {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            bail!("node-b's agent holds {n} of {count} endpoints after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the scale pods `range` (100 first on node-b, the rest on node-c)
/// and waits until node-b's maps hold `total` endpoints, then 3 s more for
/// the agent to settle.
async fn grow(
    cluster: &SimCluster,
    b: &mut Datapath,
    range: std::ops::Range<usize>,
    total: usize,
    t: Instant,
) -> Result<()> {
    let node_of = |i: usize| if i < LOCAL_PODS { "node-b" } else { "node-c" };
    let batch = Batch {
        namespace: "scale",
        prefix: "p",
        labels: &[("scale", "yes")],
    };
    pod_objects(cluster, &batch, range, node_of, scale_ip).await;
    let settled = until_endpoints(b, total, Duration::from_secs(900)).await?;
    println!(
        "{total} pods created and in node-b's maps after {:.1} s ({:.1} s after the last create)",
        t.elapsed().as_secs_f64(),
        settled.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

/// Policy change -> maps with 1,000 pods; the agent's memory with 100 local
/// pods at 1,000 and 10,000 identities.
async fn policy_and_memory(cluster: &SimCluster) -> Result<Vec<Figure>> {
    resources::apply_manifest(
        &cluster.client,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: scale}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: scale}\n---\n\
         apiVersion: tessera.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {name: per-pod, namespace: scale}\n\
         spec:\n  spiffeIDTemplate: \"spiffe://{trustDomain}/ns/{namespace}/pod/{podName}\"\n  podSelector: {matchLabels: {scale: \"yes\"}}\n",
    )
    .await?;
    let mut b = live(cluster, "node-b")?;
    let existing = b.endpoint_ips()?.len();
    let t = Instant::now();
    // One identity per pod.
    grow(cluster, &mut b, 0..POLICY_PODS - existing, POLICY_PODS, t).await?;
    let (rss_1k, _) = cluster.agent("node-b").rss_kib();
    println!(
        "node-b's agent at {POLICY_PODS} pods: {}",
        cluster.agent("node-b").rss_by_kind()
    );

    println!(
        "policy change -> node-b's kernel decision: {POLICY_CHANGES} Deny policies created, then deleted"
    );
    let policies: kube::Api<tessera_api::crd::AuthPolicy> =
        kube::Api::namespaced(cluster.client.clone(), "scale");
    let mut latencies = Vec::new();
    for k in 0..POLICY_CHANGES {
        // local pod k (node-b) and remote pod 100 + k (node-c)
        let (local, remote) = (k, LOCAL_PODS + k);
        let packet = packets::ipv4(
            octets(&scale_ip(remote))?,
            octets(&scale_ip(local))?,
            TCP,
            PORT,
            SYN,
        );
        let verdict = |b: &Datapath| b.test_ingress(&packet, 1).map(|(v, _)| v);
        if verdict(&b)? != 1 {
            bail!("p-{remote} -> p-{local} is denied before any policy");
        }
        let name = format!("deny-{k}");
        let yaml = format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: {name}, namespace: scale}}\n\
             spec:\n  selector: {{matchLabels: {{app: p-{local}}}}}\n  action: Deny\n  rules:\n  - from: [{{podSelector: {{matchLabels: {{app: p-{remote}}}}}}}]\n    ports: [{{port: {PORT}}}]\n"
        );
        let t = Instant::now();
        resources::apply_manifest(&cluster.client, &yaml).await?;
        latencies.push(until_verdict(&b, &verdict, 0, t).await?);
        let t = Instant::now();
        policies.delete(&name, &Default::default()).await?;
        latencies.push(until_verdict(&b, &verdict, 1, t).await?);
    }
    latencies.sort();

    let identities = identities();
    println!("scaling to {identities} identities (one pod each)");
    let t = Instant::now();
    grow(
        cluster,
        &mut b,
        POLICY_PODS - existing..identities,
        identities,
        t,
    )
    .await?;
    let (rss_10k, peak) = cluster.agent("node-b").rss_kib();
    println!(
        "node-b's agent at {identities} identities: {}",
        cluster.agent("node-b").rss_by_kind()
    );
    if let Some(secs) = std::env::var("TESSERA_BENCH_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        println!("HOLDING {secs} s");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(vec![
        Figure::new("policy_to_maps_p50", ms(percentile(&latencies, 50.0)), "ms"),
        Figure::new("policy_to_maps_p99", ms(percentile(&latencies, 99.0)), "ms")
            .with_target("<= 500"),
        Figure::new("agent_rss_1k_pods", mib(rss_1k), "MiB"),
        Figure::new(
            &format!("agent_rss_{}k_identities", identities / 1000),
            mib(rss_10k),
            "MiB",
        )
        .with_target("<= 30"),
        Figure::new("agent_rss_peak", mib(peak), "MiB"),
    ])
}

fn octets(text: &str) -> Result<[u8; 4]> {
    match ip(text)? {
        IpAddr::V4(v4) => Ok(v4.octets()),
        IpAddr::V6(_) => bail!("{text} is not IPv4"),
    }
}

/// Test-runs the ingress program every 0.5 ms until it returns `want`; the
/// time since `t`.
async fn until_verdict(
    b: &Datapath,
    verdict: &impl Fn(&Datapath) -> Result<u32, tessera_bpf::datapath::DatapathError>,
    want: u32,
    t: Instant,
) -> Result<Duration> {
    loop {
        if verdict(b)? == want {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("node-b's kernel did not return {want} within 30 s of the policy change");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}
