//! The real data path the churn test drives: the agent's [`DataPlane`] over
//! pinned maps and a sled cache, its programs attached to a cgroup of
//! this test's own, one cgroup per local pod, and a network namespace with
//! no route anywhere for the connect() calls the egress gate decides.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tessera_agent::datapath::maps::DataPlane;
use tessera_agent::datapath::view::PodView;
use tessera_api::crd::IdentityPolicySpec;
use tessera_bpf::abi::Reason;
use tessera_bpf::packets;

use crate::model::Model;

pub struct Kernel {
    pin_dir: PathBuf,
    cache_dir: PathBuf,
    plane: Option<DataPlane>,
    /// Where the programs are attached; pod cgroups sit below.
    top: PathBuf,
    /// This process's own cgroup, to return to after each connect round.
    home: PathBuf,
    /// Each local pod's cgroup and its id.
    cgroups: BTreeMap<String, (PathBuf, u64)>,
    netns_name: String,
    netns: File,
}

fn cgroup2_root() -> PathBuf {
    std::env::var_os("TESSERA_CGROUP2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// This process's cgroup in the v2 hierarchy mounted at `root`.
fn own_cgroup(root: &Path) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup v2 line in /proc/self/cgroup");
    root.join(path.trim_start_matches('/'))
}

fn join(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("cannot move into {}: {e}", cgroup.display()));
}

impl Kernel {
    pub fn new(state: &Path) -> Kernel {
        tessera_bpf::pinning::ensure_bpffs(Path::new("/sys/fs/bpf"))
            .expect("bpffs at /sys/fs/bpf (this test needs root)");
        let pid = std::process::id();
        let root = cgroup2_root();
        assert!(
            root.join("cgroup.procs").exists(),
            "no cgroup v2 hierarchy at {}; mount one or set TESSERA_CGROUP2_ROOT (this test needs root)",
            root.display()
        );
        let top = root.join(format!("tessera-churn-{pid}"));
        std::fs::create_dir_all(&top).unwrap();
        let netns_name = format!("tessera-churn-{pid}");
        let ok = Command::new("ip")
            .args(["netns", "add", &netns_name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "ip netns add {netns_name} failed (needs root and iproute2)"
        );
        let netns = File::open(format!("/run/netns/{netns_name}")).unwrap();
        let pin_root = Path::new("/sys/fs/bpf").join(format!("tessera-churn-{pid}"));
        let mut k = Kernel {
            pin_dir: tessera_bpf::pinning::version_dir(&pin_root),
            cache_dir: state.join("authcache"),
            plane: None,
            home: own_cgroup(&root),
            top,
            cgroups: BTreeMap::new(),
            netns_name,
            netns,
        };
        k.open();
        k
    }

    pub fn plane(&self) -> &DataPlane {
        self.plane.as_ref().unwrap()
    }

    fn open(&mut self) {
        let (plane, opened) =
            DataPlane::open(Some(&self.pin_dir), &self.cache_dir, Arc::default()).unwrap();
        assert!(opened.discarded.is_none(), "{:?}", opened.discarded);
        plane.with_datapath(|dp| dp.attach(&self.top)).unwrap();
        self.plane = Some(plane);
    }

    /// Puts the model into the maps as the agent would, local pods' cgroups
    /// included.
    pub fn sync(&mut self, model: &Model) {
        for (uid, pod) in &model.pods {
            if pod.is_local() && !self.cgroups.contains_key(uid) {
                let dir = self.top.join(uid);
                std::fs::create_dir_all(&dir).unwrap();
                let id = tessera_bpf::datapath::cgroup_id(&dir).unwrap();
                self.cgroups.insert(uid.clone(), (dir, id));
            }
        }
        let specs: std::sync::Arc<Vec<IdentityPolicySpec>> =
            std::sync::Arc::new(model.specs.values().cloned().collect());
        let cgroups = &self.cgroups;
        self.plane()
            .apply(&model.view(), &model.table(), &specs, &mut |p: &PodView| {
                cgroups.get(&*p.uid).map(|c| c.1)
            })
            .unwrap();
        let gone: Vec<String> = self
            .cgroups
            .keys()
            .filter(|uid| !model.pods.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some((dir, _)) = self.cgroups.remove(&uid) {
                std::fs::remove_dir(&dir).unwrap();
            }
        }
    }

    /// Drops the data path and cache (as a killed agent would) and opens
    /// them again from the pins and the cache directory.
    pub fn restart(&mut self, model: &Model) -> usize {
        self.plane.take();
        self.open();
        self.sync(model);
        self.plane().restore(&model.view()).unwrap()
    }

    /// The ingress program's verdict on a connection start (BPF_PROG_TEST_RUN).
    pub fn ingress_allows(&self, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        let packet = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                packets::ipv4(s.octets(), d.octets(), packets::TCP, port, packets::SYN)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => packets::ipv6_syn(s.octets(), d.octets(), port),
            _ => panic!("mixed families: {src} -> {dst}"),
        };
        let (ret, _) = self
            .plane()
            .with_datapath(|dp| dp.test_ingress(&packet, 1))
            .unwrap();
        ret == 1
    }

    /// The egress gate's verdicts on real connect() calls, each made by
    /// this process from the cgroup of local pod `uid` (in a namespace with
    /// no routes: an admitted connect() fails with ENETUNREACH and sends
    /// nothing, a refused one with EPERM; a held one is admitted, and
    /// counted under its reason).
    pub fn connects(&self, checks: &[(String, IpAddr, u16)]) -> Vec<Gate> {
        let (cgroups, home) = (&self.cgroups, &self.home);
        let held = || {
            self.plane()
                .with_datapath(|dp| dp.counter(Reason::HoldAuthPending))
                .unwrap()
        };
        tessera_agent::netns::run_in(&self.netns, || {
            let mut out = Vec::with_capacity(checks.len());
            let mut current: Option<&str> = None;
            for (uid, ip, port) in checks {
                if current != Some(uid.as_str()) {
                    join(&cgroups[uid].0);
                    current = Some(uid);
                }
                let before = held();
                let got = std::net::TcpStream::connect_timeout(
                    &SocketAddr::new(*ip, *port),
                    Duration::from_millis(200),
                );
                out.push(Gate {
                    admitted: !matches!(&got, Err(e) if e.raw_os_error() == Some(1)),
                    held: held() > before,
                });
            }
            join(home);
            Ok(out)
        })
        .unwrap()
    }
}

/// What the egress gate did with one connect().
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// connect() went ahead (no EPERM).
    pub admitted: bool,
    /// It went ahead to wait for its authentication.
    pub held: bool,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.plane.take();
        join(&self.home);
        for (dir, _) in self.cgroups.values() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.top);
        let _ = tessera_bpf::datapath::Datapath::remove_pins(&self.pin_dir);
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns_name])
            .status();
    }
}
