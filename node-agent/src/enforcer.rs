//! The data path at work on one node: keeps the eBPF maps in line with the
//! cluster, authenticates identity pairs with other agents, and records the
//! results in the auth map and the auth cache.
//!
//! - Endpoint maps follow every pod's address and, for this node's pods,
//!   cgroup: a deleted pod's entries go at once, a reused address or a
//!   reassigned identity carries new generations at once, so no earlier
//!   authentication applies to it.
//! - Policy maps follow the IdentityPolicy objects (see [`crate::policy`]).
//! - Authentications: pairs that policy makes possible are authenticated
//!   before any traffic (pre-authentication), re-authenticated before they
//!   expire and after this node's SVID rotates; a connection that still
//!   misses one is reported by the data path through the ring buffer and
//!   authenticated at once. Entries whose generations are no longer current
//!   are removed on the next change, never left for a timer.
//! - On start the auth map is restored from the auth cache (no handshake for
//!   a still-valid entry) after the first full view of the cluster.

use std::collections::{HashMap, HashSet};
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

use crate::authcache::Generations;
use crate::conn_limits::{ConnLimits, HANDSHAKES_PER_PEER, HANDSHAKES_TOTAL};
use crate::external::{self, External};
use crate::follow::Compact;
use crate::handshake::{self, Authenticated, Credentials, HandshakeError, Initiate};
use crate::identities::IdentityStore;
use crate::nodes::{Cidr, NodeFacts};
use crate::policy::IdentityTable;
use crate::sandbox::{self, Claim, Claims};
use crate::veths::{self, Veths};
use crate::view::{Pair, PodPlace, PodRecord, PodView, View, pod_place, pod_record};

/// Re-authenticate an entry with less than this left (or a quarter of its
/// lifetime, when shorter).
pub const REAUTH_MARGIN: Duration = Duration::from_secs(30);
/// After a failed handshake, wait this long before trying the pair again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// After a pair's first failed handshake (often a peer whose view of the
/// cluster lags), try again this soon; its connections keep waiting.
pub const FIRST_RETRY_AFTER: Duration = Duration::from_millis(100);
/// How often the ring buffer of missing authentications is read.
pub const EVENT_POLL: Duration = Duration::from_millis(2);
/// How often everything is checked even without changes (expiry, retries).
pub const SWEEP: Duration = Duration::from_secs(1);
/// A change this soon after the previous pass is part of a burst: the pass
/// waits [`SETTLE`] for the rest of it.
const SETTLE_AFTER: Duration = Duration::from_millis(20);
const SETTLE: Duration = Duration::from_millis(5);

/// Why the data path could not start or keep up.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// Loading, pinning or attaching the eBPF programs failed.
    #[error("eBPF data path: {0}")]
    Datapath(#[from] DatapathError),
    /// Opening the maps or the auth cache failed.
    #[error(transparent)]
    Open(#[from] DataPlaneError),
    /// The handshake port could not be opened.
    #[error("cannot listen for handshakes on {addr}: {source}; is another agent running there?")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The housekeeping thread could not be started.
    #[error(
        "cannot start the data path's housekeeping thread: {0}; check the agent's thread and memory limits"
    )]
    Thread(std::io::Error),
}

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

pub use crate::dataplane::Stats;
use crate::dataplane::{DataPlane, DataPlaneError, lock};

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
    revocation: crate::revocation::Revocation,
    /// Addresses vouched for pods whose status has none yet.
    claims: Claims,
    /// What each pair's last handshake vouched for.
    announced: Mutex<HashMap<Pair, Vec<Vouch>>>,
    /// Asks for a pass.
    wake_pass: tokio::sync::mpsc::Sender<()>,
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
        let specs = stores.policies.values();
        let refs: Vec<&IdentityPolicySpec> = specs.iter().collect();
        self.plane.apply(&view, &table, &refs, &mut |p| {
            self.cgroup_of(&p.uid).map(|(_, id)| id)
        })?;
        *lock(&self.policies) = Arc::new(specs);
        Ok(())
    }

    /// What follows each pass: terminators for peers outside the mesh,
    /// the checks of what pods send, the sweep of established connections,
    /// the auth cache on disk and the counters.
    fn housekeeping(self: &Arc<Self>) {
        self.reconcile_external();
        self.reconcile_veths();
        self.revoke_connections();
        self.plane.prune_failures();
        if let Err(e) = self.plane.flush() {
            warn!(error = %e, "cannot flush the auth cache");
        }
        if let Err(e) = self.plane.read_decisions() {
            warn!(error = %e, "cannot read the data path's counters");
        }
    }

    /// Checks what each local pod sends where it enters the node (see
    /// [`crate::veths`]).
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
    /// no longer allow (see [`crate::revocation`]).
    fn revoke_connections(&self) {
        let view = self.view();
        let pods: Vec<crate::revocation::Pod> = view
            .local_pods()
            .filter_map(|p| {
                Some(crate::revocation::Pod {
                    name: p.name.clone(),
                    cgroup: self.cgroup_of(&p.uid)?.0,
                })
            })
            .collect();
        self.revocation.reconcile(&self.plane, &pods);
    }

    /// Opens and closes the terminators of peers outside the mesh for
    /// this node's pods (see [`crate::external`]).
    fn reconcile_external(self: &Arc<Self>) {
        let view = self.view();
        let policies = lock(&self.policies).clone();
        let by_id: HashMap<&str, &IdentityPolicySpec> =
            policies.iter().map(|p| (p.spiffe_id.as_str(), p)).collect();
        let mut wanted = Vec::new();
        for pod in view.local_pods().filter(|p| !p.terminating) {
            let Some(spec) = by_id.get(&*pod.spiffe_id) else {
                continue;
            };
            if pod.ips.is_empty() {
                continue;
            }
            let ports = external::terminated_ports(spec);
            if ports.is_empty() {
                continue;
            }
            let Some((cgroup, _)) = self.cgroup_of(&pod.uid) else {
                debug!(pod = %pod.name, "no cgroup found for the pod yet; its external peers stay refused");
                continue;
            };
            for ip in pod.ips.iter() {
                wanted.extend(ports.iter().map(|port| external::Want {
                    uid: pod.uid.to_string(),
                    pod: pod.name.to_string(),
                    ip: *ip,
                    port: *port,
                    cgroup: cgroup.clone(),
                }));
            }
        }
        let weak = Arc::downgrade(self);
        let ctx: external::Context = Arc::new(move |uid: &str| {
            let inner = weak.upgrade()?;
            let view = inner.view();
            let spiffe_id = view
                .local_pods()
                .find(|p| &*p.uid == uid)?
                .spiffe_id
                .clone();
            let spec = lock(&inner.policies)
                .iter()
                .find(|p| *p.spiffe_id == *spiffe_id)
                .cloned();
            Some((spiffe_id, spec, inner.creds()?))
        });
        self.external.reconcile(&self.plane, &wanted, &ctx);
    }

    /// Caps restored authentications by the SVIDs held now (see
    /// [`DataPlane::cap_restored`]).
    fn cap_restored(&self) {
        let Some(creds) = self.creds() else { return };
        if let Err(e) = self
            .plane
            .cap_restored(&self.view(), |id| creds.not_after(id))
        {
            warn!(error = %e, "cannot cap restored authentications by the SVIDs held; they count until the restore grace ends");
        }
    }

    /// Whether `pair` holds an authentication that needs no renewal.
    fn settled(&self, view: &View, pair: &Pair, creds: &Credentials) -> bool {
        let Some(key) = auth_key(view, pair) else {
            return true; // not resolvable: nothing to do until the view changes
        };
        let Some(entry) = self.plane.entry(&key) else {
            return false;
        };
        let current = view.local(key.local) == Some(entry.local_gen)
            && view.remote(key.remote, key.remote_node) == Some(entry.remote_gen);
        let left = entry.not_after - crate::svids::unix_now();
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
        let policies = lock(&self.policies).clone();
        let refs: Vec<&IdentityPolicySpec> = policies.iter().collect();
        let wanted = view.wanted_pairs(&refs);
        lock(&self.announced).retain(|pair, _| wanted.contains(pair));
        for pair in wanted {
            if creds.holds(&pair.local) && !self.settled(&view, &pair, &creds) {
                self.spawn_handshake(pair);
            }
        }
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
        let me = self.clone();
        tokio::spawn(async move {
            let vouched = me.initiate(&pair).await;
            lock(&me.inflight).remove(&pair);
            // A pod's sandbox address found while the handshake ran (its
            // pass found this one in flight): vouched for at once, not at
            // the next pass. Only after a handshake that succeeded, so a
            // pair that cannot be tried yet is not tried in a loop.
            let now = me.vouch(&pair);
            if vouched.is_some_and(|sent| !now.is_empty() && sent != now) {
                me.spawn_handshake(pair);
            }
        });
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
        match handshake::initiate(&creds, addr, &ask).await {
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
    let (plane, _) = DataPlane::open(cfg.pin_dir.as_deref(), &cfg.cache_dir, stats.clone())?;
    let cfg_pin_root = cfg
        .pin_dir
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
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
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let inner = Arc::new(Inner {
        cfg,
        plane,
        view: Mutex::default(),
        policies: Mutex::default(),
        creds: Mutex::new(None),
        inflight: Mutex::default(),
        failed: Mutex::default(),
        cgroups: Mutex::default(),
        external: External::new(stats.clone()),
        veths: Veths::default(),
        revocation: Default::default(),
        claims: Claims::default(),
        announced: Mutex::default(),
        wake_pass: tx.clone(),
    });

    let stores = Stores::default();
    let mut tasks = Vec::new();
    let notify = {
        let tx = tx.clone();
        move || {
            let _ = tx.try_send(());
        }
    };
    tasks.push(tokio::spawn(stores.pods.clone().follow(
        Api::<Pod>::all(client.clone()),
        pod_value,
        notify.clone(),
        "pods",
    )));
    tasks.push(tokio::spawn(stores.records.clone().follow(
        Api::<PodIdentity>::all(client.clone()),
        pod_record,
        notify.clone(),
        "podidentities",
    )));
    tasks.push(tokio::spawn(stores.policies.clone().follow(
        Api::<IdentityPolicy>::all(client.clone()),
        policy_value,
        notify.clone(),
        "identitypolicies",
    )));
    tasks.push(tokio::spawn(stores.identities.clone().follow(
        Api::<NumericIdentity>::all(client.clone()),
        identity_value,
        notify.clone(),
        "numericidentities",
    )));
    // Not waited for: without the nodes' ranges no address is vouched
    // for, and pods' statuses give them as before.
    tasks.push(tokio::spawn(stores.nodes.clone().follow(
        Api::<Node>::all(client.clone()),
        crate::nodes::node_facts,
        notify,
        "nodes",
    )));

    // Credentials follow this node's SVIDs and the bundles.
    {
        let inner = inner.clone();
        let tx = tx.clone();
        let mut pods_changed = store.watch_changes();
        let mut bundles_changed = store.watch_bundles();
        tasks.push(tokio::spawn(async move {
            let mut trusted: Option<std::sync::Arc<crate::identities::Bundles>> = None;
            loop {
                let svids = store.all_svids();
                let bundles = store.bundles();
                // A CA that left the bundles may have signed the SVIDs of
                // authentications still in the map: they are all revoked,
                // once handshakes trust only the new bundles (a handshake
                // begun before the revocation is not recorded after it).
                let removed = trusted
                    .as_ref()
                    .is_some_and(|old| handshake::authorities_removed(old, &bundles));
                trusted = Some(bundles.clone());
                let mut rebuilt = false;
                if !bundles.trust_domain_id.is_empty() {
                    let prev = inner.creds();
                    match Credentials::rebuild(prev.as_ref(), &svids, &bundles) {
                        Ok(c) => {
                            debug!(identities = ?c.identities(), "handshake credentials rebuilt");
                            *lock(&inner.creds) = Some(c);
                            rebuilt = true;
                        }
                        Err(e) if removed => {
                            // Never go on trusting what left the bundles.
                            *lock(&inner.creds) = None;
                            warn!(error = %e, "cannot build handshake credentials for the new bundles; no handshakes until they can be built");
                        }
                        Err(e) => warn!(error = %e, "cannot build handshake credentials; the previous ones stay in use"),
                    }
                }
                if removed {
                    match inner.plane.revoke_all() {
                        Ok(epoch) => {
                            warn!(epoch, "a CA left the trust bundles: every authentication is revoked and pairs are authenticated again");
                            inner.revoke_connections();
                        }
                        Err(e) => warn!(error = %e, "cannot revoke authentications after a CA left the trust bundles"),
                    }
                }
                if rebuilt {
                    inner.cap_restored();
                    // A new pod's SVID (or new bundles): authenticate its
                    // pairs now, not after the next pass over the cluster.
                    inner.preauthenticate();
                    let _ = tx.try_send(());
                }
                tokio::select! {
                    r = pods_changed.changed() => if r.is_err() { break },
                    r = bundles_changed.changed() => if r.is_err() { break },
                }
            }
        }));
    }
    drop(tx);

    let mut shutdown = std::pin::pin!(shutdown);
    let ready = async {
        stores.pods.wait_until_ready().await;
        stores.records.wait_until_ready().await;
        stores.policies.wait_until_ready().await;
        stores.identities.wait_until_ready().await;
    };
    tokio::select! {
        _ = ready => {}
        _ = &mut shutdown => {
            tasks.iter().for_each(|t| t.abort());
            return Ok(());
        }
    }
    inner.sync(&stores)?;
    inner.plane.restore(&inner.view())?;
    inner.cap_restored();
    inner.reconcile_external();
    inner.reconcile_veths();
    inner.revoke_connections();
    info!("data path in sync with the cluster");
    inner
        .plane
        .stats
        .in_sync
        .store(true, std::sync::atomic::Ordering::Relaxed);
    remove_other_versions(cfg_pin_root.as_deref());

    // Handshakes from other agents.
    {
        let inner = inner.clone();
        let limits = ConnLimits::new(HANDSHAKES_PER_PEER, HANDSHAKES_TOTAL);
        tasks.push(tokio::spawn(async move {
            loop {
                let (tcp, from) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "accepting a handshake failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match limits.admit(from.ip()) {
                    Ok(slot) => slot,
                    Err(e) => {
                        Stats::bump(&inner.plane.stats.connections_capped);
                        debug!(%from, reason = %e, "handshake connection closed at once");
                        continue;
                    }
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // The epoch before the credentials (see `initiate`).
                    let epoch = inner.plane.epoch();
                    let Some(creds) = inner.creds() else { return };
                    let view = inner.view();
                    let admit = |knock: &handshake::Knock<'_>| {
                        if view.is_host_of(knock.remote_node, knock.from.ip()) {
                            inner.keep_vouched(knock);
                            Ok(())
                        } else {
                            Err(format!(
                                "{} is not an address of node {}",
                                knock.from.ip(),
                                knock.remote_node
                            ))
                        }
                    };
                    // Recorded only once this node's data path holds a policy
                    // that asks for the pair: the initiator's side then never
                    // allows what this side would still drop.
                    let record = |auth: &Authenticated| {
                        let applied = lock(&inner.policies).clone();
                        crate::view::pair_needs_authentication(&applied, &auth.local, &auth.remote)
                            && inner.record(auth, epoch)
                    };
                    match handshake::respond(&creds, tcp, admit, record).await {
                        Ok(auth) => {
                            Stats::bump(&inner.plane.stats.responded_ok);
                            info!(local = %auth.local, remote = %auth.remote, node = %auth.remote_node, "authenticated (answered)");
                        }
                        Err(e) => {
                            Stats::bump(&inner.plane.stats.responded_failed);
                            warn_handshake(&e, from);
                        }
                    }
                });
            }
        }));
    }
    // Missing authentications reported by the data path.
    {
        let inner = inner.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVENT_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                inner.drain_events();
            }
        }));
    }

    // What follows a pass and may take long (a thread per pod namespace,
    // rtnetlink, disk): its own task, so that the next change reaches the
    // maps without waiting for it.
    // One long-lived thread (not the blocking pool's changing ones: with
    // glibc each new thread may get a malloc arena of its own).
    let housekeeping = Arc::new(tokio::sync::Notify::new());
    {
        let inner = Arc::downgrade(&inner);
        let wake = housekeeping.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("housekeeping".into())
            .spawn(move || {
                let _in_runtime = runtime.enter();
                loop {
                    runtime.block_on(wake.notified());
                    match inner.upgrade() {
                        Some(inner) => inner.housekeeping(),
                        None => break,
                    }
                }
            })
            .map_err(EnforceError::Thread)?;
    }
    let sandboxes = spawn_sandbox_discovery(&inner, &stores)?;
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_pass = Instant::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            got = changed.recv() => if got.is_none() { break },
            _ = sweep.tick() => {}
        }
        // A change after a quiet spell goes to the maps at once (a new
        // pod's first connection waits for it); one in a burst lets the
        // rest of the burst settle into the same pass.
        if last_pass.elapsed() < SETTLE_AFTER {
            tokio::time::sleep(SETTLE).await;
        }
        while changed.try_recv().is_ok() {}
        last_pass = Instant::now();
        // A pass is synchronous work (map writes): the other tasks (the
        // handshakes above all) move to other workers meanwhile.
        if let Err(e) = tokio::task::block_in_place(|| inner.sync(&stores)) {
            warn!(error = %e, "data path sync failed; retrying");
            continue;
        }
        inner.preauthenticate();
        housekeeping.notify_one();
        sandboxes.notify_one();
    }
    tasks.iter().for_each(|t| t.abort());
    if let Err(e) = inner.plane.flush() {
        warn!(error = %e, "cannot flush the auth cache");
    }
    info!(stats = %inner.plane.stats.summary(), "data path controller stopped; pinned enforcement stays");
    Ok(())
}

/// The thread that looks into new local pods' sandboxes for their
/// addresses (see [`crate::sandbox`]): every few milliseconds while some
/// pod's status gives none, otherwise after each pass. Its wake-up.
fn spawn_sandbox_discovery(
    inner: &Arc<Inner>,
    stores: &Stores,
) -> Result<Arc<tokio::sync::Notify>, EnforceError> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let inner = Arc::downgrade(inner);
    let (stores, woken) = (stores.clone(), wake.clone());
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("sandboxes".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            let mut poller = sandbox::Poller::default();
            let mut pending = 0;
            loop {
                if pending == 0 {
                    runtime.block_on(woken.notified());
                } else {
                    let nap = sandbox::poll_interval(Duration::ZERO);
                    let _ = runtime.block_on(tokio::time::timeout(nap, woken.notified()));
                }
                let Some(inner) = inner.upgrade() else { break };
                pending = inner.discover_sandboxes(&mut poller, &stores);
            }
        })
        .map_err(EnforceError::Thread)?;
    Ok(wake)
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
