//! The agent's view of the cluster as the data path needs it, computed
//! without side effects: which endpoint entries the maps should hold, which
//! identity pairs this node should authenticate ahead of traffic, and the
//! current generation of every identity on every node.
//!
//! A pod's identity (SPIFFE ID, numeric identity and generation) comes only
//! from its PodIdentity record, which only the operator may write; the Pod
//! object gives where it runs (`spec.nodeName`), its addresses
//! (`status.podIPs`, both families), where its node's agent listens
//! (`status.hostIP`) and whether it is going away. Nothing a pod author
//! writes on the pod (its annotations) is read.
//!
//! A pod on the host network has the node's addresses, which every host
//! process and masqueraded flow on that node shares: they are never mapped
//! to its identity. Traffic from a node's own address is therefore that of
//! an unknown peer (it matches only rules for any peer and never
//! authenticates), and the agent's handshake port, on that address, is
//! never governed by a pod's policy. Such pods still get their SVIDs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tessera_api::crd::auth_policy::{Authentication, PolicyAction};
use tessera_api::crd::{IdentityPolicySpec, PodIdentity};
use tessera_api::spiffe::SpiffeId;
use tessera_bpf::abi::{AuthKey, Endpoint, IpKey};

use crate::datapath::authcache::Generations;

/// What the data path needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// The pod's UID (shared with its [`PodPlace`]).
    pub uid: Arc<str>,
    /// `namespace/name`, for logs (shared with its [`PodPlace`]).
    pub name: Arc<str>,
    /// The node it runs on (shared: see [`crate::intern`]).
    pub node: Arc<str>,
    /// Its addresses (none before it has one, and none for a pod on the
    /// host network; shared with its [`PodPlace`]).
    pub ips: Arc<[IpAddr]>,
    /// Its node's address, where that node's agent listens.
    pub host_ip: Option<IpAddr>,
    /// Its SPIFFE ID (shared: see [`crate::intern`]).
    pub spiffe_id: Arc<str>,
    /// Its numeric identity.
    pub id: u32,
    /// The generation of that numeric identity.
    pub generation: u64,
    /// Being deleted.
    pub terminating: bool,
    /// Creation time, Unix seconds (newer pods win an address conflict).
    pub created: i64,
    /// On the host network (its addresses are its node's).
    pub host_network: bool,
    /// Its addresses are not from its status yet but vouched for by its
    /// node's agent (see [`crate::datapath::sandbox`]).
    pub vouched: bool,
}

/// What the Pod object says of a pod: where it runs and how far along it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlace {
    /// The pod's UID.
    pub uid: Arc<str>,
    /// `namespace/name`, for logs.
    pub name: Arc<str>,
    /// The node it runs on (shared: see [`crate::intern`]).
    pub node: Arc<str>,
    /// Its addresses, both families (none before it has one, and none for
    /// a pod on the host network: those are its node's).
    pub ips: Arc<[IpAddr]>,
    /// Its node's address.
    pub host_ip: Option<IpAddr>,
    /// Being deleted.
    pub terminating: bool,
    /// Creation time, Unix seconds.
    pub created: i64,
    /// On the host network.
    pub host_network: bool,
}

/// What a pod's PodIdentity record says: who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// The SPIFFE ID (shared: see [`crate::intern`]).
    pub spiffe_id: Arc<str>,
    /// The numeric identity.
    pub id: u32,
    /// Its generation.
    pub generation: u64,
    /// The node the record was written for.
    pub node: Arc<str>,
}

/// The place of a scheduled pod; None for a pod with no node or UID.
pub fn pod_place(pod: &Pod) -> Option<PodPlace> {
    let node = crate::intern::intern(pod.spec.as_ref()?.node_name.as_deref()?);
    let status = pod.status.as_ref();
    let host_network = pod.spec.as_ref()?.host_network == Some(true);
    let ips: Arc<[IpAddr]> = if host_network {
        Arc::new([])
    } else {
        status.map(pod_ips).unwrap_or_else(|| Arc::new([]))
    };
    let host_ip = status
        .and_then(|s| s.host_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    Some(PodPlace {
        uid: pod.metadata.uid.as_deref()?.into(),
        name: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()).into(),
        node,
        ips,
        host_ip,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        created: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        host_network,
    })
}

/// Every address of a pod's status: `podIPs` (one per family), or `podIP`
/// where a status has no list; unparsable entries are left out.
fn pod_ips(status: &k8s_openapi::api::core::v1::PodStatus) -> Arc<[IpAddr]> {
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .map(canonical)
        .collect();
    ips.sort();
    ips.dedup();
    ips.into()
}

/// The identity a well-formed record names; None for one the data path
/// cannot use (malformed ID, number or generation).
pub fn pod_record(record: &PodIdentity) -> Option<PodRecord> {
    let spec = record.checked()?;
    spec.spiffe_id.parse::<SpiffeId>().ok()?;
    let generation = u64::try_from(spec.generation).ok().filter(|g| *g > 0)?;
    if spec.id == 0 {
        return None;
    }
    Some(PodRecord {
        spiffe_id: crate::intern::intern(&spec.spiffe_id),
        id: spec.id,
        generation,
        node: crate::intern::intern(&spec.node_name),
    })
}

impl PodView {
    /// A pod with its identity, when its record was written for the node it
    /// runs on; None otherwise (the data path treats it as unknown).
    pub fn join(place: &PodPlace, record: &PodRecord) -> Option<PodView> {
        if place.node != record.node {
            return None;
        }
        Some(PodView {
            uid: place.uid.clone(),
            name: place.name.clone(),
            node: place.node.clone(),
            ips: place.ips.clone(),
            host_ip: place.host_ip,
            spiffe_id: record.spiffe_id.clone(),
            id: record.id,
            generation: record.generation,
            terminating: place.terminating,
            created: place.created,
            host_network: place.host_network,
            vouched: false,
        })
    }
}

/// Whether `policy` has an Allow rule requiring mutual authentication from
/// `peer` (a SPIFFE ID).
pub fn requires_authentication_from(policy: &IdentityPolicySpec, peer: &str) -> bool {
    peer.parse::<SpiffeId>()
        .is_ok_and(|id| requires_authentication_from_id(policy, &id))
}

/// [`requires_authentication_from`] for a peer already parsed.
fn requires_authentication_from_id(policy: &IdentityPolicySpec, peer: &SpiffeId) -> bool {
    policy.rules.iter().any(|r| {
        r.action == PolicyAction::Allow
            && r.authentication == Authentication::Mutual
            && r.from.iter().any(|p| p.matches(peer))
    })
}

/// Whether, by `policies`, `a` and `b` may need each other authenticated:
/// one's policy has an Allow rule requiring mutual authentication from the
/// other.
pub fn pair_needs_authentication(policies: &[IdentityPolicySpec], a: &str, b: &str) -> bool {
    policies.iter().any(|p| {
        (p.spiffe_id == a && requires_authentication_from(p, b))
            || (p.spiffe_id == b && requires_authentication_from(p, a))
    })
}

/// The index of a node name in the data path: FNV-1a over the name, never 0.
pub fn node_hash(name: &str) -> u32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h.max(1)
}

/// Node names and their indexes. Two names with the same index are both
/// left out (their pods get no endpoint entries, so no authentication can
/// be mistaken between them) and reported.
#[derive(Debug, Clone, Default)]
pub struct NodeIndex {
    by_name: HashMap<String, u32>,
    by_index: HashMap<u32, String>,
    /// Names left out because another name has the same index.
    pub collisions: BTreeSet<String>,
}

impl NodeIndex {
    /// Indexes `names`.
    pub fn build<'a>(names: impl IntoIterator<Item = &'a str>) -> NodeIndex {
        let mut groups: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
        for name in names {
            groups.entry(node_hash(name)).or_default().insert(name);
        }
        let mut out = NodeIndex::default();
        for (index, names) in groups {
            if names.len() == 1 {
                for name in names {
                    out.by_name.insert(name.to_owned(), index);
                    out.by_index.insert(index, name.to_owned());
                }
            } else {
                out.collisions.extend(names.into_iter().map(str::to_owned));
            }
        }
        out
    }

    /// The index of `name`, unless unknown or colliding.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name of an index.
    pub fn name(&self, index: u32) -> Option<&str> {
        self.by_index.get(&index).map(String::as_str)
    }
}

/// One identity pair to authenticate: a workload on this node (`local`)
/// and a workload `remote` on `remote_node`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pair {
    /// Local SPIFFE ID.
    pub local: String,
    /// Peer SPIFFE ID.
    pub remote: String,
    /// Peer node name.
    pub remote_node: String,
}

/// The cluster as this agent sees it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// This node's name.
    pub local_node: String,
    /// Pods with identities, one per UID, in UID order; shared with the
    /// agent's store of pods and with the previous view (one copy of each
    /// pod in memory however many views hold it). Read only: the view's
    /// lookups are indexed from it in [`View::new`].
    pub pods: Vec<Arc<PodView>>,
    /// Node indexes of every node with such pods (and this one).
    pub nodes: NodeIndex,
    /// Nodes' addresses from their Node objects, by name (where their
    /// agents listen even before one of their pods has a status).
    pub node_addresses: HashMap<String, Arc<[IpAddr]>>,
    /// The pods by node and identity.
    index: Index,
}

/// Which of the pods claiming one address has it: the live, newest one.
fn rank(p: &PodView) -> (bool, i64, &str) {
    (!p.terminating, p.created, &*p.uid)
}

/// SPIFFE IDs by the node they run on (see [`View::placement`]).
pub type Placement = BTreeMap<Arc<str>, BTreeSet<Arc<str>>>;

/// Per node name, a map from `K` to `V`.
type ByNode<K, V> = HashMap<Arc<str>, HashMap<K, V>>;

/// What a view is asked for every pair on every pass (a restart: 100,000
/// pairs), by node: built once per view instead of a scan of every pod
/// per question. Terminating pods count only for the host addresses.
#[derive(Debug, Clone, Default)]
struct Index {
    /// Node -> SPIFFE ID -> numeric identity and generation of its pod
    /// with the newest generation there.
    by_spiffe_id: ByNode<Arc<str>, (u32, u64)>,
    /// Node -> numeric identity -> the newest generation of its pods there,
    /// and the SPIFFE ID of the first of them (in UID order).
    by_number: ByNode<u32, (u64, Arc<str>)>,
    /// Node -> its pods' host addresses, first pod (in UID order) first.
    hosts: HashMap<Arc<str>, Vec<IpAddr>>,
    /// Pod address (as `ts_ep_ip` keys it) -> the pod that has it (its
    /// position in the view's pods): the live, newest claimant.
    by_ip: BTreeMap<[u8; 16], usize>,
}

impl Index {
    fn build(pods: &[Arc<PodView>]) -> Index {
        let mut index = Index::default();
        for (i, p) in pods.iter().enumerate() {
            for ip in p.ips.iter() {
                let key = IpKey::from(*ip).addr;
                if index
                    .by_ip
                    .get(&key)
                    .is_none_or(|&w| rank(&pods[w]) < rank(p))
                {
                    index.by_ip.insert(key, i);
                }
            }
            if let Some(ip) = p.host_ip {
                let hosts = index.hosts.entry(p.node.clone()).or_default();
                if !hosts.contains(&ip) {
                    hosts.push(ip);
                }
            }
            if p.terminating {
                continue;
            }
            let newest = index
                .by_spiffe_id
                .entry(p.node.clone())
                .or_default()
                .entry(p.spiffe_id.clone())
                .or_insert((p.id, p.generation));
            // Ties go to the later pod, as `max_by_key` would.
            if p.generation >= newest.1 {
                *newest = (p.id, p.generation);
            }
            let number = index
                .by_number
                .entry(p.node.clone())
                .or_default()
                .entry(p.id)
                .or_insert((p.generation, p.spiffe_id.clone()));
            number.0 = number.0.max(p.generation);
        }
        index
    }
}

impl View {
    /// A view of `pods` from `local_node`.
    pub fn new(local_node: &str, pods: impl IntoIterator<Item = impl Into<Arc<PodView>>>) -> View {
        let mut pods: Vec<Arc<PodView>> = pods.into_iter().map(Into::into).collect();
        // One per UID, the last given winning (as a map keyed by UID would).
        pods.reverse();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        pods.dedup_by(|later, first| later.uid == first.uid);
        let nodes = NodeIndex::build(
            pods.iter()
                .map(|p| &*p.node)
                .chain(std::iter::once(local_node)),
        );
        View {
            local_node: local_node.to_owned(),
            index: Index::build(&pods),
            pods,
            nodes,
            node_addresses: HashMap::new(),
        }
    }

    /// Pods on this node.
    pub fn local_pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods
            .iter()
            .map(Arc::as_ref)
            .filter(|p| *p.node == *self.local_node)
    }

    /// The pod on this node with UID `uid` (the pods are held in UID order:
    /// a binary search, not a scan).
    pub fn local_pod(&self, uid: &str) -> Option<&PodView> {
        let i = self.pods.binary_search_by(|p| (*p.uid).cmp(uid)).ok()?;
        let pod = self.pods[i].as_ref();
        (*pod.node == *self.local_node).then_some(pod)
    }

    fn endpoint(&self, pod: &PodView) -> Option<Endpoint> {
        Some(Endpoint {
            id: pod.id,
            node: self.nodes.get(&pod.node)?,
            gen_: pod.generation,
        })
    }

    /// The `ts_ep_ip` entries: every address of every pod (pods on the host
    /// network have none). When two pods claim one
    /// address (a deleted pod's IP reused), the live, newest one wins.
    pub fn ip_endpoints(&self) -> BTreeMap<[u8; 16], Endpoint> {
        self.index
            .by_ip
            .iter()
            .filter_map(|(k, &i)| Some((*k, self.endpoint(&self.pods[i])?)))
            .collect()
    }

    /// The pod an address belongs to, as `ts_ep_ip` says (the live, newest
    /// claimant).
    pub fn pod_at(&self, ip: IpAddr) -> Option<&PodView> {
        let i = self.index.by_ip.get(&IpKey::from(ip).addr)?;
        self.pods.get(*i).map(Arc::as_ref)
    }

    /// The `ts_ep_cgroup` entries of this node's pods, given each pod's
    /// cgroup id (None while it has none).
    pub fn cgroup_endpoints(
        &self,
        cgroup_of: &mut dyn FnMut(&PodView) -> Option<u64>,
    ) -> BTreeMap<u64, Endpoint> {
        let mut out = BTreeMap::new();
        for pod in self.local_pods() {
            if let (Some(cgroup), Some(ep)) = (cgroup_of(pod), self.endpoint(pod)) {
                out.insert(cgroup, ep);
            }
        }
        out
    }

    /// The (id, generation) of `spiffe_id` as held by a pod on `node`.
    /// The auth map key of local workload `local` with `remote` on node
    /// `remote_node`, and the generations of both now; None when this
    /// view does not have them there.
    pub fn pair_key(
        &self,
        local: &str,
        remote: &str,
        remote_node: &str,
    ) -> Option<(AuthKey, u64, u64)> {
        let (local, local_gen) = self.identity_on(local, &self.local_node)?;
        let (remote, remote_gen) = self.identity_on(remote, remote_node)?;
        let key = AuthKey {
            local,
            remote,
            remote_node: self.nodes.get(remote_node)?,
            pad: 0,
        };
        Some((key, local_gen, remote_gen))
    }

    pub fn identity_on(&self, spiffe_id: &str, node: &str) -> Option<(u32, u64)> {
        self.index.by_spiffe_id.get(node)?.get(spiffe_id).copied()
    }

    /// The SPIFFE ID of numeric identity `id` as held on `node`.
    pub fn spiffe_id_on(&self, id: u32, node: &str) -> Option<&str> {
        self.index
            .by_number
            .get(node)?
            .get(&id)
            .map(|(_, spiffe_id)| &**spiffe_id)
    }

    /// The newest generation of numeric identity `id` among the pods on
    /// `node` that are not terminating.
    fn newest(&self, node: &str, id: u32) -> Option<u64> {
        self.index.by_number.get(node)?.get(&id).map(|(g, _)| *g)
    }

    /// Where `node`'s agent listens (its pods' host address, or else the
    /// first address of its Node object).
    pub fn host_of(&self, node: &str) -> Option<IpAddr> {
        self.index
            .hosts
            .get(node)
            .and_then(|h| h.first().copied())
            .or_else(|| self.node_addresses.get(node)?.first().copied())
    }

    /// Whether `ip` is an address of `node` (its pods' host address, or an
    /// address of its Node object).
    pub fn is_host_of(&self, node: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.index
            .hosts
            .get(node)
            .is_some_and(|h| h.iter().any(|h| canonical(*h) == ip))
            || self
                .node_addresses
                .get(node)
                .is_some_and(|a| a.iter().any(|n| canonical(*n) == ip))
    }

    /// Every (node, numeric identity, newest generation) of pods not
    /// terminating, sorted: all that decides whether an auth entry's
    /// generations still hold.
    pub fn generations(&self) -> Vec<(Arc<str>, u32, u64)> {
        let mut out: Vec<(Arc<str>, u32, u64)> = self
            .index
            .by_number
            .iter()
            .flat_map(|(node, ids)| ids.iter().map(|(id, (g, _))| (node.clone(), *id, *g)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Which SPIFFE IDs run on which node (pods not terminating): all that
    /// [`View::wanted_pairs`] reads of the view.
    pub fn placement(&self) -> Placement {
        self.index
            .by_spiffe_id
            .iter()
            .map(|(node, ids)| (node.clone(), ids.keys().cloned().collect()))
            .collect()
    }

    /// The pairs this node should authenticate ahead of traffic: a local
    /// workload L and a remote workload R on node N where R's compiled policy
    /// has an Allow rule requiring mutual authentication from L. (This node
    /// initiates, as L's side; the responder records the other direction.)
    pub fn wanted_pairs(&self, policies: &[&IdentityPolicySpec]) -> BTreeSet<Pair> {
        let locals: BTreeMap<&str, SpiffeId> = self
            .local_pods()
            .filter(|p| !p.terminating)
            .filter_map(|p| Some((&*p.spiffe_id, p.spiffe_id.parse().ok()?)))
            .collect();
        let mut out = BTreeSet::new();
        for policy in policies {
            let needing: Vec<&str> = locals
                .iter()
                .filter(|(_, id)| requires_authentication_from_id(policy, id))
                .map(|(l, _)| *l)
                .collect();
            if needing.is_empty() {
                continue;
            }
            let nodes: BTreeSet<&str> = self
                .index
                .by_spiffe_id
                .iter()
                .filter(|(_, ids)| ids.contains_key(policy.spiffe_id.as_str()))
                .map(|(node, _)| &**node)
                .collect();
            for local in &needing {
                for node in &nodes {
                    out.insert(Pair {
                        local: (*local).to_owned(),
                        remote: policy.spiffe_id.clone(),
                        remote_node: (*node).to_owned(),
                    });
                }
            }
        }
        out
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Generations for View {
    fn local(&self, id: u32) -> Option<u64> {
        self.newest(&self.local_node, id)
    }

    fn remote(&self, id: u32, node: u32) -> Option<u64> {
        self.newest(self.nodes.name(node)?, id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};

    fn pod(uid: &str, node: &str, ip: &str, id: &str, num: u32, generation: u64) -> PodView {
        PodView {
            uid: uid.into(),
            name: format!("shop/{uid}").into(),
            node: node.into(),
            ips: std::sync::Arc::new([ip.parse().unwrap()]),
            host_ip: Some(
                if node == "a" {
                    "198.18.0.1"
                } else {
                    "198.18.0.2"
                }
                .parse()
                .unwrap(),
            ),
            spiffe_id: format!("spiffe://td/{id}").into(),
            id: num,
            generation,
            terminating: false,
            created: 100,
            host_network: false,
            vouched: false,
        }
    }

    fn policy(dst: &str, from: &[&str], auth: bool) -> IdentityPolicySpec {
        IdentityPolicySpec {
            spiffe_id: format!("spiffe://td/{dst}"),
            default_deny: true,
            rules: vec![CompiledRule {
                action: PolicyAction::Allow,
                from: vec![CompiledPeer {
                    spiffe_ids: Some(from.iter().map(|f| format!("spiffe://td/{f}")).collect()),
                    ..Default::default()
                }],
                external_peers: Default::default(),
                ports: vec![],
                authentication: if auth {
                    Authentication::Mutual
                } else {
                    Authentication::None
                },
                l7: false,
                http: Vec::new(),
            }],
            sources: vec![],
        }
    }

    fn pod_object(spec: serde_json::Value, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u1"},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn every_address_of_a_dual_stack_pod_is_mapped() {
        let pod = pod_object(
            serde_json::json!({"nodeName": "a", "containers": []}),
            serde_json::json!({"podIP": "198.18.1.10",
                "podIPs": [{"ip": "198.18.1.10"}, {"ip": "fd18:7e55::10"}]}),
        );
        let place = pod_place(&pod).unwrap();
        let ips: Vec<String> = place.ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["198.18.1.10", "fd18:7e55::10"]);
        let record = PodRecord {
            spiffe_id: "spiffe://td/web".into(),
            id: 300,
            generation: 1,
            node: "a".into(),
        };
        let view = View::new("a", [PodView::join(&place, &record).unwrap()]);
        let mapped = view.ip_endpoints();
        assert_eq!(mapped.len(), 2);
        for ip in ["198.18.1.10", "fd18:7e55::10"] {
            let key = IpKey::from(ip.parse::<IpAddr>().unwrap()).addr;
            assert_eq!(mapped[&key].id, 300, "{ip}");
        }
        // An older status with podIP only still counts.
        let old = pod_object(
            serde_json::json!({"nodeName": "a", "containers": []}),
            serde_json::json!({"podIP": "198.18.1.11"}),
        );
        assert_eq!(pod_place(&old).unwrap().ips.len(), 1);
    }

    #[test]
    fn a_host_network_pod_never_maps_its_nodes_address() {
        let pod = pod_object(
            serde_json::json!({"nodeName": "a", "hostNetwork": true, "containers": []}),
            serde_json::json!({"podIP": "198.18.0.1", "podIPs": [{"ip": "198.18.0.1"}],
                "hostIP": "198.18.0.1"}),
        );
        let place = pod_place(&pod).unwrap();
        assert!(place.ips.is_empty());
        assert_eq!(place.host_ip, Some("198.18.0.1".parse().unwrap()));
        let record = PodRecord {
            spiffe_id: "spiffe://td/agent-like".into(),
            id: 301,
            generation: 1,
            node: "a".into(),
        };
        let view = View::new("a", [PodView::join(&place, &record).unwrap()]);
        assert!(view.ip_endpoints().is_empty());
        // It still tells where its node's agent listens.
        assert_eq!(view.host_of("a"), Some("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn a_pair_needs_authentication_when_either_side_asks_for_it() {
        let td = |n: &str| format!("spiffe://td/{n}");
        let policies = vec![
            policy("db", &["web"], true),
            policy("cache", &["web"], false),
        ];
        assert!(pair_needs_authentication(&policies, &td("db"), &td("web")));
        assert!(pair_needs_authentication(&policies, &td("web"), &td("db")));
        assert!(!pair_needs_authentication(
            &policies,
            &td("db"),
            &td("batch")
        ));
        // Allowed without authentication: nothing to authenticate.
        assert!(!pair_needs_authentication(
            &policies,
            &td("cache"),
            &td("web")
        ));
        assert!(!pair_needs_authentication(&[], &td("db"), &td("web")));
        assert!(!pair_needs_authentication(
            &policies,
            &td("db"),
            "not a spiffe id"
        ));
    }

    #[test]
    fn a_reused_address_belongs_to_the_live_newest_pod() {
        let mut old = pod("b", "b", "198.18.2.10", "db", 7, 1);
        old.terminating = true;
        let mut new = pod("c", "b", "198.18.2.10", "cache", 9, 4);
        new.created = 50; // older creation, but the other is terminating
        let view = View::new("a", [old, new]);
        let eps = view.ip_endpoints();
        assert_eq!(eps.len(), 1);
        let ep = eps.values().next().unwrap();
        assert_eq!((ep.id, ep.gen_), (9, 4));
        assert_eq!(ep.node, node_hash("b"));
        // The waypoint names the same pod as the endpoint map.
        let at = view.pod_at("198.18.2.10".parse().unwrap()).unwrap();
        assert_eq!((at.id, at.generation), (9, 4));
        let mapped: std::net::IpAddr = "::ffff:198.18.2.10".parse().unwrap();
        assert_eq!(view.pod_at(mapped).map(|p| p.id), Some(9));
        assert!(view.pod_at("198.18.2.11".parse().unwrap()).is_none());
    }

    #[test]
    fn local_pods_are_found_by_uid_and_others_are_not() {
        // Given out of UID order: the view orders them.
        let pods = (0..50).rev().map(|i| {
            let node = if i % 2 == 0 { "a" } else { "b" };
            pod(
                &format!("u{i:02}"),
                node,
                &format!("198.18.1.{i}"),
                "w",
                i,
                1,
            )
        });
        let view = View::new("a", pods);
        for i in 0..50 {
            let found = view.local_pod(&format!("u{i:02}")).map(|p| p.id);
            assert_eq!(found, (i % 2 == 0).then_some(i), "u{i:02}");
        }
        assert!(view.local_pod("u99").is_none());
        assert!(view.local_pod("").is_none());
    }

    #[test]
    fn colliding_node_names_get_no_entries() {
        // Find two names with one FNV-1a index.
        let mut seen = HashMap::new();
        let (x, y) = (0..10_000_000u32)
            .find_map(|i| {
                let name = format!("n{i}");
                seen.insert(node_hash(&name), name.clone())
                    .filter(|other| *other != name)
                    .map(|other| (other, name))
            })
            .unwrap();
        let view = View::new(
            "a",
            [
                pod("1", &x, "198.18.2.1", "x", 1, 1),
                pod("2", &y, "198.18.2.2", "y", 2, 1),
            ],
        );
        assert!(view.ip_endpoints().is_empty());
        assert_eq!(view.nodes.collisions, [x, y].into());
    }

    #[test]
    fn pairs_follow_policy_requiring_authentication() {
        let view = View::new(
            "a",
            [
                pod("1", "a", "198.18.1.1", "web", 1, 1),
                pod("2", "b", "198.18.2.1", "db", 2, 1),
                pod("3", "a", "198.18.1.2", "db", 2, 1),
                pod("4", "b", "198.18.2.2", "cache", 3, 1),
            ],
        );
        let db = policy("db", &["web"], true);
        let cache = policy("cache", &["web"], false);
        let pairs = view.wanted_pairs(&[&db, &cache]);
        let want: BTreeSet<Pair> = ["a", "b"]
            .iter()
            .map(|n| Pair {
                local: "spiffe://td/web".into(),
                remote: "spiffe://td/db".into(),
                remote_node: (*n).into(),
            })
            .collect();
        assert_eq!(pairs, want);
        // From node b, web is not local: nothing to initiate there.
        let from_b = View::new("b", view.pods.iter().cloned());
        assert!(from_b.wanted_pairs(&[&db]).is_empty());
    }

    #[test]
    fn generations_come_from_live_pods_on_the_node() {
        let mut gone = pod("3", "b", "198.18.2.3", "db", 2, 1);
        gone.terminating = true;
        let view = View::new(
            "a",
            [
                pod("1", "a", "198.18.1.1", "web", 1, 5),
                pod("2", "b", "198.18.2.1", "db", 2, 6),
                gone,
            ],
        );
        assert_eq!(view.local(1), Some(5));
        assert_eq!(view.local(2), None);
        assert_eq!(view.remote(2, node_hash("b")), Some(6));
        assert_eq!(view.remote(2, node_hash("a")), None);
        assert!(view.is_host_of("b", "::ffff:198.18.0.2".parse().unwrap()));
        assert!(!view.is_host_of("b", "198.18.0.1".parse().unwrap()));
    }

    /// A node none of whose pods has a status yet is known by its Node
    /// object's addresses: its agent can be dialled and admitted.
    #[test]
    fn a_node_without_pod_statuses_is_known_by_its_node_object() {
        let mut view = View::new("a", vec![pod("1", "a", "198.18.1.1", "web", 1, 5)]);
        assert_eq!(view.host_of("c"), None);
        assert!(!view.is_host_of("c", "198.18.0.3".parse().unwrap()));
        view.node_addresses
            .insert("c".into(), vec!["198.18.0.3".parse().unwrap()].into());
        assert_eq!(view.host_of("c"), Some("198.18.0.3".parse().unwrap()));
        assert!(view.is_host_of("c", "198.18.0.3".parse().unwrap()));
        assert!(!view.is_host_of("a", "198.18.0.3".parse().unwrap()));
    }
}
