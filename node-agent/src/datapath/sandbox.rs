//! Pods' addresses before their status gives them.
//!
//! A pod has its address once its sandbox is set up, but the agents learn
//! it from the status the kubelet writes, which often says Running in the
//! same update: the pod's first connection then races the agents' watch.
//! So each agent reads the addresses of its own pods' network namespaces
//! while their status has none, maps them, and vouches for them in the
//! handshakes it makes for those pods' identities; the destination's agent
//! maps them too, before the pod's first packet.
//!
//! What a pod author could do with this is bounded. An address vouched for
//! (by this agent for its pods, or by a peer for its own) is used only
//! while all of this holds:
//!
//! - the pod's status gives no address yet (the status always wins) and the
//!   pod is not on the host network nor being deleted;
//! - the address is in the range of the pod's node (`spec.podCIDRs` of its
//!   Node object; a node without one gets nothing vouched for);
//! - no pod's status gives that address, and no other pod is vouched for
//!   with it;
//! - from a peer: the pod is on the node the peer agent speaks for (checked
//!   against the handshake's source address) and has the identity whose
//!   SVID the peer presented.
//!
//! A pod that adds addresses to its own interface therefore gets at most
//! free addresses of its own node, as its own identity, until its status
//! is written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::datapath::nodes::Cidr;
use crate::datapath::view::PodView;
use crate::netns::NetnsError;
use crate::netns::rtnetlink::{self, RtnetlinkError};

/// How long a claim for a pod this agent does not know yet is kept (the
/// peer's watch may be ahead of this one's).
pub const UNKNOWN_POD_GRACE: Duration = Duration::from_secs(30);
/// The most claims kept from one peer node.
pub const MAX_CLAIMS_PER_NODE: usize = 256;
/// The most addresses one claim may carry.
pub const MAX_ADDRESSES: usize = 8;

/// Why a pod's sandbox addresses could not be read (retried later).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod's network namespace could not be had.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Its addresses could not be listed.
    #[error(transparent)]
    Rtnetlink(#[from] RtnetlinkError),
}

/// Addresses vouched for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The node whose agent vouched (this one for local pods).
    pub node: Arc<str>,
    /// The identity it vouched as (the SVID presented).
    pub spiffe_id: Arc<str>,
    /// The addresses.
    pub ips: Arc<[IpAddr]>,
    /// When it was received or learned.
    pub at: Instant,
}

/// The claims held, by pod UID.
#[derive(Debug, Default)]
pub struct Claims {
    by_uid: Mutex<HashMap<Arc<str>, Claim>>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Claim>> {
        crate::sync::lock(&self.by_uid)
    }

    /// Holds `claim` for pod `uid`; false when it changes nothing, or when
    /// its node already has [`MAX_CLAIMS_PER_NODE`] others held.
    pub fn insert(&self, uid: &str, claim: Claim) -> bool {
        let mut held = self.lock();
        if let Some(old) = held.get(uid) {
            if old.node == claim.node && old.spiffe_id == claim.spiffe_id && old.ips == claim.ips {
                return false;
            }
        } else if held.values().filter(|c| c.node == claim.node).count() >= MAX_CLAIMS_PER_NODE {
            return false;
        }
        held.insert(uid.into(), claim);
        true
    }

    /// Stops holding the claim for `uid`; whether there was one.
    pub fn remove(&self, uid: &str) -> bool {
        self.lock().remove(uid).is_some()
    }

    /// The claims of `node`'s pods of identity `spiffe_id`: (UID, addresses),
    /// in UID order.
    pub fn of(&self, node: &str, spiffe_id: &str) -> Vec<(Arc<str>, Arc<[IpAddr]>)> {
        let held = self.lock();
        let mut out: Vec<(Arc<str>, Arc<[IpAddr]>)> = held
            .iter()
            .filter(|(_, c)| &*c.node == node && &*c.spiffe_id == spiffe_id)
            .map(|(u, c)| (u.clone(), c.ips.clone()))
            .collect();
        out.sort();
        out
    }

    /// Drops the claims no longer needed: their pod's status gives its
    /// addresses, or it is being deleted, or it is unknown for longer than
    /// [`UNKNOWN_POD_GRACE`]. `pods` are the pods as their objects say.
    pub fn prune(&self, pods: &[PodView]) {
        let known: HashMap<&str, &PodView> = pods.iter().map(|p| (&*p.uid, p)).collect();
        self.lock().retain(|uid, claim| match known.get(&**uid) {
            Some(pod) => pod.ips.is_empty() && !pod.terminating && !pod.host_network,
            None => claim.at.elapsed() < UNKNOWN_POD_GRACE,
        });
    }

    /// Gives the pods of `pods` whose status has no address yet the
    /// addresses vouched for them that pass every check of this module's
    /// documentation; `ranges` gives a node's pod ranges. Such pods are
    /// marked `vouched`.
    pub fn apply(&self, pods: &mut [PodView], ranges: &dyn Fn(&str) -> Option<Arc<[Cidr]>>) {
        let held = self.lock();
        if held.is_empty() {
            return;
        }
        let published: HashSet<IpAddr> = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
        let mut wanted: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
        for (i, pod) in pods.iter().enumerate() {
            let Some(claim) = held.get(&pod.uid) else {
                continue;
            };
            if !pod.ips.is_empty()
                || pod.terminating
                || pod.host_network
                || claim.node != pod.node
                || claim.spiffe_id != pod.spiffe_id
            {
                continue;
            }
            let Some(ranges) = ranges(&pod.node) else {
                continue;
            };
            for ip in claim.ips.iter().take(MAX_ADDRESSES) {
                if ranges.iter().any(|r| r.contains(*ip)) && !published.contains(ip) {
                    wanted.entry(*ip).or_default().push(i);
                }
            }
        }
        let mut granted: BTreeMap<usize, Vec<IpAddr>> = BTreeMap::new();
        for (ip, claimants) in wanted {
            // Two pods vouched for with one address: neither gets it.
            if let [only] = claimants[..] {
                granted.entry(only).or_default().push(ip);
            }
        }
        for (i, ips) in granted {
            pods[i].ips = ips.into();
            pods[i].vouched = true;
        }
    }
}

/// A local pod whose sandbox may hold addresses its status does not give.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The pod's UID.
    pub uid: Arc<str>,
    /// `namespace/name`, for logs.
    pub name: Arc<str>,
    /// Its identity.
    pub spiffe_id: Arc<str>,
}

/// How often a pending pod's sandbox is looked into, by how long the pod
/// has been pending: often at first (its first connection waits for it),
/// then less and less.
pub fn poll_interval(pending_for: Duration) -> Duration {
    if pending_for < Duration::from_secs(2) {
        Duration::from_millis(5)
    } else if pending_for < Duration::from_secs(30) {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    }
}

/// Which pending pods are due for a look, by [`poll_interval`].
#[derive(Debug, Default)]
pub struct Poller {
    /// By UID: first seen pending, last looked into.
    seen: HashMap<Arc<str>, (Instant, Instant)>,
}

impl Poller {
    /// The pods of `pending` due now; forgets pods no longer pending.
    pub fn due<'a>(&mut self, pending: &'a [Pending]) -> Vec<&'a Pending> {
        let now = Instant::now();
        let keep: HashSet<&str> = pending.iter().map(|p| &*p.uid).collect();
        self.seen.retain(|uid, _| keep.contains(&**uid));
        pending
            .iter()
            .filter(|p| {
                let (first, last) = self
                    .seen
                    .entry(p.uid.clone())
                    .or_insert((now, now - Duration::from_secs(3600)));
                let due = now.duration_since(*last) >= poll_interval(now.duration_since(*first));
                if due {
                    *last = now;
                }
                due
            })
            .collect()
    }
}

impl Claims {
    /// Looks into the sandbox of each pod of `due` (on `node`, whose pod
    /// ranges are `ranges`; `cgroup_of` finds a pod's cgroup by UID) and
    /// holds what it finds as that pod's claim; the pods whose claim changed.
    pub fn discover(
        &self,
        node: &Arc<str>,
        due: &[&Pending],
        ranges: &[Cidr],
        cgroup_of: &dyn Fn(&str) -> Option<PathBuf>,
    ) -> Vec<Arc<str>> {
        let mut changed = Vec::new();
        for pod in due {
            let Some(cgroup) = cgroup_of(&pod.uid) else {
                continue;
            };
            match sandbox_addresses(&cgroup, ranges) {
                Ok(ips) if ips.is_empty() => {
                    if self.remove(&pod.uid) {
                        changed.push(pod.uid.clone());
                    }
                }
                Ok(ips) => {
                    let claim = Claim {
                        node: node.clone(),
                        spiffe_id: pod.spiffe_id.clone(),
                        ips: ips.into(),
                        at: Instant::now(),
                    };
                    debug!(pod = %pod.name, ips = ?claim.ips, "found the pod's addresses in its sandbox before its status");
                    if self.insert(&pod.uid, claim) {
                        changed.push(pod.uid.clone());
                    }
                }
                // No process yet, or the namespace is going: looked at again.
                Err(e) => {
                    debug!(pod = %pod.name, error = %e, "cannot read the pod's sandbox addresses yet")
                }
            }
        }
        changed
    }
}

/// The global addresses of the network namespace of the pod in `cgroup`
/// that lie in `ranges`: what this agent vouches for.
pub fn sandbox_addresses(cgroup: &Path, ranges: &[Cidr]) -> Result<Vec<IpAddr>, SandboxError> {
    let netns = crate::netns::open_pod(cgroup)?;
    let all = crate::netns::run_in(&netns.file, || Ok(rtnetlink::addresses()))
        .map_err(|e| RtnetlinkError::Io("cannot enter the pod's network namespace", e))??;
    let mut ips: Vec<IpAddr> = all
        .into_iter()
        .filter(|a| a.global && ranges.iter().any(|r| r.contains(a.ip)))
        .map(|a| a.ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips.truncate(MAX_ADDRESSES);
    Ok(ips)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn pod(uid: &str, node: &str, id: &str, ips: &[&str]) -> PodView {
        PodView {
            uid: uid.into(),
            name: format!("ns/{uid}").into(),
            node: node.into(),
            ips: ips.iter().map(|i| ip(i)).collect(),
            host_ip: None,
            spiffe_id: id.into(),
            id: 1,
            generation: 1,
            terminating: false,
            created: 0,
            host_network: false,
            vouched: false,
        }
    }

    fn claim(node: &str, id: &str, ips: &[&str]) -> Claim {
        Claim {
            node: node.into(),
            spiffe_id: id.into(),
            ips: ips.iter().map(|i| ip(i)).collect(),
            at: Instant::now(),
        }
    }

    fn ranges(node: &str) -> Option<Arc<[Cidr]>> {
        match node {
            "a" => Some(vec![cidr("198.18.1.0/24")].into()),
            "b" => Some(vec![cidr("198.18.2.0/24")].into()),
            _ => None,
        }
    }

    fn applied(pods: &mut [PodView], claims: &[(&str, Claim)]) -> Vec<Vec<IpAddr>> {
        let held = Claims::default();
        for (uid, c) in claims {
            assert!(held.insert(uid, c.clone()));
        }
        held.apply(pods, &ranges);
        pods.iter().map(|p| p.ips.to_vec()).collect()
    }

    #[test]
    fn a_vouched_address_is_used_only_when_every_check_passes() {
        let (x, y) = ("spiffe://td/x", "spiffe://td/y");
        // Admitted: its node's range, free, the claimant's node and identity.
        let mut pods = vec![pod("p", "a", x, &[])];
        assert_eq!(
            applied(&mut pods, &[("p", claim("a", x, &["198.18.1.5"]))]),
            vec![vec![ip("198.18.1.5")]]
        );
        assert!(pods[0].vouched);
        // Outside its node's range, or a node without ranges.
        let mut pods = vec![pod("p", "a", x, &[]), pod("q", "c", x, &[])];
        let got = applied(
            &mut pods,
            &[
                ("p", claim("a", x, &["198.18.2.5"])),
                ("q", claim("c", x, &["198.18.1.6"])),
            ],
        );
        assert_eq!(got, vec![Vec::<IpAddr>::new(); 2]);
        // Vouched by another node, or as another identity.
        let mut pods = vec![pod("p", "a", x, &[]), pod("q", "a", x, &[])];
        let got = applied(
            &mut pods,
            &[
                ("p", claim("b", x, &["198.18.1.5"])),
                ("q", claim("a", y, &["198.18.1.6"])),
            ],
        );
        assert_eq!(got, vec![Vec::<IpAddr>::new(); 2]);
        // An address a pod's status gives (a neighbour's) stays the neighbour's.
        let mut pods = vec![pod("p", "a", x, &[]), pod("n", "a", y, &["198.18.1.7"])];
        let got = applied(
            &mut pods,
            &[("p", claim("a", x, &["198.18.1.7", "198.18.1.8"]))],
        );
        assert_eq!(got, vec![vec![ip("198.18.1.8")], vec![ip("198.18.1.7")]]);
        // Two pods vouched for with one address: neither gets it.
        let mut pods = vec![pod("p", "a", x, &[]), pod("q", "a", y, &[])];
        let got = applied(
            &mut pods,
            &[
                ("p", claim("a", x, &["198.18.1.9"])),
                ("q", claim("a", y, &["198.18.1.9"])),
            ],
        );
        assert_eq!(got, vec![Vec::<IpAddr>::new(); 2]);
        // The status wins; a terminating or host-network pod gets nothing.
        let mut pods = vec![
            pod("p", "a", x, &["198.18.1.10"]),
            pod("t", "a", x, &[]),
            pod("h", "a", x, &[]),
        ];
        pods[1].terminating = true;
        pods[2].host_network = true;
        let got = applied(
            &mut pods,
            &[
                ("p", claim("a", x, &["198.18.1.11"])),
                ("t", claim("a", x, &["198.18.1.12"])),
                ("h", claim("a", x, &["198.18.1.13"])),
            ],
        );
        assert_eq!(
            got,
            vec![vec![ip("198.18.1.10")], vec![], vec![]] as Vec<Vec<IpAddr>>
        );
        assert!(pods.iter().all(|p| !p.vouched));
    }

    #[test]
    fn claims_are_bounded_per_node_and_pruned_when_not_needed() {
        let held = Claims::default();
        let x = "spiffe://td/x";
        for i in 0..MAX_CLAIMS_PER_NODE {
            assert!(held.insert(&format!("u{i}"), claim("a", x, &["198.18.1.1"])));
        }
        assert!(
            !held.insert("one-more", claim("a", x, &["198.18.1.1"])),
            "capped"
        );
        assert!(
            held.insert("other-node", claim("b", x, &["198.18.2.1"])),
            "per node"
        );
        assert!(
            !held.insert("u0", claim("a", x, &["198.18.1.1"])),
            "unchanged"
        );
        assert!(held.insert("u0", claim("a", x, &["198.18.1.2"])), "changed");
        let mut running = pod("u1", "a", x, &["198.18.1.1"]);
        running.vouched = false;
        let pending = pod("u2", "a", x, &[]);
        held.prune(&[running, pending]);
        assert!(
            held.of("a", x).iter().all(|(u, _)| &**u != "u1"),
            "status given: dropped"
        );
        assert!(
            held.of("a", x).iter().any(|(u, _)| &**u == "u2"),
            "still pending: kept"
        );
        assert!(
            held.of("a", x).iter().any(|(u, _)| &**u == "u3"),
            "unknown, recent: kept"
        );
    }
}
