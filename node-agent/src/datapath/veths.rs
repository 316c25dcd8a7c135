//! Where each local pod's traffic enters the node: the host side of its
//! veth. The agent finds that interface (rtnetlink in the pod's network
//! namespace names the peer, rtnetlink here confirms it points back),
//! writes the pod's addresses for it and attaches `ts_from_pod` there, so a
//! pod sends only from its own addresses (ARP and neighbour advertisements
//! included) and its connection starts meet the egress gate even when no
//! connect() made them (raw and packet sockets). Pods on the host network
//! have no veth of their own and are left out.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use tessera_bpf::datapath::DatapathError;
use tracing::{debug, info, warn};

use crate::datapath::DataPlane;
use crate::netns::NetnsError;
use crate::netns::rtnetlink::{self, Link, RtnetlinkError};
use crate::sync::lock;

/// Why a pod's veth could not be found or checked (logged; retried on the
/// next pass).
#[derive(Debug, thiserror::Error)]
pub enum VethError {
    /// Listing interfaces failed.
    #[error(transparent)]
    Rtnetlink(#[from] RtnetlinkError),
    /// No veth of the pod's namespace has its peer in the agent's.
    #[error(
        "the pod's network namespace has no veth whose peer is in the agent's namespace; the CNI must connect pods by veth pairs to the host (is the agent on the host network?)"
    )]
    NoVeth,
    /// The pod's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The eBPF maps or program refused.
    #[error("eBPF: {0}")]
    Datapath(#[from] DatapathError),
}

/// A local pod whose veth should be checked.
#[derive(Debug, Clone)]
pub struct Want {
    /// The pod's UID.
    pub uid: std::sync::Arc<str>,
    /// `namespace/name`, for logs.
    pub pod: std::sync::Arc<str>,
    /// Its cgroup (to reach its network namespace).
    pub cgroup: PathBuf,
    /// Its addresses.
    pub ips: std::sync::Arc<[IpAddr]>,
}

#[derive(Debug)]
struct Checked {
    ifindex: u32,
    ips: std::sync::Arc<[IpAddr]>,
    inode: u64,
}

/// How often every checked pod's namespace is looked at again (a
/// recreated sandbox has a new veth); between such passes only new and
/// changed pods are, and pods that failed for less than this long.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The veths checked for this node's pods.
#[derive(Debug, Default)]
pub struct Veths {
    checked: Mutex<HashMap<std::sync::Arc<str>, Checked>>,
    /// The last reason each wanted pod's veth could not be checked, and
    /// since when it fails.
    failing: Mutex<HashMap<std::sync::Arc<str>, (String, std::time::Instant)>>,
    /// Whether what a previous agent left in the maps was swept.
    swept: Mutex<bool>,
    /// When every wanted pod was last looked at.
    last_full: Mutex<Option<std::time::Instant>>,
}

/// The host-side interface of the veth whose other end is in `netns`.
pub fn host_side(netns: &std::fs::File) -> Result<Link, VethError> {
    let inside = crate::netns::run_in(netns, || Ok(rtnetlink::links()))
        .map_err(|e| RtnetlinkError::Io("cannot enter the pod's network namespace", e))??;
    let here = rtnetlink::links()?;
    inside
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .find_map(|pod_end| {
            let peer = pod_end.peer?;
            here.iter()
                .find(|h| {
                    h.index == peer
                        && h.kind.as_deref() == Some("veth")
                        && h.peer == Some(pod_end.index)
                })
                .cloned()
        })
        .ok_or(VethError::NoVeth)
}

impl Veths {
    /// Brings the checked veths in line with `wanted`: new pods (and pods
    /// whose sandbox was recreated) get their veth found, their addresses
    /// written and the program attached; pods gone stop being checked.
    pub fn reconcile(&self, plane: &DataPlane, wanted: &[Want]) {
        self.sweep_leftovers(plane, wanted);
        let full = {
            let mut last = lock(&self.last_full);
            let full = last.is_none_or(|at| at.elapsed() >= RECHECK);
            if full {
                *last = Some(std::time::Instant::now());
            }
            full
        };
        for want in wanted.iter().filter(|w| full || self.worth_a_look(w)) {
            match self.check(plane, want) {
                Ok(()) => {
                    lock(&self.failing).remove(&want.uid);
                }
                Err(e) => {
                    let why = e.to_string();
                    let mut failing = lock(&self.failing);
                    let since = failing
                        .get(&want.uid)
                        .map_or_else(std::time::Instant::now, |(_, at)| *at);
                    if failing
                        .insert(want.uid.clone(), (why.clone(), since))
                        .map(|(w, _)| w)
                        != Some(why)
                    {
                        warn!(pod = %want.pod, error = %e, "cannot check what the pod sends; its traffic is checked by the egress gate and at its destinations only");
                    }
                }
            }
        }
        let keep: HashSet<&str> = wanted.iter().map(|w| &*w.uid).collect();
        let gone: Vec<(std::sync::Arc<str>, Checked)> = {
            let mut checked = lock(&self.checked);
            let uids: Vec<std::sync::Arc<str>> = checked
                .keys()
                .filter(|u| !keep.contains(&***u))
                .cloned()
                .collect();
            uids.into_iter()
                .filter_map(|u| checked.remove(&u).map(|c| (u, c)))
                .collect()
        };
        for (uid, c) in gone {
            if let Err(e) = plane.with_datapath(|dp| dp.remove_veth(c.ifindex)) {
                warn!(pod_uid = %uid, error = %e, "cannot stop checking a gone pod's veth");
            }
        }
    }

    /// Between full passes: whether `want` is new, changed, or failing for
    /// less than [`RECHECK`] (a pod whose process is about to start).
    fn worth_a_look(&self, want: &Want) -> bool {
        if let Some((_, since)) = lock(&self.failing).get(&want.uid) {
            return since.elapsed() < RECHECK;
        }
        lock(&self.checked)
            .get(&want.uid)
            .is_none_or(|c| c.ips != want.ips)
    }

    /// Once, at the first pass: interfaces a previous agent checked whose
    /// pods are not wanted any more stop being checked.
    fn sweep_leftovers(&self, plane: &DataPlane, wanted: &[Want]) {
        let mut swept = lock(&self.swept);
        if *swept {
            return;
        }
        // The interfaces of the wanted pods, as far as they can be found now.
        let keep: HashSet<u32> = wanted
            .iter()
            .filter_map(|w| {
                let netns = crate::netns::open_pod(&w.cgroup).ok()?;
                Some(host_side(&netns.file).ok()?.index)
            })
            .collect();
        let result = plane.with_datapath(|dp| -> Result<usize, DatapathError> {
            let stale: Vec<u32> = dp
                .veths()?
                .into_iter()
                .filter(|i| !keep.contains(i))
                .collect();
            for ifindex in &stale {
                dp.remove_veth(*ifindex)?;
            }
            Ok(stale.len())
        });
        match result {
            Ok(n) => {
                *swept = true;
                if n > 0 {
                    info!(
                        interfaces = n,
                        "stopped checking veths of pods gone while the agent was down"
                    );
                }
            }
            Err(e) => warn!(error = %e, "cannot sweep the veths a previous agent checked"),
        }
    }

    fn check(&self, plane: &DataPlane, want: &Want) -> Result<(), VethError> {
        let inode = crate::netns::pod_inode(&want.cgroup);
        if let Some(c) = lock(&self.checked).get(&want.uid)
            && Some(c.inode) == inode
            && c.ips == want.ips
        {
            return Ok(());
        }
        let netns = crate::netns::open_pod(&want.cgroup)?;
        let host = host_side(&netns.file)?;
        let previous = lock(&self.checked).remove(&want.uid);
        plane.with_datapath(|dp| -> Result<(), DatapathError> {
            if let Some(old) = previous.as_ref().filter(|o| o.ifindex != host.index) {
                dp.remove_veth(old.ifindex)?;
            }
            dp.set_veth(host.index, &want.ips)?;
            dp.attach_veth(&host.name, host.index)
        })?;
        debug!(pod = %want.pod, interface = %host.name, ips = ?want.ips, "checking what the pod sends");
        lock(&self.checked).insert(
            want.uid.clone(),
            Checked {
                ifindex: host.index,
                ips: want.ips.clone(),
                inode: netns.inode,
            },
        );
        Ok(())
    }
}
