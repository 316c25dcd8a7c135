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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tessera_api::crd::{IdentityPolicy, IdentityPolicySpec, NumericIdentity};
use tessera_bpf::abi::{AuthKey, AuthValue, Endpoint};
use tessera_bpf::datapath::{Datapath, DatapathError};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::authcache::{self, AuthCache, AuthCacheError, Clocks, Entry, Generations};
use crate::handshake::{self, Authenticated, Credentials, HandshakeError, Initiate};
use crate::identities::IdentityStore;
use crate::policy::{self, IdentityTable};
use crate::view::{Pair, View, pod_view};

/// Re-authenticate an entry with less than this left.
pub const REAUTH_MARGIN: Duration = Duration::from_secs(30);
/// After a failed handshake, wait this long before trying the pair again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the ring buffer of missing authentications is read.
pub const EVENT_POLL: Duration = Duration::from_millis(2);
/// How often everything is checked even without changes (expiry, retries).
pub const SWEEP: Duration = Duration::from_secs(1);

/// Why the data path could not start or keep up.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// Loading, pinning or attaching the eBPF programs failed.
    #[error("eBPF data path: {0}")]
    Datapath(#[from] DatapathError),
    /// The auth cache failed.
    #[error(transparent)]
    Cache(#[from] AuthCacheError),
    /// The handshake port could not be opened.
    #[error("cannot listen for handshakes on {addr}: {source}; is another agent running there?")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
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

/// Counters of what the enforcer did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Handshakes this agent initiated that succeeded.
    pub initiated_ok: AtomicU64,
    /// Handshakes this agent initiated that failed.
    pub initiated_failed: AtomicU64,
    /// Handshakes this agent answered that succeeded.
    pub responded_ok: AtomicU64,
    /// Handshakes this agent answered that failed.
    pub responded_failed: AtomicU64,
    /// Auth entries restored from the cache at start without a handshake.
    pub restored: AtomicU64,
    /// Auth entries removed because generations, epoch or expiry no longer hold.
    pub invalidated: AtomicU64,
    /// Missing authentications reported by the data path.
    pub events: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "handshakes initiated ok={} failed={}, answered ok={} failed={}, restored={}, invalidated={}, events={}",
            get(&self.initiated_ok),
            get(&self.initiated_failed),
            get(&self.responded_ok),
            get(&self.responded_failed),
            get(&self.restored),
            get(&self.invalidated),
            get(&self.events)
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cluster objects the enforcer follows.
#[derive(Clone)]
struct Stores {
    pods: Store<Pod>,
    policies: Store<IdentityPolicy>,
    identities: Store<NumericIdentity>,
}

struct Inner {
    cfg: EnforcerConfig,
    dp: Mutex<Datapath>,
    cache: AuthCache,
    /// The cache's records, by key (what the auth map may hold).
    entries: Mutex<HashMap<AuthKey, Entry>>,
    view: Mutex<Arc<View>>,
    policies: Mutex<Arc<Vec<IdentityPolicySpec>>>,
    creds: Mutex<Option<Credentials>>,
    inflight: Mutex<HashSet<Pair>>,
    failed: Mutex<HashMap<Pair, Instant>>,
    cgroups: Mutex<HashMap<String, u64>>,
    /// NotAfter of the local SVID each entry was authenticated with.
    used_svid: Mutex<HashMap<AuthKey, i64>>,
    stats: Arc<Stats>,
    dirty: AtomicU64,
}

impl Inner {
    fn view(&self) -> Arc<View> {
        lock(&self.view).clone()
    }

    fn creds(&self) -> Option<Credentials> {
        lock(&self.creds).clone()
    }

    /// The cgroup id of a local pod: a directory under `pod_cgroups` whose
    /// name contains its UID (kubelet's `pod<uid>` / `pod<uid_with_underscores>`).
    fn cgroup_of(&self, uid: &str) -> Option<u64> {
        if let Some(id) = lock(&self.cgroups).get(uid) {
            return Some(*id);
        }
        let path = find_dir(&self.cfg.pod_cgroups, uid, 5)?;
        let id = tessera_bpf::datapath::cgroup_id(&path).ok()?;
        lock(&self.cgroups).insert(uid.to_owned(), id);
        Some(id)
    }

    /// Brings endpoints, policy and auth entries in line with the view.
    fn sync(&self, stores: &Stores) -> Result<(), DatapathError> {
        let view = Arc::new(View::new(
            &self.cfg.node_name,
            stores.pods.state().iter().filter_map(|p| pod_view(p)),
        ));
        if !view.nodes.collisions.is_empty() {
            warn!(nodes = ?view.nodes.collisions, "node names with the same data-path index: their pods get no endpoint entries (fail closed)");
        }
        *lock(&self.view) = view.clone();
        let live: HashSet<&str> = view.local_pods().map(|p| p.uid.as_str()).collect();
        lock(&self.cgroups).retain(|uid, _| live.contains(uid.as_str()));
        let ips = view.ip_endpoints();
        let cgroups = view.cgroup_endpoints(&mut |p| self.cgroup_of(&p.uid));
        let mut table = IdentityTable::default();
        for ni in stores.identities.state() {
            if let Ok(generation) = u64::try_from(ni.spec.generation) {
                table.insert(&ni.spec.spiffe_id, ni.spec.id, generation);
            }
        }
        let specs: Vec<IdentityPolicySpec> = stores
            .policies
            .state()
            .iter()
            .map(|p| p.spec.clone())
            .collect();
        let refs: Vec<&IdentityPolicySpec> = specs.iter().collect();
        let (rules, errors) = policy::translate(&refs, &table);
        for e in &errors {
            warn!(error = %e, "policy enforced fail-closed");
        }
        let mut dp = lock(&self.dp);
        write_endpoints(&mut dp, &ips, &cgroups)?;
        policy::write(&mut dp, &rules)?;
        let epoch = dp.epoch()?;
        let clocks = Clocks::now();
        for (key, value) in dp.auths()? {
            let entry = lock(&self.entries).get(&key).cloned();
            let valid = entry
                .as_ref()
                .and_then(|e| authcache::map_value(e, view.as_ref(), clocks, epoch))
                .is_some_and(|v| {
                    v.local_gen == value.local_gen && v.remote_gen == value.remote_gen
                });
            if !valid {
                dp.remove_auth(&key)?;
                self.forget(&key);
                Stats::bump(&self.stats.invalidated);
                debug!(
                    ?key,
                    "auth entry removed: its generations, epoch or expiry no longer hold"
                );
            }
        }
        drop(dp);
        *lock(&self.policies) = Arc::new(specs);
        Ok(())
    }

    fn forget(&self, key: &AuthKey) {
        lock(&self.entries).remove(key);
        lock(&self.used_svid).remove(key);
        if let Err(e) = self.cache.remove(key) {
            warn!(error = %e, "cannot remove an auth cache record");
        }
        self.dirty.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `pair` holds an authentication that needs no renewal.
    fn settled(&self, view: &View, pair: &Pair, creds: &Credentials) -> bool {
        let Some(key) = auth_key(view, pair) else {
            return true; // not resolvable: nothing to do until the view changes
        };
        let Some(entry) = lock(&self.entries).get(&key).cloned() else {
            return false;
        };
        let current = view.local(key.local) == Some(entry.local_gen)
            && view.remote(key.remote, key.remote_node) == Some(entry.remote_gen);
        let left = entry.not_after - crate::svids::unix_now();
        // This node's SVID rotated since the handshake: renew with the new one.
        let used = lock(&self.used_svid).get(&key).copied();
        let rotated = used.is_some_and(|used| creds.not_after(&pair.local) != Some(used));
        current && left > REAUTH_MARGIN.as_secs() as i64 && !rotated
    }

    /// Starts handshakes for the pairs that need one.
    fn preauthenticate(self: &Arc<Self>) {
        let Some(creds) = self.creds() else { return };
        let view = self.view();
        let policies = lock(&self.policies).clone();
        let refs: Vec<&IdentityPolicySpec> = policies.iter().collect();
        for pair in view.wanted_pairs(&refs) {
            if creds.holds(&pair.local) && !self.settled(&view, &pair, &creds) {
                self.spawn_handshake(pair);
            }
        }
    }

    fn spawn_handshake(self: &Arc<Self>, pair: Pair) {
        if let Some(at) = lock(&self.failed).get(&pair)
            && at.elapsed() < RETRY_AFTER
        {
            return;
        }
        if !lock(&self.inflight).insert(pair.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.initiate(&pair).await;
            lock(&me.inflight).remove(&pair);
        });
    }

    async fn initiate(&self, pair: &Pair) {
        let Some(creds) = self.creds() else { return };
        let view = self.view();
        let Some(host) = view.host_of(&pair.remote_node) else {
            debug!(node = %pair.remote_node, "no address known for the node's agent yet");
            return;
        };
        let addr = SocketAddr::new(host, self.cfg.peer_port);
        let started = Instant::now();
        let ask = Initiate {
            local: &pair.local,
            remote: &pair.remote,
            local_node: &self.cfg.node_name,
            remote_node: &pair.remote_node,
            source: Some(self.cfg.listen.ip()).filter(|ip| !ip.is_unspecified()),
        };
        match handshake::initiate(&creds, addr, &ask).await {
            Ok(auth) => {
                Stats::bump(&self.stats.initiated_ok);
                lock(&self.failed).remove(pair);
                let recorded = self.record(&auth);
                info!(local = %pair.local, remote = %pair.remote, node = %pair.remote_node,
                      took_us = started.elapsed().as_micros() as u64, recorded, "authenticated");
            }
            Err(e) => {
                Stats::bump(&self.stats.initiated_failed);
                lock(&self.failed).insert(pair.clone(), Instant::now());
                warn!(local = %pair.local, remote = %pair.remote, node = %pair.remote_node,
                      error = %e, "handshake failed; the pair stays denied and is retried");
            }
        }
    }

    /// Writes one authentication into the cache and the auth map; false when
    /// the view no longer has both workloads where the handshake found them.
    fn record(&self, auth: &Authenticated) -> bool {
        let view = self.view();
        let pair = Pair {
            local: auth.local.clone(),
            remote: auth.remote.clone(),
            remote_node: auth.remote_node.clone(),
        };
        let (Some(key), Some((_, local_gen)), Some((_, remote_gen))) = (
            auth_key(&view, &pair),
            view.identity_on(&auth.local, &self.cfg.node_name),
            view.identity_on(&auth.remote, &auth.remote_node),
        ) else {
            return false;
        };
        let entry = Entry {
            key,
            local_gen,
            remote_gen,
            not_after: auth.not_after,
            local_id: auth.local.clone(),
            remote_id: auth.remote.clone(),
            remote_node: auth.remote_node.clone(),
        };
        let mut dp = lock(&self.dp);
        let Ok(epoch) = dp.epoch() else { return false };
        let Some(value) = authcache::map_value(&entry, view.as_ref(), Clocks::now(), epoch) else {
            return false;
        };
        if let Err(e) = self.cache.put(&entry) {
            // Not persisted: still enforced now, re-authenticated after a restart.
            warn!(error = %e, "cannot persist an authentication");
        }
        if let Some(used) = self.creds().and_then(|c| c.not_after(&auth.local)) {
            lock(&self.used_svid).insert(key, used);
        }
        lock(&self.entries).insert(key, entry);
        self.dirty.fetch_add(1, Ordering::Relaxed);
        match dp.set_auth(key, value) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "cannot write an auth entry");
                false
            }
        }
    }

    /// Reads the data path's reports of missing authentications and
    /// authenticates those pairs.
    fn drain_events(self: &Arc<Self>) {
        let events = match lock(&self.dp).take_events() {
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
            Stats::bump(&self.stats.events);
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

    /// Restores the auth map from the cache (after the first full sync).
    fn restore(&self, cached: &[Entry]) -> Result<(), DatapathError> {
        let view = self.view();
        let mut dp = lock(&self.dp);
        let epoch = dp.epoch()?;
        let pinned: BTreeMap<AuthKey, AuthValue> = dp.auths()?.into_iter().collect();
        let plan = authcache::reconcile(cached, &pinned, view.as_ref(), Clocks::now(), epoch);
        for (key, value) in &plan.write {
            dp.set_auth(*key, *value)?;
        }
        for key in &plan.remove {
            dp.remove_auth(key)?;
        }
        drop(dp);
        for key in &plan.forget {
            self.forget(key);
        }
        let forgotten: HashSet<&AuthKey> = plan.forget.iter().collect();
        let mut entries = lock(&self.entries);
        for e in cached.iter().filter(|e| !forgotten.contains(&e.key)) {
            entries.insert(e.key, e.clone());
        }
        let restored = plan.kept + plan.write.len();
        self.stats
            .restored
            .store(restored as u64, Ordering::Relaxed);
        info!(
            restored,
            rewritten = plan.write.len(),
            removed = plan.remove.len(),
            forgotten = plan.forget.len(),
            "auth map restored from the auth cache without handshakes"
        );
        Ok(())
    }
}

/// The auth map key of `pair` in `view`.
fn auth_key(view: &View, pair: &Pair) -> Option<AuthKey> {
    let (local, _) = view.identity_on(&pair.local, &view.local_node)?;
    let (remote, _) = view.identity_on(&pair.remote, &pair.remote_node)?;
    Some(AuthKey {
        local,
        remote,
        remote_node: view.nodes.get(&pair.remote_node)?,
        pad: 0,
    })
}

/// Writes the endpoint maps: changed and new entries first, then removals.
fn write_endpoints(
    dp: &mut Datapath,
    ips: &BTreeMap<[u8; 16], Endpoint>,
    cgroups: &BTreeMap<u64, Endpoint>,
) -> Result<(), DatapathError> {
    let current: BTreeMap<[u8; 16], Endpoint> = dp
        .endpoint_ips()?
        .into_iter()
        .map(|(k, v)| (k.addr, v))
        .collect();
    for (addr, ep) in ips {
        if current.get(addr) != Some(ep) {
            dp.set_endpoint_ip(std::net::Ipv6Addr::from(*addr).into(), *ep)?;
        }
    }
    for addr in current.keys().filter(|a| !ips.contains_key(*a)) {
        dp.remove_endpoint_ip(std::net::Ipv6Addr::from(*addr).into())?;
    }
    let current: BTreeMap<u64, Endpoint> = dp.endpoint_cgroups()?.into_iter().collect();
    for (cgroup, ep) in cgroups {
        if current.get(cgroup) != Some(ep) {
            dp.set_endpoint_cgroup(*cgroup, *ep)?;
        }
    }
    for cgroup in current.keys().filter(|c| !cgroups.contains_key(*c)) {
        dp.remove_endpoint_cgroup(*cgroup)?;
    }
    Ok(())
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
    let mut dp = Datapath::open(cfg.pin_dir.as_deref())?;
    if !dp.reused_maps().is_empty() {
        info!(maps = ?dp.reused_maps(), "reusing pinned maps: enforcement continued while the agent was down");
    }
    if let Some(cgroup) = &cfg.attach_cgroup {
        dp.attach(cgroup)?;
        info!(cgroup = %cgroup.display(), "data path attached");
    }
    let (cache, opened) = AuthCache::open(&cfg.cache_dir)?;
    if let Some(why) = &opened.discarded {
        warn!(path = %cfg.cache_dir.display(), reason = %why, "the auth cache was damaged and is rebuilt: pairs are authenticated again");
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| EnforceError::Listen {
            addr: cfg.listen,
            source,
        })?;
    info!(addr = %cfg.listen, "accepting handshakes");
    let inner = Arc::new(Inner {
        cfg,
        dp: Mutex::new(dp),
        cache,
        entries: Mutex::default(),
        view: Mutex::default(),
        policies: Mutex::default(),
        creds: Mutex::new(None),
        inflight: Mutex::default(),
        failed: Mutex::default(),
        cgroups: Mutex::default(),
        used_svid: Mutex::default(),
        stats,
        dirty: AtomicU64::new(0),
    });

    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (policies, policy_writer) = reflector::store::<IdentityPolicy>();
    let (identities, id_writer) = reflector::store::<NumericIdentity>();
    let mut tasks = Vec::new();
    macro_rules! follow {
        ($writer:expr, $api:expr, $what:literal) => {{
            let tx = tx.clone();
            let stream = reflector::reflector($writer, watcher($api, watcher::Config::default()))
                .default_backoff()
                .map_ok(|_| ());
            tasks.push(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(()) => {
                            let _ = tx.try_send(());
                        }
                        Err(e) => warn!(error = %e, what = $what, "watch error; retrying"),
                    }
                }
            }));
        }};
    }
    follow!(pod_writer, Api::<Pod>::all(client.clone()), "pods");
    follow!(
        policy_writer,
        Api::<IdentityPolicy>::all(client.clone()),
        "identitypolicies"
    );
    follow!(
        id_writer,
        Api::<NumericIdentity>::all(client.clone()),
        "numericidentities"
    );

    // Credentials follow this node's SVIDs and the bundles.
    {
        let inner = inner.clone();
        let tx = tx.clone();
        let mut pods_changed = store.watch_changes();
        let mut bundles_changed = store.watch_bundles();
        tasks.push(tokio::spawn(async move {
            loop {
                let svids = store.all_svids();
                let bundles = store.bundles();
                if !bundles.trust_domain_id.is_empty() {
                    match Credentials::build(&svids, &bundles) {
                        Ok(c) => {
                            debug!(identities = ?c.identities(), "handshake credentials rebuilt");
                            *lock(&inner.creds) = Some(c);
                            let _ = tx.try_send(());
                        }
                        Err(e) => warn!(error = %e, "cannot build handshake credentials"),
                    }
                }
                tokio::select! {
                    r = pods_changed.changed() => if r.is_err() { break },
                    r = bundles_changed.changed() => if r.is_err() { break },
                }
            }
        }));
    }
    drop(tx);

    let stores = Stores {
        pods,
        policies,
        identities,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let ready = async {
        let _ = stores.pods.wait_until_ready().await;
        let _ = stores.policies.wait_until_ready().await;
        let _ = stores.identities.wait_until_ready().await;
    };
    tokio::select! {
        _ = ready => {}
        _ = &mut shutdown => {
            tasks.iter().for_each(|t| t.abort());
            return Ok(());
        }
    }
    inner.sync(&stores)?;
    inner.restore(&opened.entries)?;
    info!("data path in sync with the cluster");

    // Handshakes from other agents.
    {
        let inner = inner.clone();
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
                let inner = inner.clone();
                tokio::spawn(async move {
                    let Some(creds) = inner.creds() else { return };
                    let view = inner.view();
                    let admit = |knock: &handshake::Knock<'_>| {
                        if view.is_host_of(knock.remote_node, knock.from.ip()) {
                            Ok(())
                        } else {
                            Err(format!(
                                "{} is not an address of node {}",
                                knock.from.ip(),
                                knock.remote_node
                            ))
                        }
                    };
                    match handshake::respond(&creds, tcp, admit).await {
                        Ok(auth) => {
                            Stats::bump(&inner.stats.responded_ok);
                            let recorded = inner.record(&auth);
                            info!(local = %auth.local, remote = %auth.remote, node = %auth.remote_node, recorded, "authenticated (answered)");
                        }
                        Err(e) => {
                            Stats::bump(&inner.stats.responded_failed);
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

    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut flushed = inner.dirty.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            got = changed.recv() => if got.is_none() { break },
            _ = sweep.tick() => {}
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while changed.try_recv().is_ok() {}
        if let Err(e) = inner.sync(&stores) {
            warn!(error = %e, "data path sync failed; retrying");
            continue;
        }
        inner.preauthenticate();
        let dirty = inner.dirty.load(Ordering::Relaxed);
        if dirty != flushed {
            if let Err(e) = inner.cache.flush() {
                warn!(error = %e, "cannot flush the auth cache");
            }
            flushed = dirty;
        }
    }
    tasks.iter().for_each(|t| t.abort());
    if let Err(e) = inner.cache.flush() {
        warn!(error = %e, "cannot flush the auth cache");
    }
    info!(stats = %inner.stats.summary(), "data path controller stopped; pinned enforcement stays");
    Ok(())
}

fn warn_handshake(e: &HandshakeError, from: SocketAddr) {
    warn!(%from, error = %e, "refused a handshake");
}
