//! A simulated cluster for the data-path tests, the demo and the
//! benchmarks: simulated nodes on one [`Topology`] bridge, a cgroup (v2) per
//! node holding its pods' cgroups, `tessera-agent run --cgroup-root ...` per
//! node with real eBPF programs pinned under `/sys/fs/bpf/<tag>-<node>`, and
//! pods that are Pod objects in the API server plus, when they need traffic,
//! a network namespace, a cgroup and a Python TCP server.
//!
//! Everything is removed on drop: agents first (SIGKILL), then their pins,
//! cgroups and namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::netns::{self, Cgroup, Topology};
use crate::procs::KillOnDrop;

/// Where agents pin their maps and links.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The cgroup v2 hierarchy simulated pods' cgroups go under, when this
/// process may use it (root); otherwise prints that `what` is skipped and why.
pub fn pod_cgroup_root(what: &str) -> Option<&'static Path> {
    let root = Path::new("/sys/fs/cgroup/unified");
    if crate::is_root() && root.join("cgroup.procs").exists() {
        return Some(root);
    }
    println!(
        "skipped: {what} needs root and cgroup v2 at {}",
        root.display()
    );
    None
}

/// A running `tessera-agent run` and the lines it logged.
#[derive(Debug)]
pub struct Agent {
    /// The node it serves.
    pub node: String,
    /// The process (killed on drop).
    pub proc: KillOnDrop,
    /// Its stderr, line by line.
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// How many logged lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (up to 60 s) until at least `at_least` lines contain `needle`.
    pub async fn wait_for(&self, needle: &str, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count(needle) < at_least {
            assert!(
                Instant::now() < deadline,
                "the agent of {} never logged {needle:?}",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The loopback port of the agent's /metrics endpoint, from its log.
    pub fn metrics_port(&self) -> Option<u16> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                l.split("addr=127.0.0.1:")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    }

    /// The value of the sample `name` (labels included, as exposed) on the
    /// agent's /metrics endpoint.
    pub fn metric(&self, name: &str) -> Option<f64> {
        crate::metric(self.metrics_port()?, name)
    }

    /// The agent's resident memory in KiB (`VmRSS`) and its peak (`VmHWM`).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.0.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The agent's resident memory by kind, from `/proc/<pid>/status`:
    /// heap and stacks (RssAnon), mapped files such as its own binary
    /// (RssFile) and shared memory (RssShmem), for reports.
    pub fn rss_by_kind(&self) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.0.id()))
            .unwrap_or_default();
        ["RssAnon:", "RssFile:", "RssShmem:"]
            .iter()
            .filter_map(|name| {
                let line = status.lines().find(|l| l.starts_with(name))?;
                Some(line.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A simulated pod with traffic: its Pod object, network namespace, cgroup
/// and TCP server.
#[derive(Debug)]
pub struct SimPod {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Its address.
    pub ip: String,
    /// Its IPv6 address, if dual-stack.
    pub ip6: Option<String>,
    /// Its network namespace (empty on the host network).
    pub ns: String,
    /// Its cgroup (below its node's).
    pub cgroup: Cgroup,
    /// Its TCP server, when it runs one.
    pub server: Option<KillOnDrop>,
}

impl SimPod {
    /// One connection attempt from this pod to `ip`:`port`, as
    /// [`netns::CLIENT`] reports it.
    pub fn connect(&self, ip: &str, port: u16) -> String {
        netns::connect(
            &self.cgroup,
            &self.ns,
            ip,
            port,
            Duration::from_millis(1500),
        )
    }

    /// A connection from this pod to `ip`:`port`, held open.
    pub fn hold(&self, ip: &str, port: u16) -> netns::Held {
        let ns = Some(self.ns.as_str()).filter(|n| !n.is_empty());
        netns::Held::open(&self.cgroup.0, ns, ip, port)
    }
}

/// What a new pod looks like.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodSpec<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// Labels.
    pub labels: &'a [(&'a str, &'a str)],
    /// Service account.
    pub service_account: &'a str,
    /// Node name.
    pub node: &'a str,
    /// Pod IP (its node's address for a pod on the host network).
    pub ip: &'a str,
    /// Its IPv6 address, for a dual-stack pod.
    pub ip6: Option<&'a str>,
    /// On the host network: no network namespace of its own, `ip` is its
    /// node's.
    pub host_network: bool,
}

/// How agents are started: the same for every node.
#[derive(Debug, Clone)]
pub struct AgentLaunch {
    /// The `tessera-agent` binary.
    pub bin: PathBuf,
    /// The control plane's kubeconfig.
    pub kubeconfig: PathBuf,
    /// The operator's signer port on loopback.
    pub signer_port: u16,
    /// Where sockets (`<node>.sock`) and state (`<node>/`) go.
    pub dir: PathBuf,
    /// Whether agent logs are echoed to stderr.
    pub echo: bool,
    /// More arguments for `tessera-agent run`, by node.
    pub extra: Vec<(String, Vec<String>)>,
}

/// Simulated nodes, their cgroups and agents, and the pods' namespaces.
pub struct SimCluster {
    /// A client of the control plane.
    pub client: kube::Client,
    /// The agents started, in start order.
    pub agents: Vec<Agent>,
    tag: String,
    nodes: Vec<(String, String)>,
    node_cgroups: Vec<Cgroup>,
    top: Option<Cgroup>,
    topology: Option<Topology>,
}

impl SimCluster {
    /// Creates the bridge holding `nodes` (name, address), a cgroup per
    /// node under `<cgroup_root>/<tag>`, and each node's Node object with its
    /// pod ranges ([`SimCluster::pod_ranges`]) and address. Pins go under
    /// `/sys/fs/bpf/<tag>-<node>`.
    pub async fn create(
        client: kube::Client,
        cgroup_root: &Path,
        tag: &str,
        nodes: &[(&str, &str)],
    ) -> SimCluster {
        for (name, ip) in nodes {
            publish_node(&client, name, ip, &Self::pod_ranges(ip)).await;
        }
        assert!(
            cgroup_root.join("cgroup.procs").exists(),
            "no cgroup v2 hierarchy at {} (this needs root)",
            cgroup_root.display()
        );
        let topology = Topology::create(&nodes.iter().map(|(_, ip)| *ip).collect::<Vec<_>>());
        let top = Cgroup::create(cgroup_root.join(tag));
        let node_cgroups = nodes
            .iter()
            .map(|(n, _)| Cgroup::create(top.0.join(n)))
            .collect();
        SimCluster {
            client,
            agents: Vec::new(),
            tag: tag.to_owned(),
            nodes: nodes
                .iter()
                .map(|(n, ip)| ((*n).to_owned(), (*ip).to_owned()))
                .collect(),
            node_cgroups,
            top: Some(top),
            topology: Some(topology),
        }
    }

    /// The pod ranges of the node at `node_ip` (198.18.0.N): 198.18.N.0/24
    /// and [`netns::IPV6_PREFIX`]`::N:0/112`, as the tests number pods.
    pub fn pod_ranges(node_ip: &str) -> [String; 2] {
        let n = node_ip.rsplit('.').next().unwrap_or("0");
        [
            format!("198.18.{n}.0/24"),
            format!("{}::{n}:0/112", netns::IPV6_PREFIX),
        ]
    }

    fn index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no simulated node {node}"))
    }

    /// The cgroup holding `node`'s pods (its agent's `--cgroup-root`).
    pub fn node_cgroup(&self, node: &str) -> &Path {
        &self.node_cgroups[self.index(node)].0
    }

    /// `node`'s address.
    pub fn node_ip(&self, node: &str) -> &str {
        &self.nodes[self.index(node)].1
    }

    /// Where `node`'s agent pins its maps and links (the root; the
    /// versioned directory is below it).
    pub fn pin_root(&self, node: &str) -> PathBuf {
        Path::new(BPFFS).join(format!("{}-{node}", self.tag))
    }

    /// Starts the agent of `node` as `launch` says, with the eBPF programs
    /// on the node's cgroup and handshakes on the node's address, its
    /// Node-bound token in `token_file`.
    pub fn start_agent(&mut self, launch: &AgentLaunch, node: &str, token_file: &Path) -> &Agent {
        let (bin, dir) = (&launch.bin, &launch.dir);
        let mut child = crate::procs::agent_run(
            bin,
            &launch.kubeconfig,
            node,
            launch.signer_port,
            token_file,
            &dir.join(format!("{node}.sock")),
        )
        .arg("--cgroup-root")
        .arg(self.node_cgroup(node))
        .arg("--pin-name")
        .arg(self.pin_root(node).file_name().unwrap())
        .arg(format!("--handshake-addr={}:4434", self.node_ip(node)))
        .arg("--state-dir")
        .arg(dir.join(node))
        .args(
            launch
                .extra
                .iter()
                .filter(|(n, _)| n == node)
                .flat_map(|(_, args)| args),
        )
        .env(
            "RUST_LOG",
            std::env::var("TESSERA_AGENT_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let lines = netns::collect_stderr(&mut child, node, launch.echo);
        self.agents.push(Agent {
            node: node.to_owned(),
            proc: KillOnDrop(child),
            lines,
        });
        self.agents.last().unwrap()
    }

    /// The agent of `node`.
    pub fn agent(&self, node: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent runs for {node}"))
    }

    /// Creates the Pod object of `spec` (no process runs), running on its
    /// node with its address. Its uid.
    pub async fn pod_object(&self, spec: PodSpec<'_>) -> String {
        let uid = self.create_pod(spec).await;
        self.set_running(spec).await;
        uid
    }

    /// Creates the Pod object of `spec`, scheduled but without an address
    /// yet. Its uid.
    async fn create_pod(&self, spec: PodSpec<'_>) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), spec.namespace);
        let pod = crate::fixtures::PodBuilder::new(spec.namespace, spec.name)
            .labels(spec.labels)
            .node(spec.node)
            .service_account(spec.service_account)
            .host_network(spec.host_network)
            .build();
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("cannot create pod {}: {e}", spec.name));
        created.metadata.uid.unwrap()
    }

    /// Reports the pod of `spec` running with its address (what the kubelet
    /// does once the pod's sandbox, cgroup and network are set up).
    pub async fn set_running(&self, spec: PodSpec<'_>) {
        self.set_status(spec, "Running").await;
    }

    /// Reports the pod of `spec` in `phase` with its address.
    async fn set_status(&self, spec: PodSpec<'_>, phase: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), spec.namespace);
        pods.patch_status(
            spec.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "phase": phase, "podIP": spec.ip,
                "podIPs": std::iter::once(spec.ip).chain(spec.ip6)
                    .map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
                "hostIP": self.node_ip(spec.node)
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot set the status of pod {}: {e}", spec.name));
    }

    /// A running pod `name` in `namespace` on `node` at `ip`, labelled
    /// `app=<name>` with service account `<name>`; a TCP server on `port`
    /// when given.
    pub async fn app_pod(
        &self,
        namespace: &str,
        name: &str,
        (node, ip): (&str, &str),
        port: Option<u16>,
    ) -> SimPod {
        self.pod(
            PodSpec {
                namespace,
                name,
                labels: &[("app", name)],
                service_account: name,
                node,
                ip,
                ..Default::default()
            },
            port,
        )
        .await
    }

    /// Creates the pod of `spec` as a kubelet would: the object, then its
    /// cgroup and network namespace, then its address in the status; with
    /// a TCP server on `port` answering its name when `port` is given.
    pub async fn pod(&self, spec: PodSpec<'_>, port: Option<u16>) -> SimPod {
        let (ns, cgroup) = self.sandbox(spec).await;
        self.set_running(spec).await;
        self.placed(spec, ns, cgroup, port)
    }

    /// As [`SimCluster::pod`] but before the kubelet writes any status: the
    /// sandbox has its address and the server runs, the Pod object gives
    /// no address yet ([`SimCluster::set_running`] gives it).
    pub async fn pod_before_status(&self, spec: PodSpec<'_>, port: Option<u16>) -> SimPod {
        let (ns, cgroup) = self.sandbox(spec).await;
        self.placed(spec, ns, cgroup, port)
    }

    /// As [`SimCluster::pod`], with `program args...` started in the pod's
    /// sandbox before the pod is Running, as a container whose process is
    /// up when the kubelet reports it: the process, and the instant the
    /// status that says Running was written (the line `go` is written to
    /// its stdin at that instant). The process first prints a line when it
    /// is ready (its runtime loaded), which this waits for: the status says
    /// Running no earlier. `startup` passes between the sandbox and that
    /// status; meanwhile the status says Pending with the sandbox's
    /// address, as a kubelet reports a pod whose init containers run first
    /// (zero: one status, Running with the address, as soon as the sandbox
    /// and the process are there: a kubelet's usual first status with an
    /// address).
    pub async fn pod_running(
        &self,
        spec: PodSpec<'_>,
        (program, args): (&str, &[&str]),
        startup: std::time::Duration,
    ) -> (SimPod, KillOnDrop, std::time::Instant) {
        use std::io::{Read, Write};
        let (ns, cgroup) = self.sandbox(spec).await;
        let mut process = KillOnDrop(cgroup.spawn_in(&ns, program, args));
        if let Some(mut out) = process.0.stdout.take() {
            // Byte by byte: nothing past the line is taken from the pipe.
            let out = tokio::task::spawn_blocking(move || {
                let mut byte = [0u8; 1];
                while out.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {}
                out
            })
            .await
            .ok();
            process.0.stdout = out;
        }
        if !startup.is_zero() {
            self.set_status(spec, "Pending").await;
            tokio::time::sleep(startup).await;
        }
        self.set_running(spec).await;
        let running = std::time::Instant::now();
        if let Some(stdin) = process.0.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n").and_then(|()| stdin.flush());
        }
        (self.placed(spec, ns, cgroup, None), process, running)
    }

    /// The pod object, then its network namespace and cgroup.
    async fn sandbox(&self, spec: PodSpec<'_>) -> (String, Cgroup) {
        let uid = self.create_pod(spec).await;
        let ns = if spec.host_network {
            String::new()
        } else {
            let ips: Vec<&str> = std::iter::once(spec.ip).chain(spec.ip6).collect();
            self.topology.as_ref().unwrap().pod_with(&ips)
        };
        let cgroup = Cgroup::create(self.node_cgroup(spec.node).join(format!("pod{uid}")));
        (ns, cgroup)
    }

    fn placed(&self, spec: PodSpec<'_>, ns: String, cgroup: Cgroup, port: Option<u16>) -> SimPod {
        let server = port.map(|p| KillOnDrop(netns::serve(&cgroup, &ns, p, spec.name)));
        SimPod {
            name: spec.name.to_owned(),
            namespace: spec.namespace.to_owned(),
            ip: spec.ip.to_owned(),
            ip6: spec.ip6.map(str::to_owned),
            ns,
            cgroup,
            server,
        }
    }

    /// A network namespace on the bridge with `ip` that is no pod: a host
    /// outside the mesh (no Pod object, no cgroup, no agent). Its name, for
    /// `ip netns exec`.
    pub fn outside(&self, ip: &str) -> String {
        self.topology.as_ref().unwrap().pod(ip)
    }

    /// Recreates `pod`'s sandbox as a kubelet does after it died: its
    /// server stops, its network namespace is replaced by a new one with
    /// the same address, and a server on `port` starts in the new one
    /// (same Pod object, same cgroup).
    pub fn recreate_sandbox(&self, pod: &mut SimPod, port: u16) {
        pod.server.take();
        let topology = self.topology.as_ref().unwrap();
        topology.remove_pod(&pod.ns);
        pod.ns = topology.pod(&pod.ip);
        topology.forget_neighbor(&pod.ip);
        pod.server = Some(KillOnDrop(netns::serve(
            &pod.cgroup,
            &pod.ns,
            port,
            &pod.name,
        )));
    }

    /// Cuts `pod` off the network without a word, as a node that died:
    /// its peers hear nothing from it any more (see [`netns::Topology::cut_off`]).
    pub fn cut_off(&self, pod: &SimPod) {
        self.topology.as_ref().unwrap().cut_off(&pod.ns);
    }

    /// Deletes `pod`'s object, stops its server and removes its namespace.
    pub async fn delete_pod(&self, pod: &mut SimPod) {
        pod.server.take();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        pods.delete(&pod.name, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("cannot delete pod {}: {e}", pod.name));
        if !pod.ns.is_empty() {
            self.topology.as_ref().unwrap().remove_pod(&pod.ns);
        }
    }
}

/// Creates or updates the Node object `name` with pod ranges `ranges` (as
/// a node's IPAM would set them; they cannot change once set) and its
/// address `ip` in its status (as its kubelet reports it).
async fn publish_node(client: &kube::Client, name: &str, ip: &str, ranges: &[String]) {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    let params = PatchParams::apply(crate::resources::FIELD_MANAGER).force();
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": ranges[0], "podCIDRs": ranges},
    });
    nodes
        .patch(name, &params, &Patch::Apply(node))
        .await
        .unwrap_or_else(|e| panic!("cannot publish node {name}: {e}"));
    let status = serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    });
    nodes
        .patch_status(name, &params, &Patch::Apply(status))
        .await
        .unwrap_or_else(|e| panic!("cannot publish node {name}'s address: {e}"));
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("tag", &self.tag)
            .field("nodes", &self.nodes)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.agents.clear();
        for (node, _) in &self.nodes {
            let _ = std::fs::remove_dir_all(Path::new(BPFFS).join(format!("{}-{node}", self.tag)));
        }
        self.node_cgroups.clear();
        self.top.take();
        self.topology.take();
    }
}
