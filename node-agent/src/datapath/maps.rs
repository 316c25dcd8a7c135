//! The node's data-path state without the cluster plumbing: the eBPF maps
//! and the auth cache, and the operations that keep them consistent with a
//! [`View`] of the cluster. [`crate::mesh::enforcer`] feeds it from watches and
//! handshakes; tests feed it directly and compare the kernel's decisions
//! with a model.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_api::crd::IdentityPolicySpec;
use tessera_bpf::abi::{AuthEvent, AuthFailure, AuthKey, AuthValue, Endpoint, Reason, TermKey};
use tessera_bpf::datapath::{Datapath, DatapathError};
use tracing::{debug, info, warn};

use crate::datapath::DataPlaneError;
use crate::datapath::authcache::AuthCacheError;
use crate::datapath::authcache::Authenticated;
use crate::datapath::authcache::{self, AuthCache, Clocks, Entry, Opened};
use crate::datapath::policy::{self, IdentityTable};
use crate::datapath::view::{Pair, PodView, View};
use crate::sync::lock;

/// Counters of what the data path and the handshakes did.
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
    /// Peers outside the mesh admitted by a terminator.
    pub external_admitted: AtomicU64,
    /// Connections a terminator refused (TLS, verification, policy, or the
    /// workload not accepting).
    pub external_refused: AtomicU64,
    /// Admitted connections of peers outside the mesh that a terminator
    /// ended because the peer was no longer admitted (rule, policy or
    /// bundle changed).
    pub external_revoked: AtomicU64,
    /// Connections to the handshake port or a terminator closed at once
    /// because their peer, or the agent, had as many open as allowed.
    pub connections_capped: AtomicU64,
    /// Local pods whose sandbox addresses this agent found (and vouches
    /// for) before their status gave them.
    pub vouched_local: AtomicU64,
    /// Pods other agents vouched for (kept: the peer spoke for its node).
    pub vouched_remote: AtomicU64,
    /// The data path's decisions by reason (index: `Reason as usize`),
    /// summed over CPUs, as last read from the kernel's counters.
    pub decisions: [AtomicU64; Reason::ALL.len()],
    /// Set once the maps were first brought in sync with the cluster.
    pub in_sync: AtomicBool,
    /// Pair handshakes queued and not started, as of the last pass.
    pub handshakes_waiting: AtomicU64,
    /// What the waypoint did (see [`crate::mesh::waypoint`]).
    pub waypoint: Arc<tessera_waypoint::proxy::Stats>,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
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

/// The longest a restored authentication counts before the agent holds an
/// SVID for its local identity; from then on, at most until that SVID's
/// NotAfter (see [`DataPlane::cap_restored`]).
pub const RESTORE_GRACE: Duration = Duration::from_secs(300);

/// The maps, the auth cache and what the cache vouches for.
#[derive(Debug)]
pub struct DataPlane {
    dp: Mutex<Datapath>,
    cache: AuthCache,
    /// The cache's records, by key (what the auth map may hold).
    entries: Mutex<HashMap<AuthKey, Entry>>,
    /// Per entry made by this process: NotAfter of the local SVID it was
    /// authenticated with.
    used_svid: Mutex<HashMap<AuthKey, i64>>,
    /// Restored entries whose expiry no SVID held since the restore has
    /// capped yet.
    uncapped: Mutex<HashSet<AuthKey>>,
    /// Pairs with a failed handshake in `ts_auth_failed`, and until when
    /// it counts (removed when the pair authenticates, or once past).
    failed: Mutex<HashMap<AuthKey, std::time::Instant>>,
    /// The global epoch as this process last read or wrote it (the map is
    /// the truth; this spares handshakes the map lock a sync pass holds).
    epoch: AtomicU64,
    /// Changes since the last flush of the cache.
    dirty: AtomicU64,
    flushed: AtomicU64,
    /// What the last pass wrote to the endpoint and policy maps (None: read
    /// the maps on the next pass).
    written: Mutex<Option<Written>>,
    /// The last translation of the policies, and what it was made from.
    translated: Mutex<Option<Translated>>,
    /// What the auth map's entries were last checked against.
    auths_checked: Mutex<Option<AuthsChecked>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// What an auth entry held says of its validity (see [`DataPlane::entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The local workload's generation it was made for.
    pub local_gen: u64,
    /// The remote workload's generation it was made for.
    pub remote_gen: u64,
    /// When it expires, Unix seconds.
    pub not_after: i64,
    /// When it was made, Unix seconds.
    pub made: i64,
}

/// Policies translated into map entries, and the inputs they came from
/// (a pass translates again only when those changed).
#[derive(Debug)]
struct Translated {
    policies: Arc<Vec<IdentityPolicySpec>>,
    table: IdentityTable,
    rules: policy::Rules,
}

/// The generations and epoch the auth map's entries were last checked
/// against, and when.
#[derive(Debug)]
struct AuthsChecked {
    generations: Vec<(Arc<str>, u32, u64)>,
    epoch: u64,
    at: std::time::Instant,
}

/// How long a pass that changed no generation and no epoch skips checking
/// every auth entry (the kernel refuses an expired entry by itself; this
/// only bounds how long one stays in the map and the cache).
pub const RECHECK_AUTHS: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a pass trusts what the passes before it wrote instead of
/// reading the endpoint and policy maps back (a read is a system call or
/// two per entry: milliseconds at thousands of pods).
pub const REREAD_MAPS: std::time::Duration = std::time::Duration::from_secs(30);

/// The endpoint and policy maps as this process last wrote them.
#[derive(Debug)]
struct Written {
    ips: BTreeMap<[u8; 16], Endpoint>,
    cgroups: BTreeMap<u64, Endpoint>,
    rules: policy::Rules,
    /// Local pod addresses and ports with HTTP rules (`ts_waypointed`).
    waypointed: BTreeSet<TermKey>,
    /// When the maps were last read.
    read_at: std::time::Instant,
}

/// The addresses and ports of local pods that have HTTP rules: each gets
/// every connection through the waypoint.
fn waypointed(view: &View, policies: &[IdentityPolicySpec]) -> BTreeSet<TermKey> {
    let by_id: HashMap<&str, &IdentityPolicySpec> =
        policies.iter().map(|p| (p.spiffe_id.as_str(), p)).collect();
    let mut out = BTreeSet::new();
    for pod in view
        .local_pods()
        .filter(|p| !p.terminating && !p.host_network)
    {
        let Some(spec) = by_id.get(&*pod.spiffe_id) else {
            continue;
        };
        let ports = policy::waypoint_ports(spec);
        for ip in pod.ips.iter() {
            out.extend(ports.iter().map(|port| TermKey::new(*ip, *port)));
        }
    }
    out
}

impl DataPlane {
    /// Loads the programs with maps pinned in `pin_dir` (reused when
    /// compatible) and opens the auth cache in `cache_dir`; what the cache
    /// held comes back in [`Opened`] for [`DataPlane::restore`].
    pub fn open(
        pin_dir: Option<&Path>,
        cache_dir: &Path,
        stats: Arc<Stats>,
    ) -> Result<(DataPlane, Opened), DataPlaneError> {
        let mut dp = Datapath::open(pin_dir)?;
        let epoch = dp.epoch()?;
        if !dp.reused_maps().is_empty() {
            info!(maps = ?dp.reused_maps(), "reusing pinned maps: enforcement continued while the agent was down");
        }
        let secret = authcache::MacKey::new(&dp.cache_key()?);
        let (cache, opened) = AuthCache::open(cache_dir, &secret)?;
        if let Some(why) = &opened.discarded {
            warn!(path = %cache_dir.display(), reason = %why, "the auth cache was damaged and is rebuilt: pairs are authenticated again");
        }
        // What the cache vouches for counts from the start: the first
        // apply() keeps pinned entries it vouches for instead of removing them.
        let entries = opened.entries.iter().map(|e| (e.key, e.clone())).collect();
        Ok((
            DataPlane {
                dp: Mutex::new(dp),
                cache,
                entries: Mutex::new(entries),
                used_svid: Mutex::default(),
                uncapped: Mutex::default(),
                failed: Mutex::default(),
                epoch: AtomicU64::new(epoch),
                dirty: AtomicU64::new(0),
                flushed: AtomicU64::new(0),
                written: Mutex::default(),
                translated: Mutex::default(),
                auths_checked: Mutex::default(),
                stats,
            },
            opened,
        ))
    }

    /// Runs `f` with the loaded data path (attaching, test runs).
    pub fn with_datapath<T>(&self, f: impl FnOnce(&mut Datapath) -> T) -> T {
        f(&mut lock(&self.dp))
    }

    /// Brings endpoints, policy and auth entries in line with `view`,
    /// `table` (SPIFFE ID -> numeric identity) and the compiled `policies`.
    /// Auth entries whose generations no longer hold are removed here, at
    /// once.
    pub fn apply(
        &self,
        view: &View,
        table: &IdentityTable,
        policies: &Arc<Vec<IdentityPolicySpec>>,
        cgroup_of: &mut dyn FnMut(&PodView) -> Option<u64>,
    ) -> Result<(), DatapathError> {
        let ips = view.ip_endpoints();
        let cgroups = view.cgroup_endpoints(cgroup_of);
        let rules = self.translate(policies, table);
        let waypointed = waypointed(view, policies);
        let mut dp = lock(&self.dp);
        // Taken: a pass that fails part-way leaves None, and the next one
        // reads the maps.
        let last = lock(&self.written)
            .take()
            .filter(|w| w.read_at.elapsed() < REREAD_MAPS);
        let last = match last {
            Some(w) => w,
            None => Written {
                ips: dp
                    .endpoint_ips()?
                    .into_iter()
                    .map(|(k, v)| (k.addr, v))
                    .collect(),
                cgroups: dp.endpoint_cgroups()?.into_iter().collect(),
                rules: policy::read(&mut dp)?,
                waypointed: dp.waypointed()?.into_iter().collect(),
                read_at: std::time::Instant::now(),
            },
        };
        // Ports gaining HTTP rules refuse direct connection starts before
        // the rules that admit peers to their waypoint are written; ports
        // losing them stop only after.
        for key in waypointed.difference(&last.waypointed) {
            dp.mark_waypointed(*key)?;
        }
        write_endpoints(&mut dp, (&last.ips, &last.cgroups), (&ips, &cgroups))?;
        policy::write_from(&mut dp, &last.rules, &rules)?;
        for key in last.waypointed.difference(&waypointed) {
            dp.unmark_waypointed(key)?;
        }
        *lock(&self.written) = Some(Written {
            ips,
            cgroups,
            rules,
            waypointed,
            read_at: last.read_at,
        });
        let epoch = dp.epoch()?;
        let generations = view.generations();
        if lock(&self.auths_checked).as_ref().is_some_and(|c| {
            c.epoch == epoch && c.generations == generations && c.at.elapsed() < RECHECK_AUTHS
        }) {
            return Ok(());
        }
        self.check_auths(&mut dp, view, epoch)?;
        *lock(&self.auths_checked) = Some(AuthsChecked {
            generations,
            epoch,
            at: std::time::Instant::now(),
        });
        Ok(())
    }

    /// The map entries of `policies` for the identities of `table`: the
    /// last pass's when neither changed.
    fn translate(
        &self,
        policies: &Arc<Vec<IdentityPolicySpec>>,
        table: &IdentityTable,
    ) -> policy::Rules {
        let mut last = lock(&self.translated);
        if let Some(t) = last.as_ref()
            && t.table == *table
            && (Arc::ptr_eq(&t.policies, policies) || t.policies == *policies)
        {
            return t.rules.clone();
        }
        let refs: Vec<&IdentityPolicySpec> = policies.iter().collect();
        let (rules, errors) = policy::translate(&refs, table);
        for e in &errors {
            warn!(error = %e, "policy enforced fail-closed");
        }
        *last = Some(Translated {
            policies: policies.clone(),
            table: table.clone(),
            rules: rules.clone(),
        });
        rules
    }

    /// Rewrites or removes every auth entry whose generations, epoch or
    /// expiry no longer hold by `view`.
    fn check_auths(&self, dp: &mut Datapath, view: &View, epoch: u64) -> Result<(), DatapathError> {
        let clocks = Clocks::now();
        for (key, value) in dp.auths()? {
            let entry = lock(&self.entries).get(&key).cloned();
            match entry
                .as_ref()
                .and_then(|e| authcache::map_value(e, view, clocks, epoch))
            {
                Some(want) => {
                    let same = (want.local_gen, want.remote_gen, want.epoch)
                        == (value.local_gen, value.remote_gen, value.epoch)
                        && value.expires_ns <= want.expires_ns;
                    if !same {
                        dp.set_auth(key, want)?;
                    }
                }
                None => {
                    dp.remove_auth(&key)?;
                    if entry.is_some() {
                        self.forget(&key);
                    }
                    Stats::bump(&self.stats.invalidated);
                    debug!(
                        ?key,
                        "auth entry removed: its generations, epoch or expiry no longer hold"
                    );
                }
            }
        }
        Ok(())
    }

    fn forget(&self, key: &AuthKey) {
        lock(&self.entries).remove(key);
        lock(&self.used_svid).remove(key);
        if let Err(e) = self.cache.remove(key) {
            tracing::error!(error = %e, "cannot remove an auth cache record: a restart could restore it; check the state directory's disk");
        }
        self.dirty.fetch_add(1, Ordering::Relaxed);
    }

    /// The record under `key`, if the cache vouches for one.
    pub fn entry(&self, key: &AuthKey) -> Option<Entry> {
        lock(&self.entries).get(key).cloned()
    }

    /// The validity of the record under `key` (no copy of its names).
    pub fn held(&self, key: &AuthKey) -> Option<Held> {
        lock(&self.entries).get(key).map(|e| Held {
            local_gen: e.local_gen,
            remote_gen: e.remote_gen,
            not_after: e.not_after,
            made: e.made,
        })
    }

    /// Whether the cache holds an authentication under `key` that counts
    /// by `view` now (generations current, not expired): what the auth map
    /// holds for it.
    pub fn authenticates(&self, view: &View, key: &AuthKey) -> bool {
        lock(&self.entries)
            .get(key)
            .is_some_and(|e| authcache::map_value(e, view, Clocks::now(), 0).is_some())
    }

    /// For an entry this process made: NotAfter of the local SVID it was
    /// made with.
    pub fn used_svid(&self, key: &AuthKey) -> Option<i64> {
        lock(&self.used_svid).get(key).copied()
    }

    /// The global epoch now. A handshake notes it before it starts and
    /// hands it to [`DataPlane::record`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Writes one authentication into the cache and the auth map, with the
    /// generations `view` gives both workloads now; false when `view` no
    /// longer has them where the handshake found them, or when a revocation
    /// happened since `started_in` (the epoch when the handshake began: it
    /// may have trusted what was revoked). `svid_not_after` is the NotAfter
    /// of the local SVID used (to renew after rotation).
    pub fn record(
        &self,
        view: &View,
        auth: &Authenticated,
        svid_not_after: Option<i64>,
        started_in: u64,
    ) -> bool {
        let Some((key, local_gen, remote_gen)) =
            view.pair_key(&auth.local, &auth.remote, &auth.remote_node)
        else {
            return false;
        };
        let entry = Entry {
            key,
            local_gen,
            remote_gen,
            not_after: auth.not_after,
            made: crate::clock::unix_now(),
            local_id: auth.local.clone(),
            remote_id: auth.remote.clone(),
            remote_node: auth.remote_node.clone(),
        };
        let mut dp = lock(&self.dp);
        let Ok(epoch) = dp.epoch() else { return false };
        self.epoch.store(epoch, Ordering::Release);
        if epoch != started_in {
            debug!(local = %auth.local, remote = %auth.remote, "not recorded: every authentication was revoked during the handshake");
            return false;
        }
        let Some(value) = authcache::map_value(&entry, view, Clocks::now(), epoch) else {
            return false;
        };
        if let Err(e) = self.cache.put(&entry) {
            // Not persisted: still enforced now, re-authenticated after a restart.
            warn!(error = %e, "cannot persist an authentication");
        }
        if let Some(used) = svid_not_after {
            lock(&self.used_svid).insert(key, used);
        }
        lock(&self.uncapped).remove(&key);
        lock(&self.entries).insert(key, entry);
        self.dirty.fetch_add(1, Ordering::Relaxed);
        if lock(&self.failed).remove(&key).is_some()
            && let Err(e) = dp.remove_auth_failed(&key)
        {
            warn!(error = %e, "cannot clear a pair's failed handshake");
        }
        match dp.set_auth(key, value) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "cannot write an auth entry");
                false
            }
        }
    }

    /// Records that a handshake for `pair` failed: for `retry_after` the
    /// egress gate refuses the pair's connections (EPERM) instead of holding
    /// them, and the next sweep ends those it holds. Nothing is recorded
    /// when `view` does not have both workloads.
    pub fn record_failure(&self, view: &View, pair: &Pair, retry_after: Duration) {
        let Some((key, local_gen, remote_gen)) =
            view.pair_key(&pair.local, &pair.remote, &pair.remote_node)
        else {
            return;
        };
        let value = AuthFailure {
            local_gen,
            remote_gen,
            until_ns: tessera_bpf::monotonic_ns().saturating_add(retry_after.as_nanos() as u64),
        };
        match lock(&self.dp).set_auth_failed(key, value) {
            Ok(()) => {
                lock(&self.failed).insert(key, std::time::Instant::now() + retry_after);
            }
            Err(e) => warn!(error = %e, "cannot record a failed handshake in the data path"),
        }
    }

    /// Removes the failed handshakes that no longer count from
    /// `ts_auth_failed`.
    pub fn prune_failures(&self) {
        let now = std::time::Instant::now();
        let past: Vec<AuthKey> = lock(&self.failed)
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| *key)
            .collect();
        if past.is_empty() {
            return;
        }
        let mut dp = lock(&self.dp);
        for key in past {
            lock(&self.failed).remove(&key);
            if let Err(e) = dp.remove_auth_failed(&key) {
                warn!(error = %e, "cannot remove a failed handshake that no longer counts");
            }
        }
    }

    /// Restores the auth map from the cache's records (after the first full
    /// [`DataPlane::apply`]): valid records are written without handshakes,
    /// everything else is removed. A restored record counts for at most
    /// [`RESTORE_GRACE`] until [`DataPlane::cap_restored`] caps it by the
    /// SVID the agent holds for its local identity. Returns how many were
    /// restored.
    pub fn restore(&self, view: &View) -> Result<usize, DatapathError> {
        let grace_end = Clocks::now().unix_now + RESTORE_GRACE.as_secs() as i64;
        let cached: Vec<Entry> = lock(&self.entries).values().cloned().collect();
        let cached: Vec<Entry> = cached.iter().map(|e| self.capped(e, grace_end)).collect();
        let cached = cached.as_slice();
        let mut dp = lock(&self.dp);
        let epoch = dp.epoch()?;
        let pinned: BTreeMap<AuthKey, AuthValue> = dp.auths()?.into_iter().collect();
        let plan = authcache::reconcile(cached, &pinned, view, Clocks::now(), epoch);
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
        let mut uncapped = lock(&self.uncapped);
        uncapped.extend(lock(&self.entries).keys().copied());
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
        Ok(restored)
    }

    /// Lowers `entry`'s expiry to `cap` if later, in memory and in the
    /// cache; returns the entry as it now stands.
    fn capped(&self, entry: &Entry, cap: i64) -> Entry {
        if entry.not_after <= cap {
            return entry.clone();
        }
        let mut lowered = entry.clone();
        lowered.not_after = cap;
        if let Err(e) = self.cache.put(&lowered) {
            warn!(error = %e, "cannot persist a restored authentication's lowered expiry");
        }
        lock(&self.entries).insert(lowered.key, lowered.clone());
        self.dirty.fetch_add(1, Ordering::Relaxed);
        lowered
    }

    /// Caps each restored authentication whose local identity now has an
    /// SVID (`held` gives its NotAfter) at that NotAfter, in the cache and in
    /// the auth map: an authentication restored from disk never outlasts
    /// the credentials the agent holds for it. Returns how many were
    /// lowered.
    pub fn cap_restored(
        &self,
        view: &View,
        held: impl Fn(&str) -> Option<i64>,
    ) -> Result<usize, DatapathError> {
        let mut lowered = Vec::new();
        lock(&self.uncapped).retain(|key| {
            let Some(entry) = self.entry(key) else {
                return false;
            };
            let Some(not_after) = held(&entry.local_id) else {
                return true;
            };
            if entry.not_after > not_after {
                lowered.push(self.capped(&entry, not_after));
            }
            false
        });
        if lowered.is_empty() {
            return Ok(0);
        }
        let mut dp = lock(&self.dp);
        let epoch = dp.epoch()?;
        let clocks = Clocks::now();
        for entry in &lowered {
            match authcache::map_value(entry, view, clocks, epoch) {
                Some(value) => dp.set_auth(entry.key, value)?,
                None => dp.remove_auth(&entry.key)?,
            }
        }
        info!(
            lowered = lowered.len(),
            "restored authentications capped by the SVIDs now held"
        );
        Ok(lowered.len())
    }

    /// Revokes every authentication at once: the epoch moves on (every
    /// auth entry stops counting in the same instant), then the entries and
    /// the cache are cleared. Returns the new epoch.
    pub fn revoke_all(&self) -> Result<u64, DataPlaneError> {
        let mut dp = lock(&self.dp);
        let epoch = dp.epoch()?.wrapping_add(1);
        dp.set_epoch(epoch)?;
        self.epoch.store(epoch, Ordering::Release);
        for (key, _) in dp.auths()? {
            dp.remove_auth(&key)?;
        }
        drop(dp);
        lock(&self.entries).clear();
        lock(&self.used_svid).clear();
        self.cache.clear()?;
        self.dirty.fetch_add(1, Ordering::Relaxed);
        Ok(epoch)
    }

    /// Copies the kernel's per-reason decision counters into
    /// [`Stats::decisions`] (for metrics).
    pub fn read_decisions(&self) -> Result<(), DatapathError> {
        let mut dp = lock(&self.dp);
        for reason in Reason::ALL {
            let n = dp.counter(reason)?;
            self.stats.decisions[reason as usize].store(n, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A descriptor of the data path's event ring buffer of its own, readable
    /// (epoll) when events wait.
    pub fn events_fd(&self) -> Result<std::os::fd::OwnedFd, DatapathError> {
        lock(&self.dp).events_fd()
    }

    /// Missing authentications the data path reported since the last call.
    pub fn take_events(&self) -> Result<Vec<AuthEvent>, DatapathError> {
        lock(&self.dp).take_events()
    }

    /// Writes the cache to disk if anything changed since the last flush.
    pub fn flush(&self) -> Result<(), AuthCacheError> {
        let dirty = self.dirty.load(Ordering::Relaxed);
        if dirty == self.flushed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.cache.flush()?;
        self.flushed.store(dirty, Ordering::Relaxed);
        Ok(())
    }
}

/// Endpoint entries by address and by cgroup.
type Endpoints<'a> = (
    &'a BTreeMap<[u8; 16], Endpoint>,
    &'a BTreeMap<u64, Endpoint>,
);

/// Writes the endpoint maps from `current` to `wanted`: changed and new
/// entries first, then removals.
fn write_endpoints(
    dp: &mut Datapath,
    (current, current_cgroups): Endpoints<'_>,
    (ips, cgroups): Endpoints<'_>,
) -> Result<(), DatapathError> {
    for (addr, ep) in ips {
        if current.get(addr) != Some(ep) {
            dp.set_endpoint_ip(std::net::Ipv6Addr::from(*addr).into(), *ep)?;
        }
    }
    for addr in current.keys().filter(|a| !ips.contains_key(*a)) {
        dp.remove_endpoint_ip(std::net::Ipv6Addr::from(*addr).into())?;
    }
    let current = current_cgroups;
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
