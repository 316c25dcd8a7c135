//! A real Kubernetes node on this machine for the tests: containerd v2 with
//! runc and its CRI plugin, the CNI plugins from Debian (bridge and
//! host-local, pods in [`POD_SUBNET`] on bridge [`BRIDGE`]), a kubelet and
//! kube-proxy registered with a test [`ControlPlane`] whose API server
//! listens on the bridge's address ([`control_plane`]), and the
//! controllers a cluster runs beside them (kube-scheduler,
//! kube-controller-manager). Images come from OCI archives
//! imported with `ctr`; nothing is pulled (the sandbox image is built here
//! from the static `workload` program, see [`TestImages`]).
//!
//! This machine's facts the node is configured for: cgroup v1 controllers
//! with cgroup v2 mounted at `/sys/fs/cgroup/unified` (the kubelet runs
//! with `failCgroupV1: false` and the cgroupfs driver; runc also places
//! every container in the v2 hierarchy, where the agent attaches), no
//! systemd as PID 1, no swap, and no CAP_SYS_RESOURCE in the bounding set
//! (containerd keeps OOM scores at or above its own:
//! `restrict_oom_score_adj`).
//!
//! The agent's volumes ask for `HostToContainer` mount propagation, which
//! containerd grants only from shared host mounts: systemd makes every
//! mount shared, this machine's are private. The node makes the mounts at
//! and below [`SHARED_MOUNTS`] shared while it runs and private again on
//! drop (only those that were private).
//!
//! The kubelet changes the host when it starts: a few kernel tunables
//! ([`SYSCTLS`]; read before and written back when the node is dropped) and
//! iptables chains `KUBE-FIREWALL` (drops packets to 127.0.0.0/8 from other
//! sources) and `KUBE-KUBELET-CANARY`, removed on drop. On drop the node
//! also removes its pods, stops containerd's shims, unmounts what the
//! kubelet mounted, removes the `kubepods` cgroups and deletes the bridge.

mod config;
mod host;
pub mod olm;

use config::{cni_config, containerd_config, kube_proxy_config, kubelet_config};
pub use host::iptables_rules;
use host::{
    copy_tree, private_mounts_below, remove_kube_chains, remove_pod_cgroups, unmount_below,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::KillOnDrop;
use crate::{ControlPlane, TestBins, free_port};

/// The node's name.
pub const NODE_NAME: &str = "real-node";
/// The CNI bridge on the host.
pub const BRIDGE: &str = "tsr-cni0";
/// The pods' addresses (inside the tests' 198.18.0.0/15, apart from the
/// simulated nodes' 198.18.N.0/24).
pub const POD_SUBNET: &str = "198.19.128.0/24";
/// The bridge's own address in [`POD_SUBNET`]: the pods' gateway.
pub const GATEWAY: &str = "198.19.128.1";
/// Where, under the temporary directory, the last node's logs are kept.
pub const LOGS: &str = "tessera-real-node-logs";
/// The CNI network's name.
const CNI_NETWORK: &str = "tessera-test";
/// host-local's directory in the node's directory.
const CNI_IPAM: &str = "cni-ipam";
/// The containers' logs, in the node's directory and in [`LOGS`].
const POD_LOGS: &str = "pod-logs";
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The kernel tunables the kubelet sets at start (its defaults for a node),
/// restored when the node is dropped.
pub const SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The images the node tests run: the pod sandbox (`pause`) and the
/// workloads, both holding only the static `workload` program, and SPIRE's
/// agent as a Workload API client.
#[derive(Debug, Clone)]
pub struct TestImages {
    /// The sandbox image's name.
    pub pause: String,
    /// The workload image's name (entrypoint `/workload`).
    pub workload: String,
    /// `spire-agent` and the libraries it links (entrypoint
    /// `/spire-agent`).
    pub spire_agent: String,
}

/// A running node. Dropping it stops everything it started.
#[derive(Debug)]
pub struct RealNode {
    dir: PathBuf,
    bins: TestBins,
    sysctls: BTreeMap<&'static str, String>,
    images: TestImages,
    kubelet: Option<KillOnDrop>,
    containerd: Option<KillOnDrop>,
    /// kube-proxy, kube-scheduler, kube-controller-manager, CoreDNS.
    others: Vec<KillOnDrop>,
    /// Host paths Tessera's agent writes that did not exist before the
    /// node started: removed when it stops.
    agent_paths: Vec<PathBuf>,
    /// Mount points made shared for the node, private again on drop.
    made_shared: Vec<PathBuf>,
}

/// Host mounts the agent DaemonSet mounts with `HostToContainer`
/// propagation (`deploy/agent.yaml`): made shared while the node runs.
pub const SHARED_MOUNTS: [&str; 2] = ["/sys/fs/bpf", "/sys/fs/cgroup"];

/// The host paths the agent DaemonSet writes (`deploy/agent.yaml`): its
/// pins, its Workload API socket's directory, its auth cache.
pub const AGENT_HOST_PATHS: [&str; 3] = ["/sys/fs/bpf/tessera", "/run/tessera", "/var/lib/tessera"];

/// Creates the bridge, then a control plane whose API server listens on
/// [`GATEWAY`], where the node's pods reach it (through the `kubernetes`
/// Service too). Start the node with [`RealNode::start`] next.
pub async fn control_plane() -> Result<ControlPlane> {
    if !crate::is_root() {
        bail!("a real node needs root (containerd, runc, CNI, the kubelet)");
    }
    make_bridge()?;
    ControlPlane::start_at(GATEWAY.parse()?).await
}

impl RealNode {
    /// Starts containerd, the kubelet, kube-proxy and the controllers under
    /// `cp`'s directory (`cp` from [`control_plane`]) and waits until the
    /// Node is Ready. Needs root.
    pub async fn start(cp: &ControlPlane) -> Result<RealNode> {
        if !crate::is_root() {
            bail!("a real node needs root (containerd, runc, CNI, the kubelet)");
        }
        let bins = TestBins::locate()?;
        let dir = cp.dir().join("node");
        std::fs::create_dir_all(&dir)?;
        let sysctls = SYSCTLS
            .iter()
            .map(|s| Ok((*s, std::fs::read_to_string(Path::new("/proc/sys").join(s))?)))
            .collect::<Result<_>>()?;
        let images = build_images(&bins, &dir)?;
        let mut node = RealNode {
            dir,
            bins,
            sysctls,
            images,
            kubelet: None,
            containerd: None,
            others: Vec::new(),
            agent_paths: AGENT_HOST_PATHS
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
            made_shared: Vec::new(),
        };
        node.share_mounts()?;
        node.start_containerd()?;
        node.import_images()?;
        node.start_coredns(cp)?;
        node.start_kubelet(cp)?;
        node.start_controllers(cp)?;
        node.wait_ready(cp).await?;
        Ok(node)
    }

    /// The images built for the tests.
    pub fn images(&self) -> &TestImages {
        &self.images
    }

    /// The node's directory (configs and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn start_containerd(&mut self) -> Result<()> {
        let cni = self.dir.join("cni");
        std::fs::create_dir_all(&cni)?;
        std::fs::write(
            cni.join("10-tessera-test.conflist"),
            cni_config(&self.dir.join(CNI_IPAM)),
        )?;
        let config = self.dir.join("containerd.toml");
        std::fs::write(
            &config,
            containerd_config(&self.dir, &self.bins, &self.images),
        )?;
        let runtime_dir = self.bins.node.containerd.parent().context("no bin dir")?;
        let path = format!(
            "{}:{}",
            runtime_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(&self.bins.node.containerd)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("containerd.log"))?)
            .spawn()
            .context("cannot start containerd")?;
        self.containerd = Some(KillOnDrop(child));
        for _ in 0..200 {
            if self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "containerd did not start; see {}",
            self.dir.join("containerd.log").display()
        )
    }

    /// Runs `ctr` against this node's containerd in namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bins.node.ctr)
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI image archive into the node's image store.
    pub fn import(&self, archive: &Path) -> Result<()> {
        let archive = archive.to_str().context("archive path")?;
        self.ctr(&["images", "import", "--local", archive])
            .map(|_| ())
    }

    /// What `container` of pod `namespace/pod` wrote (stdout and stderr,
    /// without the CRI log format's time and stream), from the node's pod
    /// logs; empty when it wrote nothing yet.
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let prefix = format!("{namespace}_{pod}_");
        let Ok(entries) = std::fs::read_dir(self.dir.join(POD_LOGS)) else {
            return String::new();
        };
        let mut out = String::new();
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path().join(container).join("0.log"));
            for line in text.unwrap_or_default().lines() {
                // <time> <stream> <P|F> <text>
                if let Some(text) = line.splitn(4, ' ').nth(3) {
                    out.push_str(text);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Whether host-local holds `address` for no pod.
    pub fn pod_address_free(&self, address: std::net::Ipv4Addr) -> bool {
        !self
            .dir
            .join(CNI_IPAM)
            .join(CNI_NETWORK)
            .join(address.to_string())
            .exists()
    }

    /// Makes the CNI give `address` to the next pod: host-local hands out
    /// the free address after the last one it reserved, so this sets that
    /// to the one before `address` (which must be free by then).
    pub fn next_pod_address(&self, address: std::net::Ipv4Addr) -> Result<()> {
        let before = std::net::Ipv4Addr::from(u32::from(address) - 1);
        let file = self
            .dir
            .join(CNI_IPAM)
            .join(CNI_NETWORK)
            .join("last_reserved_ip.0");
        std::fs::write(&file, before.to_string())
            .with_context(|| format!("cannot write {}", file.display()))
    }

    /// Writes Tessera's images from this workspace's debug binaries (`cargo
    /// xtask images --profile dev --no-build`) and imports them (the names
    /// `deploy/` and the bundle give) with the bundle image; returns the
    /// bundle image's digest.
    pub fn import_tessera(&self) -> Result<String> {
        let out = self.dir.join("images");
        let status = Command::new(crate::workspace_bin("xtask")?)
            .args(["images", "--profile", "dev", "--no-build", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .context("cannot run xtask images")?;
        if !status.success() {
            bail!("xtask images failed ({status})");
        }
        for image in ["tessera-operator", "tessera-agent", "tessera-bundle"] {
            self.import(&out.join(format!("{image}.oci.tar")))?;
        }
        // OLM names bundles by digest (and pulls any other reference):
        // the bundle also gets its repository@digest name.
        let repository = "localhost/tessera/tessera-bundle";
        let tagged = format!("{repository}:{}", env!("CARGO_PKG_VERSION"));
        let digest = self.image_digest(&tagged)?;
        self.ctr(&[
            "images",
            "tag",
            "--force",
            &tagged,
            &format!("{repository}@{digest}"),
        ])?;
        Ok(digest)
    }

    /// The digest of imported image `name` (`ctr images ls`).
    pub fn image_digest(&self, name: &str) -> Result<String> {
        let list = self.ctr(&["images", "ls"])?;
        list.lines()
            .find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(name))
                    .then(|| words.nth(1).map(str::to_owned))
                    .flatten()
            })
            .with_context(|| format!("no image {name} in containerd:\n{list}"))
    }

    fn import_images(&self) -> Result<()> {
        for name in ["pause", "workload", "spire-agent"] {
            self.import(&self.dir.join(format!("{name}.oci.tar")))?;
        }
        Ok(())
    }

    fn start_kubelet(&mut self, cp: &ControlPlane) -> Result<()> {
        let config = self.dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            kubelet_config(
                &self.socket(),
                &self.dir.join(POD_LOGS),
                free_port()?,
                free_port()?,
            ),
        )?;
        let child = Command::new(&self.bins.node.kubelet)
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg(format!("--root-dir={}", self.dir.join("kubelet").display()))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kubelet-pki").display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={GATEWAY}"))
            .arg("--v=2")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("kubelet.log"))?)
            .spawn()
            .context("cannot start the kubelet")?;
        self.kubelet = Some(KillOnDrop(child));
        Ok(())
    }

    /// CoreDNS on [`GATEWAY`]:53 answering for `cluster.local` from the API
    /// server (the kubelet gives pods this address as their DNS server).
    fn start_coredns(&mut self, cp: &ControlPlane) -> Result<()> {
        let corefile = self.dir.join("Corefile");
        std::fs::write(
            &corefile,
            format!(
                ".:53 {{\n    bind {GATEWAY}\n    errors\n    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n        kubeconfig {}\n        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n    }}\n    cache 5\n}}\n",
                cp.kubeconfig().display()
            ),
        )?;
        let child = Command::new(&self.bins.node.coredns)
            .arg("-conf")
            .arg(&corefile)
            .stdout(std::fs::File::create(self.dir.join("coredns.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start coredns")?;
        self.others.push(KillOnDrop(child));
        Ok(())
    }

    /// kube-proxy (iptables), kube-scheduler and kube-controller-manager,
    /// each with the admin kubeconfig, serving only on loopback.
    fn start_controllers(&mut self, cp: &ControlPlane) -> Result<()> {
        let pki = cp.pki().context("the control plane has no PKI")?;
        let kubeconfig = format!("--kubeconfig={}", cp.kubeconfig().display());
        let proxy_config = self.dir.join("kube-proxy.yaml");
        std::fs::write(
            &proxy_config,
            kube_proxy_config(cp.kubeconfig(), free_port()?, free_port()?),
        )?;
        let n = &self.bins.node;
        let commands = [
            ("kube-proxy", {
                let mut c = Command::new(&n.kube_proxy);
                c.arg(format!("--config={}", proxy_config.display()));
                c
            }),
            ("kube-scheduler", {
                let mut c = Command::new(&n.kube_scheduler);
                c.args([
                    kubeconfig.as_str(),
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                ])
                .arg(format!("--secure-port={}", free_port()?));
                c
            }),
            ("kube-controller-manager", {
                let mut c = Command::new(&n.kube_controller_manager);
                c.args([
                    kubeconfig.as_str(),
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                ])
                .arg(format!("--secure-port={}", free_port()?))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    pki.sa_key.display()
                ))
                .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
                .arg("--use-service-account-credentials=false");
                c
            }),
        ];
        for (name, mut command) in commands {
            let child = command
                .arg("--v=1")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.join(format!("{name}.log")))?)
                .spawn()
                .with_context(|| format!("cannot start {name}"))?;
            self.others.push(KillOnDrop(child));
        }
        Ok(())
    }

    async fn wait_ready(&self, cp: &ControlPlane) -> Result<()> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cp.client().await?);
        for _ in 0..600 {
            let ready = nodes.get_opt(NODE_NAME).await?.is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "node {NODE_NAME} did not become Ready in 60 s; see {}",
            self.dir.join("kubelet.log").display()
        )
    }

    /// Stops every pod, then the kubelet, containerd and its shims; removes
    /// the bridge and restores the kernel tunables.
    fn stop(&mut self) {
        self.others.clear();
        drop(self.kubelet.take());
        self.keep_logs();
        let _ = Command::new(&self.bins.node.crictl)
            .arg(format!(
                "--runtime-endpoint=unix://{}",
                self.socket().display()
            ))
            .args(["rmp", "--all", "--force"])
            .output();
        drop(self.containerd.take());
        // The shims outlive containerd; each names our socket.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("containerd-shim-runc-v2.*{}", self.socket().display()),
            ])
            .status();
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        unmount_below(&self.dir);
        for path in &self.agent_paths {
            let _ = std::fs::remove_dir_all(path);
        }
        remove_pod_cgroups();
        remove_kube_chains();
        for mount in self.made_shared.iter().rev() {
            let _ = Command::new("mount")
                .arg("--make-private")
                .arg(mount)
                .status();
        }
        for (name, value) in &self.sysctls {
            let _ = std::fs::write(Path::new("/proc/sys").join(name), value);
        }
    }
}

impl RealNode {
    /// Makes the private mounts at and below [`SHARED_MOUNTS`] shared,
    /// remembering them for [`RealNode::stop`].
    fn share_mounts(&mut self) -> Result<()> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        for mount in private_mounts_below(&mountinfo, &SHARED_MOUNTS) {
            let status = Command::new("mount")
                .arg("--make-shared")
                .arg(&mount)
                .status()
                .context("cannot run mount")?;
            if !status.success() {
                bail!("mount --make-shared {} failed ({status})", mount.display());
            }
            self.made_shared.push(mount);
        }
        Ok(())
    }

    /// Copies the kubelet's and containerd's logs to [`LOGS`] (the node's
    /// own directory goes with the control plane's).
    fn keep_logs(&self) {
        let logs = std::env::temp_dir().join(LOGS);
        let _ = std::fs::create_dir_all(&logs);
        for name in [
            "kubelet.log",
            "containerd.log",
            "kube-proxy.log",
            "kube-scheduler.log",
            "kube-controller-manager.log",
            "coredns.log",
        ] {
            let _ = std::fs::copy(self.dir.join(name), logs.join(name));
        }
        let _ = std::fs::remove_dir_all(logs.join(POD_LOGS));
        copy_tree(&self.dir.join(POD_LOGS), &logs.join(POD_LOGS));
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates [`BRIDGE`] with [`GATEWAY`] before the first pod's CNI call
/// would, so the kubelet's `--node-ip` exists from its start.
fn make_bridge() -> Result<()> {
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    for args in [
        vec!["link", "add", BRIDGE, "type", "bridge"],
        vec!["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE],
        vec!["link", "set", BRIDGE, "up"],
    ] {
        let out = Command::new("ip")
            .args(&args)
            .output()
            .context("cannot run ip (iproute2)")?;
        if !out.status.success() {
            bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// Writes `pause.oci.tar` and `workload.oci.tar` into `dir`: one layer with
/// the static `workload` program at `/workload`, as user 65532.
fn build_images(bins: &TestBins, dir: &Path) -> Result<TestImages> {
    let program = std::fs::read(&bins.node.workload)?;
    let tag = &crate::oci::sha256(&program)[7..23];
    let mut files = BTreeMap::new();
    files.insert("/workload".to_owned(), program);
    let layer = crate::oci::tar(&files, 0o755);
    let spire_layer = crate::oci::tar(
        &crate::oci::binary_files(&bins.spire_agent, "/spire-agent")?,
        0o755,
    );
    let images = TestImages {
        pause: format!("localhost/tessera-test/pause:{tag}"),
        workload: format!("localhost/tessera-test/workload:{tag}"),
        spire_agent: format!(
            "localhost/tessera-test/spire-agent:{}",
            crate::testbin::SPIRE_VERSION
        ),
    };
    for (file, name, layer, cmd) in [
        ("pause", &images.pause, &layer, "/workload pause"),
        ("workload", &images.workload, &layer, "/workload"),
        (
            "spire-agent",
            &images.spire_agent,
            &spire_layer,
            "/spire-agent",
        ),
    ] {
        let cmd: Vec<&str> = cmd.split(' ').collect();
        let config = serde_json::json!({ "Entrypoint": cmd, "User": "65532:65532" });
        crate::oci::write_archive(&dir.join(format!("{file}.oci.tar")), name, layer, config)?;
    }
    Ok(images)
}
