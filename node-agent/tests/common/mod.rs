//! Helpers shared by the agent's root-only tests: pod cgroups (cgroup v2)
//! with a real client process inside.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_api::signer_api::TOKEN_AUDIENCE;
use tessera_tests::cluster::{AgentLaunch, SimCluster};
use tessera_tests::resources;

pub fn cgroup2_root() -> PathBuf {
    std::env::var_os("TESSERA_CGROUP2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// A pod cgroup `<root>/tessera-test-<pid>-<tag>/kubepods/pod<uid>`, removed on drop.
pub struct PodCgroup {
    top: PathBuf,
    leaf: PathBuf,
}

impl PodCgroup {
    pub fn create(tag: &str, uid: &str) -> PodCgroup {
        let root = cgroup2_root();
        assert!(
            root.join("cgroup.procs").exists(),
            "no cgroup v2 hierarchy at {}; mount one or set TESSERA_CGROUP2_ROOT (this test needs root)",
            root.display()
        );
        let top = root.join(format!("tessera-test-{}-{tag}", std::process::id()));
        let leaf = top.join("kubepods").join(format!("pod{uid}"));
        std::fs::create_dir_all(&leaf)
            .unwrap_or_else(|e| panic!("cannot create {} (run as root): {e}", leaf.display()));
        PodCgroup { top, leaf }
    }

    /// Starts the agent's fetch client inside this cgroup.
    pub fn spawn_client(&self, socket: &Path, extra: &[&str]) -> Child {
        let socket = socket.to_str().unwrap();
        let mut args = vec!["fetch-x509", "--socket", socket];
        args.extend_from_slice(extra);
        self.spawn(Path::new(env!("CARGO_BIN_EXE_tessera-agent")), &args)
    }

    /// Runs `program args...` inside this cgroup to completion: (success, stdout, stderr).
    pub fn run(&self, program: &Path, args: &[&str]) -> (bool, String, String) {
        let out = self.spawn(program, args).wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl PodCgroup {
    /// The pod cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.leaf
    }

    /// Starts `program args...` inside this cgroup.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        tessera_tests::netns::spawn_in_cgroup(&self.leaf, None, program.to_str().unwrap(), args)
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Kill whatever a failed test left inside, then remove leaf first.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.leaf).is_ok() || !self.leaf.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(self.leaf.parent().unwrap());
        let _ = std::fs::remove_dir(&self.top);
    }
}

pub use tessera_tests::procs::KillOnDrop as Proc;

/// Starts `tessera-agent run` for `node` against the control plane at
/// `kubeconfig`, with a token file and a socket under `dir`.
pub fn spawn_agent(
    kubeconfig: &Path,
    node: &str,
    signer_port: u16,
    token: &str,
    dir: &Path,
) -> (Proc, PathBuf) {
    spawn_agent_with(kubeconfig, node, signer_port, token, dir, &[])
}

/// [`spawn_agent`] with `extra` arguments.
pub fn spawn_agent_with(
    kubeconfig: &Path,
    node: &str,
    signer_port: u16,
    token: &str,
    dir: &Path,
    extra: &[String],
) -> (Proc, PathBuf) {
    let token_file = dir.join(format!("{node}.token"));
    std::fs::write(&token_file, token).unwrap();
    let socket = dir.join(format!("{node}.sock"));
    let bin = Path::new(env!("CARGO_BIN_EXE_tessera-agent"));
    let child =
        tessera_tests::procs::agent_run(bin, kubeconfig, node, signer_port, &token_file, &socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    (Proc(child), socket)
}

/// Retries `tessera-agent fetch-x509` in `cgroup` until it succeeds (the pod
/// needs an identity and the agent an SVID first); its stdout.
pub async fn first_fetch(cgroup: &PodCgroup, socket: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = cgroup.spawn_client(socket, &[]).wait_with_output().unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SVID within 60 s; last answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Starts `tessera-operator run` for trust domain `cluster.test` against the
/// control plane at `kubeconfig`, its signer on loopback `signer_port`,
/// issuing X.509-SVIDs valid for `svid_ttl` seconds.
pub fn start_operator(kubeconfig: &Path, signer_port: u16, svid_ttl: u64) -> Proc {
    start_operator_with(kubeconfig, signer_port, svid_ttl, &[])
}

/// [`start_operator`] with `extra` arguments.
pub fn start_operator_with(
    kubeconfig: &Path,
    signer_port: u16,
    svid_ttl: u64,
    extra: &[String],
) -> Proc {
    let bin = tessera_tests::workspace_bin("tessera-operator").unwrap();
    Proc(
        tessera_tests::procs::operator_run(&bin, kubeconfig, "cluster.test")
            .args(["--metrics-addr=127.0.0.1:0", "--lease-duration=3"])
            .arg(format!("--signer-addr=127.0.0.1:{signer_port}"))
            .arg(format!("--svid-ttl-seconds={svid_ttl}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Runs `spire-agent api <args> -socketPath <socket>`, inside `cgroup`
/// when given: whether it succeeded, and stdout and stderr together.
pub fn spire_api(
    spire_agent: &Path,
    socket: &Path,
    cgroup: Option<&PodCgroup>,
    args: &[&str],
) -> (bool, String) {
    let mut all = vec!["api"];
    all.extend_from_slice(args);
    all.extend(["-socketPath", socket.to_str().unwrap()]);
    let (ok, out, err) = match cgroup {
        Some(cgroup) => cgroup.run(spire_agent, &all),
        None => {
            let o = Command::new(spire_agent).args(&all).output().unwrap();
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        }
    };
    (ok, format!("{out}{err}"))
}

/// A JWT-SVID for `audience` from a Workload API (`spire-agent api fetch
/// jwt`), and the JWT bundles' trust domain IDs the same call printed.
pub fn fetch_jwt(
    spire_agent: &Path,
    socket: &Path,
    cgroup: Option<&PodCgroup>,
    audience: &str,
) -> (String, Vec<String>) {
    let (ok, out) = spire_api(
        spire_agent,
        socket,
        cgroup,
        &["fetch", "jwt", "-audience", audience],
    );
    assert!(ok, "fetch jwt: {out}");
    let lines: Vec<&str> = out.lines().collect();
    let token = lines
        .iter()
        .position(|l| l.starts_with("token("))
        .and_then(|i| lines.get(i + 1))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|| panic!("no token in:\n{out}"));
    let bundles = lines
        .iter()
        .filter_map(|l| l.strip_prefix("bundle(")?.strip_suffix("):"))
        .map(str::to_owned)
        .collect();
    (token, bundles)
}

/// Validates `token` for `audience` through a Workload API (`spire-agent
/// api validate jwt`): whether it was valid, and what was printed.
pub fn validate_jwt(
    spire_agent: &Path,
    socket: &Path,
    cgroup: Option<&PodCgroup>,
    audience: &str,
    token: &str,
) -> (bool, String) {
    spire_api(
        spire_agent,
        socket,
        cgroup,
        &["validate", "jwt", "-audience", audience, "-svid", token],
    )
}

/// A gRPC channel to the Workload API at `socket`.
pub async fn workload_api_channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// One FetchX509SVID call on `channel` (with the security header): the
/// first answer, or the refusal.
pub async fn fetch_x509_once(
    channel: tonic::transport::Channel,
) -> Result<tessera_api::workload_api::X509svidResponse, tonic::Status> {
    use tessera_api::workload_api::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let mut request = tonic::Request::new(tessera_api::workload_api::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the stream ended without an answer"))
}

/// The simulated nodes of the e2e tests and their addresses.
pub const NODES: [(&str, &str); 3] = [
    ("node-a", "198.18.0.1"),
    ("node-b", "198.18.0.2"),
    ("node-c", "198.18.0.3"),
];

/// A control plane with the two nodes' objects and the pods' service
/// accounts; fails unless bpffs can be had (root).
pub async fn control_plane() -> (tessera_tests::ControlPlane, kube::Client) {
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
    // Pods labelled app=forger get no identity: the template needs a label
    // they lack (see e2e_datapath's `forged_identity_is_refused`).
    resources::apply_manifest(
        &client,
        "apiVersion: tessera.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {name: forgers}\n\
         spec:\n  spiffeIDTemplate: \"spiffe://{trustDomain}/tier/{podLabel:tier}\"\n  podSelector: {matchLabels: {app: forger}}\n",
    )
    .await
    .unwrap();
    (cp, client)
}

/// How the e2e tests' agents run: this build's binary, logs echoed, state
/// and sockets in `dir`, `extra` arguments by node.
pub fn launch(
    cp: &tessera_tests::ControlPlane,
    dir: &Path,
    signer_port: u16,
    extra: Vec<(String, Vec<String>)>,
) -> AgentLaunch {
    AgentLaunch {
        bin: env!("CARGO_BIN_EXE_tessera-agent").into(),
        kubeconfig: cp.kubeconfig().to_owned(),
        signer_port,
        dir: dir.to_owned(),
        echo: true,
        extra,
    }
}

/// The simulated nodes, and agents for node-a and node-b started with
/// `launch`, in sync; returns the cluster and the agents' token files.
pub async fn cluster_with_agents(
    client: &kube::Client,
    launch: &AgentLaunch,
) -> (SimCluster, Vec<std::path::PathBuf>) {
    let mut cluster = SimCluster::create(
        client.clone(),
        &cgroup2_root(),
        &format!("tessera-e2e-{}", std::process::id()),
        &NODES,
    )
    .await;
    let mut token_files = Vec::new();
    for node in ["node-a", "node-b"] {
        let token_file = resources::agent_token_file(client, node, TOKEN_AUDIENCE, &launch.dir)
            .await
            .unwrap();
        cluster.start_agent(launch, node, &token_file);
        token_files.push(token_file);
    }
    for agent in &cluster.agents {
        agent.wait_for("data path in sync", 1).await;
    }
    (cluster, token_files)
}

/// A workload's HTTP server (Go's net/http: HTTP/1.1 and h2c) and the file it logs requests to.
pub struct HttpServer {
    _proc: Proc,
    log: PathBuf,
}

impl HttpServer {
    /// Starts `workload http` on `port` in `pod`, logging to `dir`.
    pub fn start(pod: &tessera_tests::cluster::SimPod, port: u16, dir: &Path) -> HttpServer {
        let bins = tessera_tests::testbin::TestBins::ensure_built().unwrap();
        let log = dir.join(format!("{}-requests.log", pod.name));
        let mut child = pod.cgroup.spawn_in(
            &pod.ns,
            bins.node.workload.to_str().unwrap(),
            &["http", &port.to_string(), &pod.name, log.to_str().unwrap()],
        );
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("serving HTTP"), "workload http: {line}");
        HttpServer {
            _proc: Proc(child),
            log,
        }
    }

    /// The requests the workload got: "<proto> <method> <uri> <xfcc>".
    pub fn seen(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
