//! The data path at work on one node: keeps the eBPF maps in line with the
//! cluster, authenticates identity pairs with other agents, and records the
//! results in the auth map and the auth cache.
//!
//! - Endpoint maps follow every pod's address and, for this node's pods,
//!   cgroup: a deleted pod's entries go at once, a reused address or a
//!   reassigned identity carries new generations at once, so no earlier
//!   authentication applies to it.
//! - Policy maps follow the IdentityPolicy objects (see [`crate::datapath::policy`]).
//! - Authentications: pairs that policy makes possible are authenticated
//!   before any traffic (pre-authentication), re-authenticated before they
//!   expire and after this node's SVID rotates; a connection that still
//!   misses one is reported by the data path through the ring buffer and
//!   authenticated at once. Entries whose generations are no longer current
//!   are removed on the next change, never left for a timer.
//! - On start the auth map is restored from the auth cache (no handshake for
//!   a still-valid entry) after the first full view of the cluster.

mod credentials;
mod passes;
mod queue;
mod server;
mod waypoints;

pub use queue::WORKERS_PER_NODE;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use tessera_api::crd::{IdentityPolicy, IdentityPolicySpec, NumericIdentity, PodIdentity};
use tessera_bpf::abi::AuthKey;
use tessera_bpf::datapath::DatapathError;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::datapath::Authenticated;
use crate::datapath::authcache::Generations;
use crate::datapath::nodes::{Cidr, NodeFacts};
use crate::datapath::policy::IdentityTable;
use crate::datapath::sandbox::{self, Claim, Claims};
use crate::datapath::veths::{self, Veths};
use crate::datapath::view::{
    Pair, Placement, PodPlace, PodRecord, PodView, View, pod_place, pod_record,
};
use crate::follow::Compact;
use crate::mesh::external::{self, External};
use crate::mesh::handshake::{self, Credentials, HandshakeError, Initiate};
use crate::svid::store::IdentityStore;

/// Re-authenticate an entry with less than this left (or a quarter of its
/// lifetime, when shorter).
pub const REAUTH_MARGIN: Duration = Duration::from_secs(30);
/// After a failed handshake, wait this long before trying the pair again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// After a pair's first failed handshake (often a peer whose view of the
/// cluster lags), try again this soon; its connections keep waiting.
pub const FIRST_RETRY_AFTER: Duration = Duration::from_millis(100);
/// The ring buffer of missing authentications is read as soon as the data
/// path writes to it (epoll), and also this often, in case a wake-up was
/// lost or the buffer cannot be watched.
pub const EVENT_POLL: Duration = Duration::from_millis(500);
/// How often everything is checked even without changes (expiry, retries).
pub const SWEEP: Duration = Duration::from_secs(1);
/// A change this soon after the previous pass is part of a burst: the pass
/// waits [`SETTLE`] for the rest of it.
const SETTLE_AFTER: Duration = Duration::from_millis(20);
const SETTLE: Duration = Duration::from_millis(5);

/// Where and how the data path runs.
#[derive(Debug, Clone)]
pub struct EnforcerConfig {
    /// This node's name.
    pub node_name: String,
    /// Where this agent accepts handshakes.
    pub listen: SocketAddr,
    /// The handshake port of the other agents.
    pub peer_port: u16,
    /// The auth cache directory.
    pub cache_dir: PathBuf,
    /// The versioned pin directory on bpffs; None keeps maps private to
    /// this process (enforcement ends with it).
    pub pin_dir: Option<PathBuf>,
    /// The cgroup to attach the programs to (the parent of the pods'
    /// cgroups); None loads without attaching.
    pub attach_cgroup: Option<PathBuf>,
    /// Where pod cgroups are found: a directory below it whose name holds
    /// the pod's UID is the pod's cgroup.
    pub pod_cgroups: PathBuf,
}

use crate::datapath::DataPlane;
pub use crate::datapath::maps::Stats;
use crate::mesh::EnforceError;
use crate::sync::lock;

/// The cluster objects the enforcer follows, as much of each as it reads.
#[derive(Clone, Default)]
struct Stores {
    pods: Compact<Arc<PodPlace>>,
    /// Pods' identities, keyed by pod UID (the records' names).
    records: Compact<PodRecord>,
    policies: Compact<IdentityPolicySpec>,
    /// SPIFFE ID, number, generation.
    identities: Compact<(Arc<str>, u32, u64)>,
    /// Nodes' pod address ranges and addresses, by node name.
    nodes: Compact<NodeFacts>,
}

fn pod_value(pod: &Pod) -> Option<Arc<PodPlace>> {
    pod_place(pod).map(Arc::new)
}

impl Stores {
    /// Every pod that has both a place and an identity record for it.
    fn joined(&self) -> Vec<PodView> {
        let places = self.pods.values();
        self.records.read(|records| {
            places
                .iter()
                .filter_map(|p| PodView::join(p, records.get(&*p.uid)?))
                .collect()
        })
    }

    /// The pod ranges of `node`, when its Node object has any.
    fn ranges(&self, node: &str) -> Option<Arc<[Cidr]>> {
        self.nodes
            .read(|nodes| nodes.get(node).map(|f| f.ranges.clone()))
            .filter(|r| !r.is_empty())
    }

    /// Every node's addresses, as its Node object gives them.
    fn node_addresses(&self) -> HashMap<String, Arc<[std::net::IpAddr]>> {
        self.nodes.read(|nodes| {
            nodes
                .iter()
                .filter(|(_, f)| !f.addresses.is_empty())
                .map(|(n, f)| (n.clone(), f.addresses.clone()))
                .collect()
        })
    }
}

fn identity_value(ni: &NumericIdentity) -> Option<(Arc<str>, u32, u64)> {
    let generation = u64::try_from(ni.spec.generation).ok()?;
    Some((
        crate::intern::intern(ni.spec.spiffe_id.as_str()),
        ni.spec.id,
        generation,
    ))
}

fn policy_value(p: &IdentityPolicy) -> Option<IdentityPolicySpec> {
    Some(p.spec.clone())
}

struct Inner {
    cfg: EnforcerConfig,
    plane: DataPlane,
    view: Mutex<Arc<View>>,
    policies: Mutex<Arc<Vec<IdentityPolicySpec>>>,
    creds: Mutex<Option<Credentials>>,
    inflight: Mutex<HashSet<Pair>>,
    /// Pairs whose last handshakes failed: when the last one did, and how
    /// many in a row.
    failed: Mutex<HashMap<Pair, (Instant, u32)>>,
    /// Local pods' cgroups (directory and id), by pod UID, as found.
    cgroups: Mutex<HashMap<String, (PathBuf, u64)>>,
    external: External,
    veths: Veths,
    revocation: crate::datapath::revocation::Revocation,
    /// Addresses vouched for pods whose status has none yet.
    claims: Claims,
    /// What each pair's last handshake vouched for.
    announced: Mutex<HashMap<Pair, Vec<Vouch>>>,
    /// Asks for a pass.
    wake_pass: tokio::sync::mpsc::Sender<()>,
    /// The channels to other agents that handshakes run over.
    channels: crate::mesh::channel::Channels,
    /// Pairs waiting for a handshake, by peer node.
    queues: queue::Queues,
    /// The pairs last wanted, and what they were computed from.
    wanted: Mutex<Option<Wanted>>,
    /// The policy store's version and the policies it held then.
    policy_snapshot: Mutex<Option<(u64, Arc<Vec<IdentityPolicySpec>>)>>,
    /// The waypoint's rules, compiled.
    waypoint_rules: Mutex<waypoints::Compiled>,
    /// The version of the last rules handed to a waypoint.
    waypoint_version: std::sync::atomic::AtomicU64,
    /// Caps on the waypoint's connections.
    waypoint_limits: Arc<crate::mesh::limits::ConnLimits>,
}

/// The pairs policy makes possible, and the inputs they follow from.
struct Wanted {
    placement: Placement,
    policies: Arc<Vec<IdentityPolicySpec>>,
    pairs: Arc<BTreeSet<Pair>>,
}

/// A pod's UID and the addresses vouched for it.
type Vouch = (Arc<str>, Arc<[std::net::IpAddr]>);

impl Inner {
    fn view(&self) -> Arc<View> {
        lock(&self.view).clone()
    }

    fn creds(&self) -> Option<Credentials> {
        lock(&self.creds).clone()
    }

    /// The cgroup of a local pod, directory and id: a directory under
    /// `pod_cgroups` whose name contains its UID (kubelet's `pod<uid>` /
    /// `pod<uid_with_underscores>`). Looked for once, then remembered.
    fn cgroup_of(&self, uid: &str) -> Option<(PathBuf, u64)> {
        if let Some(found) = lock(&self.cgroups).get(uid) {
            return Some(found.clone());
        }
        let path = find_dir(&self.cfg.pod_cgroups, uid, 5)?;
        let id = tessera_bpf::datapath::cgroup_id(&path).ok()?;
        lock(&self.cgroups).insert(uid.to_owned(), (path.clone(), id));
        Some((path, id))
    }

    /// Brings endpoints, policy and auth entries in line with the view.
    fn sync(&self, stores: &Stores) -> Result<(), DatapathError> {
        let mut pods = stores.joined();
        self.claims.prune(&pods);
        self.claims.apply(&mut pods, &|node| stores.ranges(node));
        let mut view = View::new(&self.cfg.node_name, pods);
        view.node_addresses = stores.node_addresses();
        let view = Arc::new(view);
        if !view.nodes.collisions.is_empty() {
            warn!(nodes = ?view.nodes.collisions, "node names with the same data-path index: their pods get no endpoint entries (fail closed)");
        }
        *lock(&self.view) = view.clone();
        let live: HashSet<&str> = view.local_pods().map(|p| &*p.uid).collect();
        lock(&self.cgroups).retain(|uid, _| live.contains(uid.as_str()));
        let mut table = IdentityTable::default();
        stores.identities.read(|ids| {
            for (spiffe_id, id, generation) in ids.values() {
                table.insert(spiffe_id.clone(), *id, *generation);
            }
        });
        let specs = self.policy_snapshot(stores);
        self.plane.apply(&view, &table, &specs, &mut |p| {
            self.cgroup_of(&p.uid).map(|(_, id)| id)
        })?;
        *lock(&self.policies) = specs;
        Ok(())
    }

    /// The compiled policies held: the last pass's copy while the store
    /// has not changed since.
    fn policy_snapshot(&self, stores: &Stores) -> Arc<Vec<IdentityPolicySpec>> {
        let mut last = lock(&self.policy_snapshot);
        let version = stores.policies.version();
        if let Some((seen, specs)) = last.as_ref()
            && *seen == version
        {
            return specs.clone();
        }
        let specs = Arc::new(stores.policies.values());
        *last = Some((version, specs.clone()));
        specs
    }

    /// What follows each pass: terminators for peers outside the mesh,
    /// the checks of what pods send, the sweep of established connections,
    /// the auth cache on disk and the counters.
    fn housekeeping(self: &Arc<Self>) {
        self.reconcile_external();
        self.reconcile_veths();
        self.revoke_connections();
        self.plane.prune_failures();
        let waiting = self.queues.waiting() as u64;
        self.plane
            .stats
            .handshakes_waiting
            .store(waiting, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.plane.flush() {
            warn!(error = %e, "cannot flush the auth cache");
        }
        if let Err(e) = self.plane.read_decisions() {
            warn!(error = %e, "cannot read the data path's counters");
        }
    }

    /// Checks what each local pod sends where it enters the node (see
    /// [`crate::datapath::veths`]).
    fn reconcile_veths(&self) {
        let view = self.view();
        let wanted: Vec<veths::Want> = view
            .local_pods()
            .filter(|p| !p.terminating && !p.ips.is_empty())
            .filter_map(|p| {
                Some(veths::Want {
                    uid: p.uid.clone(),
                    pod: p.name.clone(),
                    cgroup: self.cgroup_of(&p.uid)?.0,
                    ips: p.ips.clone(),
                })
            })
            .collect();
        self.veths.reconcile(&self.plane, &wanted);
    }

    /// Resets the established connections of this node's pods that the maps
    /// no longer allow (see [`crate::datapath::revocation`]).
    fn revoke_connections(&self) {
        let view = self.view();
        let pods: Vec<crate::datapath::revocation::Pod> = view
            .local_pods()
            .filter_map(|p| {
                Some(crate::datapath::revocation::Pod {
                    name: p.name.clone(),
                    cgroup: self.cgroup_of(&p.uid)?.0,
                })
            })
            .collect();
        self.revocation.reconcile(&self.plane, &pods);
    }

    /// Opens and closes the agent's sockets in this node's pods' network
    /// namespaces: terminators for peers outside the mesh (see
    /// [`crate::mesh::external`]) and the waypoint for ports with HTTP
    /// rules (see [`crate::mesh::waypoint`]).
    fn reconcile_external(self: &Arc<Self>) {
        let view = self.view();
        let policies = lock(&self.policies).clone();
        let by_id: HashMap<&str, &IdentityPolicySpec> =
            policies.iter().map(|p| (p.spiffe_id.as_str(), p)).collect();
        let mut wanted = Vec::new();
        for pod in view
            .local_pods()
            .filter(|p| !p.terminating && !p.host_network)
        {
            let Some(spec) = by_id.get(&*pod.spiffe_id) else {
                continue;
            };
            if pod.ips.is_empty() {
                continue;
            }
            let http = crate::datapath::policy::waypoint_ports(spec);
            let terminated = external::terminated_ports(spec, &http);
            if terminated.is_empty() && http.is_empty() {
                continue;
            }
            let Some((cgroup, _)) = self.cgroup_of(&pod.uid) else {
                debug!(pod = %pod.name, "no cgroup found for the pod yet; its external peers and ports with HTTP rules stay refused");
                continue;
            };
            let ports = terminated
                .iter()
                .map(|p| {
                    let http = http.contains(p);
                    (external::Kind::Terminator { http }, *p)
                })
                .chain(http.iter().map(|p| (external::Kind::Waypoint, *p)));
            for (kind, port) in ports {
                wanted.extend(pod.ips.iter().map(|ip| external::Want {
                    kind,
                    uid: pod.uid.to_string(),
                    pod: pod.name.to_string(),
                    ip: *ip,
                    port,
                    cgroup: cgroup.clone(),
                }));
            }
        }
        self.external
            .reconcile(&self.plane, &wanted, &self.external_context());
    }

    /// What the agent's sockets in pods' namespaces ask it.
    pub(super) fn external_context(self: &Arc<Self>) -> external::Context {
        let weak = Arc::downgrade(self);
        let terminating: external::Terminating = Arc::new(move |uid: &str| {
            let inner = weak.upgrade()?;
            let view = inner.view();
            let spiffe_id = view.local_pod(uid)?.spiffe_id.clone();
            let spec = lock(&inner.policies)
                .iter()
                .find(|p| *p.spiffe_id == *spiffe_id)
                .cloned();
            Some((spiffe_id, spec, inner.creds()?))
        });
        external::Context {
            terminating,
            waypoint: self.waypoint_context(),
        }
    }

    /// Caps restored authentications by the SVIDs held now (see
    /// [`DataPlane::cap_restored`]).
    fn cap_restored(&self) {
        let Some(creds) = self.creds() else { return };
        if let Err(e) = self
            .plane
            .cap_restored(&self.view(), |id| creds.not_after(id))
        {
            tracing::error!(error = %e, "cannot cap restored authentications by the SVIDs held; they count until the restore grace ends");
        }
    }

    /// Whether `pair` holds an authentication that needs no renewal.
    fn settled(&self, view: &View, pair: &Pair, creds: &Credentials) -> bool {
        let Some(key) = auth_key(view, pair) else {
            return true; // not resolvable: nothing to do until the view changes
        };
        let Some(entry) = self.plane.held(&key) else {
            return false;
        };
        let current = view.local(key.local) == Some(entry.local_gen)
            && view.remote(key.remote, key.remote_node) == Some(entry.remote_gen);
        let left = entry.not_after - crate::clock::unix_now();
        // This node's SVID rotated since the handshake: renew with the new one.
        let rotated = self
            .plane
            .used_svid(&key)
            .is_some_and(|svid| creds.not_after(&pair.local) != Some(svid));
        // Renew ahead of expiry: REAUTH_MARGIN, or a quarter of the entry's
        // lifetime when that is shorter (short-lived SVIDs).
        let margin = (REAUTH_MARGIN.as_secs() as i64).min((entry.not_after - entry.made) / 4);
        current && left > margin && !rotated && self.vouched_for(pair)
    }

    /// What a handshake of `pair` vouches for: the addresses of the local
    /// workload's pods here whose status gives none yet.
    fn vouch(&self, pair: &Pair) -> Vec<Vouch> {
        self.claims.of(&self.cfg.node_name, &pair.local)
    }

    /// Whether the pair's peer has heard of every address to vouch for.
    fn vouched_for(&self, pair: &Pair) -> bool {
        let vouch = self.vouch(pair);
        vouch.is_empty() || lock(&self.announced).get(pair) == Some(&vouch)
    }

    /// The local pods whose sandboxes may hold addresses their status does
    /// not give yet.
    fn pending_sandboxes(&self) -> Vec<sandbox::Pending> {
        self.view()
            .local_pods()
            .filter(|p| (p.ips.is_empty() || p.vouched) && !p.terminating && !p.host_network)
            .map(|p| sandbox::Pending {
                uid: p.uid.clone(),
                name: p.name.clone(),
                spiffe_id: p.spiffe_id.clone(),
            })
            .collect()
    }

    /// Starts handshakes for the pairs that need one.
    fn preauthenticate(self: &Arc<Self>) {
        let Some(creds) = self.creds() else { return };
        let view = self.view();
        let wanted = self.wanted_pairs(&view);
        lock(&self.announced).retain(|pair, _| wanted.contains(pair));
        for pair in wanted.iter() {
            if creds.holds(&pair.local)
                && !lock(&self.inflight).contains(pair)
                && !self.settled(&view, pair, &creds)
            {
                self.spawn_handshake(pair.clone());
            }
        }
    }

    /// [`View::wanted_pairs`] for `view` and the policies applied, computed
    /// again only when the placement of identities or the policies changed
    /// since the last time (every pass asks; few change either).
    fn wanted_pairs(&self, view: &View) -> Arc<BTreeSet<Pair>> {
        let policies = lock(&self.policies).clone();
        let placement = view.placement();
        let mut memo = lock(&self.wanted);
        if let Some(m) = memo.as_ref()
            && m.placement == placement
            && (Arc::ptr_eq(&m.policies, &policies) || *m.policies == *policies)
        {
            return m.pairs.clone();
        }
        let refs: Vec<&IdentityPolicySpec> = policies.iter().collect();
        let pairs = Arc::new(view.wanted_pairs(&refs));
        *memo = Some(Wanted {
            placement,
            policies,
            pairs: pairs.clone(),
        });
        pairs
    }

    /// Keeps the addresses a peer agent vouched for (it speaks for
    /// `knock.remote_node`, already checked) and asks for a pass.
    fn keep_vouched(&self, knock: &handshake::Knock<'_>) {
        let node = crate::intern::intern(knock.remote_node);
        let spiffe_id = crate::intern::intern(knock.remote);
        let mut changed = false;
        for v in knock.vouched {
            let claim = Claim {
                node: node.clone(),
                spiffe_id: spiffe_id.clone(),
                ips: v.ips.clone().into(),
                at: Instant::now(),
            };
            if self.claims.insert(&v.uid, claim) {
                Stats::bump(&self.plane.stats.vouched_remote);
                debug!(pod_uid = %v.uid, ips = ?v.ips, node = %knock.remote_node, "addresses vouched for by the pod's node");
                changed = true;
            }
        }
        if changed {
            let _ = self.wake_pass.try_send(());
        }
    }

    /// Looks into the sandboxes of local pods whose status gives no
    /// address yet, until it does; asks for a pass when one changed.
    fn discover_sandboxes(&self, poller: &mut sandbox::Poller, stores: &Stores) -> usize {
        let pending = self.pending_sandboxes();
        let due = poller.due(&pending);
        let Some(ranges) = stores.ranges(&self.cfg.node_name) else {
            return 0;
        };
        if due.is_empty() {
            return pending.len();
        }
        let node = crate::intern::intern(&self.cfg.node_name);
        let changed = self
            .claims
            .discover(&node, &due, &ranges, &|uid| Some(self.cgroup_of(uid)?.0));
        if !changed.is_empty() {
            for _ in &changed {
                Stats::bump(&self.plane.stats.vouched_local);
            }
            let _ = self.wake_pass.try_send(());
        }
        pending.len()
    }

    fn spawn_handshake(self: &Arc<Self>, pair: Pair) {
        if let Some((at, times)) = lock(&self.failed).get(&pair)
            && at.elapsed()
                < if *times > 1 {
                    RETRY_AFTER
                } else {
                    FIRST_RETRY_AFTER
                }
        {
            return;
        }
        if !lock(&self.inflight).insert(pair.clone()) {
            return;
        }
        let node = pair.remote_node.clone();
        if self.queues.push(pair) {
            tokio::spawn(self.clone().work(node));
        }
    }

    /// A worker of `node`'s queue (see [`queue`]): runs its handshakes one
    /// at a time until the queue is empty.
    async fn work(self: Arc<Self>, node: String) {
        while let Some(pair) = self.queues.next(&node) {
            let vouched = self.initiate(&pair).await;
            lock(&self.inflight).remove(&pair);
            // A pod's sandbox address found while the handshake ran (its
            // pass found this one in flight): vouched for at once, not at
            // the next pass. Only after a handshake that succeeded, so a
            // pair that cannot be tried yet is not tried in a loop.
            let now = self.vouch(&pair);
            if vouched.is_some_and(|sent| !now.is_empty() && sent != now) {
                self.spawn_handshake(pair);
            }
        }
    }

    /// One handshake for `pair`; what it vouched for when it succeeded.
    async fn initiate(&self, pair: &Pair) -> Option<Vec<Vouch>> {
        // The epoch before the credentials: a revocation swaps the
        // credentials first, so a handshake on the old ones always sees an
        // older epoch than the one it would record in, and is not recorded.
        let epoch = self.plane.epoch();
        let creds = self.creds()?;
        if !creds.holds(&pair.local) {
            // The pod's SVID is not issued yet (its traffic may already be
            // reported): not a failure to back off from; the new credentials
            // start the handshake.
            debug!(local = %pair.local, "no SVID for the local identity yet; authenticating once it is issued");
            return None;
        }
        let view = self.view();
        let Some(host) = view.host_of(&pair.remote_node) else {
            debug!(node = %pair.remote_node, "no address known for the node's agent yet");
            return None;
        };
        let addr = SocketAddr::new(host, self.cfg.peer_port);
        let started = Instant::now();
        let vouch = self.vouch(pair);
        let ask = Initiate {
            local: &pair.local,
            remote: &pair.remote,
            local_node: &self.cfg.node_name,
            remote_node: &pair.remote_node,
            source: Some(self.cfg.listen.ip()).filter(|ip| !ip.is_unspecified()),
            vouch: &vouch,
        };
        match self.channels.authenticate(&creds, addr, &ask).await {
            Ok(auth) => {
                Stats::bump(&self.plane.stats.initiated_ok);
                lock(&self.failed).remove(pair);
                lock(&self.announced).insert(pair.clone(), vouch.clone());
                let recorded = self.record(&auth, epoch);
                info!(local = %pair.local, remote = %pair.remote, node = %pair.remote_node,
                      took_us = started.elapsed().as_micros() as u64, recorded, vouched = vouch.len(), "authenticated");
                Some(vouch)
            }
            Err(e) => {
                Stats::bump(&self.plane.stats.initiated_failed);
                let times = {
                    let mut failed = lock(&self.failed);
                    let times = failed.get(pair).map_or(0, |(_, n)| *n) + 1;
                    failed.insert(pair.clone(), (Instant::now(), times));
                    times
                };
                if times > 1 {
                    // Failed again: connections waiting for it fail now, and
                    // new ones are refused until it is tried again.
                    self.plane.record_failure(&view, pair, RETRY_AFTER);
                    warn!(local = %pair.local, remote = %pair.remote, node = %pair.remote_node, times,
                          error = %e, "handshake failed again; the pair's connections are refused until it is retried");
                } else {
                    info!(local = %pair.local, remote = %pair.remote, node = %pair.remote_node,
                          error = %e, "handshake failed; retrying shortly while the pair's connections wait");
                }
                None
            }
        }
    }

    /// Records a successful handshake begun in epoch `started_in` (see
    /// [`DataPlane::record`]).
    fn record(&self, auth: &Authenticated, started_in: u64) -> bool {
        let used = self.creds().and_then(|c| c.not_after(&auth.local));
        self.plane.record(&self.view(), auth, used, started_in)
    }

    /// Reads the data path's reports of missing authentications and
    /// authenticates those pairs.
    fn drain_events(self: &Arc<Self>) {
        let events = match self.plane.take_events() {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "cannot read the auth event ring buffer");
                return;
            }
        };
        if events.is_empty() {
            return;
        }
        let view = self.view();
        for ev in events {
            Stats::bump(&self.plane.stats.events);
            let Some(node) = view.nodes.name(ev.remote_node) else {
                continue;
            };
            let (Some(local), Some(remote)) = (
                view.spiffe_id_on(ev.local, &self.cfg.node_name),
                view.spiffe_id_on(ev.remote, node),
            ) else {
                continue;
            };
            self.spawn_handshake(Pair {
                local: local.to_owned(),
                remote: remote.to_owned(),
                remote_node: node.to_owned(),
            });
        }
    }
}

/// The auth map key of `pair` in `view`.
fn auth_key(view: &View, pair: &Pair) -> Option<AuthKey> {
    view.pair_key(&pair.local, &pair.remote, &pair.remote_node)
        .map(|(key, _, _)| key)
}

/// A directory below `root` (at most `depth` levels) whose name contains
/// `uid` (or `uid` with `_` for `-`, as systemd slices spell it).
fn find_dir(root: &Path, uid: &str, depth: usize) -> Option<PathBuf> {
    let alt = uid.replace('-', "_");
    let mut level = vec![root.to_owned()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in read.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.contains(uid) || name.contains(&alt) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

/// A running enforcer's handle: its counters.
#[derive(Debug, Clone)]
pub struct Handle {
    /// What it did so far.
    pub stats: Arc<Stats>,
}

/// Starts the data path: loads (or reuses the pinned) maps and programs,
/// attaches them, opens the auth cache and the handshake port, and runs
/// until `shutdown` resolves. Enforcement outlives the process when pinned.
pub async fn run(
    client: kube::Client,
    cfg: EnforcerConfig,
    store: IdentityStore,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), EnforceError> {
    let (plane, listener) = open(&cfg, stats.clone()).await?;
    let pin_root = cfg
        .pin_dir
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let (tx, changed) = tokio::sync::mpsc::channel::<()>(1);
    let inner = Arc::new(Inner {
        cfg,
        plane,
        view: Mutex::default(),
        policies: Mutex::default(),
        creds: Mutex::new(None),
        inflight: Mutex::default(),
        failed: Mutex::default(),
        cgroups: Mutex::default(),
        external: External::new(stats),
        veths: Veths::default(),
        revocation: Default::default(),
        claims: Claims::default(),
        announced: Mutex::default(),
        wake_pass: tx.clone(),
        channels: Default::default(),
        queues: Default::default(),
        wanted: Mutex::default(),
        policy_snapshot: Mutex::default(),
        waypoint_rules: Mutex::default(),
        waypoint_version: Default::default(),
        waypoint_limits: crate::mesh::waypoint::limits(),
    });
    let stores = Stores::default();
    let mut tasks = follow_cluster(&client, &stores, &tx);
    tasks.push(tokio::spawn(credentials::follow(inner.clone(), store, tx)));
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        _ = stores.wait_until_ready() => {}
        _ = &mut shutdown => {
            tasks.iter().for_each(|t| t.abort());
            return Ok(());
        }
    }
    inner.first_pass(&stores)?;
    remove_other_versions(pin_root.as_deref());
    tasks.push(tokio::spawn(server::serve(inner.clone(), listener)));
    tasks.push(tokio::spawn(passes::poll_events(inner.clone())));
    let wake = passes::Wake {
        housekeeping: passes::spawn_housekeeping(&inner)?,
        sandboxes: passes::spawn_sandbox_discovery(&inner, &stores)?,
    };
    passes::run(&inner, &stores, changed, shutdown, wake).await;
    tasks.iter().for_each(|t| t.abort());
    if let Err(e) = inner.plane.flush() {
        warn!(error = %e, "cannot flush the auth cache");
    }
    info!(stats = %inner.plane.stats.summary(), "data path controller stopped; pinned enforcement stays");
    Ok(())
}

/// Opens the maps and the auth cache, attaches the programs, and opens
/// the handshake port.
async fn open(
    cfg: &EnforcerConfig,
    stats: Arc<Stats>,
) -> Result<(DataPlane, TcpListener), EnforceError> {
    let (plane, _) = DataPlane::open(cfg.pin_dir.as_deref(), &cfg.cache_dir, stats)?;
    if let Some(cgroup) = &cfg.attach_cgroup {
        plane.with_datapath(|dp| dp.attach(cgroup))?;
        info!(cgroup = %cgroup.display(), "data path attached");
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| EnforceError::Listen {
            addr: cfg.listen,
            source,
        })?;
    info!(addr = %cfg.listen, "accepting handshakes");
    Ok((plane, listener))
}

/// Follows the cluster objects the data path needs into `stores`; every
/// change asks for a pass through `tx`.
fn follow_cluster(
    client: &kube::Client,
    stores: &Stores,
    tx: &tokio::sync::mpsc::Sender<()>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let tx = tx.clone();
    let notify = move || {
        let _ = tx.try_send(());
    };
    vec![
        tokio::spawn(stores.pods.clone().follow(
            Api::<Pod>::all(client.clone()),
            pod_value,
            notify.clone(),
            "pods",
        )),
        tokio::spawn(stores.records.clone().follow(
            Api::<PodIdentity>::all(client.clone()),
            pod_record,
            notify.clone(),
            "podidentities",
        )),
        tokio::spawn(stores.policies.clone().follow(
            Api::<IdentityPolicy>::all(client.clone()),
            policy_value,
            notify.clone(),
            "identitypolicies",
        )),
        tokio::spawn(stores.identities.clone().follow(
            Api::<NumericIdentity>::all(client.clone()),
            identity_value,
            notify.clone(),
            "numericidentities",
        )),
        // Not waited for: without the nodes' ranges no address is vouched
        // for, and pods' statuses give them as before.
        tokio::spawn(stores.nodes.clone().follow(
            Api::<Node>::all(client.clone()),
            crate::datapath::nodes::node_facts,
            notify,
            "nodes",
        )),
    ]
}

impl Stores {
    /// Resolves once every store the first pass needs has its first list.
    async fn wait_until_ready(&self) {
        self.pods.wait_until_ready().await;
        self.records.wait_until_ready().await;
        self.policies.wait_until_ready().await;
        self.identities.wait_until_ready().await;
    }
}

impl Inner {
    /// The first pass: the maps in line with the cluster, the auth cache's
    /// entries restored, terminators and veths set up, and connections the
    /// maps no longer allow revoked; then the agent is ready.
    fn first_pass(self: &Arc<Self>, stores: &Stores) -> Result<(), EnforceError> {
        self.sync(stores)?;
        self.plane.restore(&self.view())?;
        self.cap_restored();
        self.reconcile_external();
        self.reconcile_veths();
        self.revoke_connections();
        info!("data path in sync with the cluster");
        self.plane
            .stats
            .in_sync
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

fn warn_handshake(e: &HandshakeError, from: SocketAddr) {
    warn!(%from, error = %e, "refused a handshake");
}

/// Once this agent's programs enforce from maps in sync, what agents of
/// other map ABI versions left pinned beside `pin_root` goes (an upgrade
/// across ABI versions; their programs would keep enforcing from maps
/// nobody updates).
fn remove_other_versions(pin_root: Option<&Path>) {
    let Some(root) = pin_root else { return };
    match tessera_bpf::pinning::remove_other_versions(root) {
        Ok(removed) => {
            for dir in removed {
                info!(dir = %dir.display(), "removed the pins of another data-path ABI version");
            }
        }
        Err(e) => warn!(
            root = %root.display(),
            error = %e,
            "cannot remove the pins of other data-path ABI versions; their programs keep enforcing from stale maps: remove the other v<N> directories there by hand"
        ),
    }
}
