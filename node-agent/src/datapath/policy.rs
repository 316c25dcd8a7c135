//! From compiled policy to data-path rules: each IdentityPolicy (rules by
//! SPIFFE ID) becomes `ts_policy` entries keyed by numeric identity, using this
//! agent's current view of which number each SPIFFE ID holds, plus the
//! per-identity `ts_selected` flags. [`plan`] orders the map writes that move
//! the data path from one rule set to the next so that no intermediate state
//! allows what neither the old nor the new rules allow.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{Authentication, PolicyAction, Protocol};
use tessera_api::crd::identity_policy::CompiledRule;
use tessera_api::spiffe::SpiffeId;
use tessera_bpf::abi::consts::{
    TS_DEFAULT_DENY, TS_ID_ANY, TS_RULE_AUTH, TS_RULE_L7, TS_SHAPE_ANY, TS_SHAPE_EXACT,
    TS_SHAPE_PORT, TS_SHAPE_REMOTE, TS_VERDICT_ALLOW, TS_VERDICT_DENY,
};
use tessera_bpf::abi::{PolicyKey, PolicyValue};
use tessera_bpf::datapath::{Datapath, DatapathError};

/// Most `ts_policy` entries one identity may take; beyond it the identity
/// fails closed (everything to it denied) and the agent says so.
pub const MAX_ENTRIES_PER_IDENTITY: usize = 65_536;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Which numeric identity (and generation) each SPIFFE ID holds now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityTable {
    ids: HashMap<Arc<str>, (u32, u64)>,
}

impl IdentityTable {
    /// Records that `spiffe_id` holds `id` at `generation` (an `Arc<str>`
    /// is shared, not copied).
    pub fn insert(&mut self, spiffe_id: impl Into<Arc<str>>, id: u32, generation: u64) {
        self.ids.insert(spiffe_id.into(), (id, generation));
    }

    /// The identity of a SPIFFE ID.
    pub fn get(&self, spiffe_id: &str) -> Option<(u32, u64)> {
        self.ids.get(spiffe_id).copied()
    }

    /// Every (SPIFFE ID, id, generation).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32, u64)> {
        self.ids.iter().map(|(s, (i, g))| (s.as_ref(), *i, *g))
    }

    /// How many SPIFFE IDs are known.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when none is known.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The policy part of the data path: rules and per-identity flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    /// `ts_policy`.
    pub rules: BTreeMap<PolicyKey, PolicyValue>,
    /// `ts_selected`: identity -> flags.
    pub selected: BTreeMap<u32, u32>,
}

/// A policy that could not be turned into map entries (enforced fail-closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Too many entries for one identity.
    #[error(
        "the policy of {spiffe_id} needs {entries} data-path entries (limit {MAX_ENTRIES_PER_IDENTITY}); all traffic to it is denied until its AuthPolicies are narrowed (fewer peers or ports)"
    )]
    TooLarge {
        /// The protected SPIFFE ID.
        spiffe_id: String,
        /// Entries it would need.
        entries: usize,
    },
}

fn key(local: u32, remote: u32, port: u16, proto: u8) -> PolicyKey {
    PolicyKey {
        local,
        remote,
        port,
        proto,
        pad: 0,
    }
}

/// Merges one rule entry: a Deny wins; Allows combine their flags (the
/// stricter requirement holds when several Allow rules match).
fn merge(into: &mut BTreeMap<PolicyKey, PolicyValue>, k: PolicyKey, v: PolicyValue) {
    let merged = match into.get(&k) {
        Some(old) if old.verdict == TS_VERDICT_DENY as u8 => *old,
        Some(_) if v.verdict == TS_VERDICT_DENY as u8 => v,
        Some(old) => PolicyValue {
            flags: old.flags | v.flags,
            ..*old
        },
        None => v,
    };
    into.insert(k, merged);
}

/// The flags `ts_selected` needs for `local` given its entries.
fn shapes<'a>(entries: impl Iterator<Item = &'a PolicyKey>, default_deny: bool) -> u32 {
    let mut flags = if default_deny {
        TS_DEFAULT_DENY as u32
    } else {
        0
    };
    for k in entries {
        flags |= match (k.remote == TS_ID_ANY as u32, k.port == 0) {
            (false, false) => TS_SHAPE_EXACT,
            (false, true) => TS_SHAPE_REMOTE,
            (true, false) => TS_SHAPE_PORT,
            (true, true) => TS_SHAPE_ANY,
        } as u32;
    }
    flags
}

/// The entries the programs look up for one identity's `raw` rules (merged
/// per key): the programs take the first entry found, most specific first
/// ((remote, port), (remote, any), (any, port), (any, any)), so each entry
/// holds the merged verdict of every rule matching the traffic that reaches
/// it, and an exact entry is added wherever a (remote, any port) rule and an
/// (any peer, port) rule overlap.
fn close(raw: &BTreeMap<PolicyKey, PolicyValue>) -> BTreeMap<PolicyKey, PolicyValue> {
    let any = TS_ID_ANY as u32;
    let remotes: Vec<&PolicyKey> = raw
        .keys()
        .filter(|k| k.remote != any && k.port == 0)
        .collect();
    let ports: Vec<&PolicyKey> = raw
        .keys()
        .filter(|k| k.remote == any && k.port != 0)
        .collect();
    let mut exact: BTreeSet<PolicyKey> = raw
        .keys()
        .filter(|k| k.remote != any && k.port != 0)
        .copied()
        .collect();
    for r in &remotes {
        for p in &ports {
            exact.insert(key(r.local, r.remote, p.port, p.proto));
        }
    }
    let mut out = BTreeMap::new();
    // Every raw rule key a packet reaching `k` also matches, `k` included.
    let covering = |k: &PolicyKey| {
        let mut ks = vec![*k];
        if k.port != 0 && k.remote != any {
            ks.push(key(k.local, k.remote, 0, 0));
            ks.push(key(k.local, any, k.port, k.proto));
        }
        if k.port != 0 || k.remote != any {
            ks.push(key(k.local, any, 0, 0));
        }
        ks
    };
    for k in exact
        .iter()
        .chain(raw.keys().filter(|k| k.port == 0 || k.remote == any))
    {
        for c in covering(k) {
            if let Some(v) = raw.get(&c) {
                merge(&mut out, *k, *v);
            }
        }
    }
    out
}

/// Translates compiled policies into map entries. Policies of SPIFFE IDs
/// with no numeric identity yet are skipped (no pod of theirs is on the data
/// path); peers are matched against every known identity.
pub fn translate(
    policies: &[&IdentityPolicySpec],
    ids: &IdentityTable,
) -> (Rules, Vec<TranslateError>) {
    let mut out = Rules::default();
    let mut errors = Vec::new();
    let parsed: Vec<(SpiffeId, u32)> = ids
        .iter()
        .filter_map(|(s, id, _)| Some((s.parse().ok()?, id)))
        .collect();
    for policy in policies {
        let Some((local, _)) = ids.get(&policy.spiffe_id) else {
            continue;
        };
        // The ports the waypoint serves: an Allow rule with HTTP rules
        // admits its peers at L4 to these only (beyond the cap nothing
        // steers or marks a port, so it must stay closed).
        let served = waypoint_ports(policy);
        let mut entries = BTreeMap::new();
        let mut count = 0usize;
        for rule in &policy.rules {
            if skipped_at_l4(rule) {
                continue;
            }
            let remotes: BTreeSet<u32> = if rule.from.is_empty() {
                BTreeSet::from([TS_ID_ANY as u32])
            } else {
                parsed
                    .iter()
                    .filter(|(s, _)| rule.from.iter().any(|p| p.matches(s)))
                    .map(|(_, id)| *id)
                    .collect()
            };
            let mut ports: Vec<(u16, u8)> = Vec::new();
            if rule.ports.is_empty() {
                ports.push((0, 0));
            }
            for range in &rule.ports {
                let proto = match range.protocol {
                    Protocol::Tcp => TCP,
                    Protocol::Udp => UDP,
                };
                let first = range.port.clamp(1, 65535) as u16;
                let last = range.end_port.unwrap_or(range.port).clamp(1, 65535) as u16;
                ports.extend((first..=last).map(|p| (p, proto)));
            }
            if rule.action == PolicyAction::Allow && !rule.http.is_empty() {
                ports.retain(|(p, proto)| *proto == TCP && served.contains(p));
            }
            count = count.saturating_add(remotes.len().saturating_mul(ports.len()));
            if count > MAX_ENTRIES_PER_IDENTITY {
                break;
            }
            let value = match rule.action {
                PolicyAction::Deny => PolicyValue {
                    verdict: TS_VERDICT_DENY as u8,
                    flags: 0,
                    pad: [0; 2],
                },
                PolicyAction::Allow => PolicyValue {
                    verdict: TS_VERDICT_ALLOW as u8,
                    flags: if rule.authentication == Authentication::Mutual {
                        TS_RULE_AUTH as u8
                    } else {
                        0
                    },
                    pad: [0; 2],
                },
            };
            for remote in &remotes {
                for (port, proto) in &ports {
                    merge(&mut entries, key(local, *remote, *port, *proto), value);
                }
            }
        }
        if count <= MAX_ENTRIES_PER_IDENTITY {
            entries = close(&entries);
            count = entries.len();
        }
        if count > MAX_ENTRIES_PER_IDENTITY {
            errors.push(TranslateError::TooLarge {
                spiffe_id: policy.spiffe_id.clone(),
                entries: count,
            });
            out.selected.insert(local, TS_DEFAULT_DENY as u32);
            continue;
        }
        if !policy.default_deny && entries.is_empty() {
            continue;
        }
        out.selected
            .insert(local, shapes(entries.keys(), policy.default_deny));
        out.rules.extend(entries);
    }
    (out, errors)
}

/// One map write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace a rule.
    SetRule(PolicyKey, PolicyValue),
    /// Remove a rule.
    RemoveRule(PolicyKey),
    /// Set an identity's flags.
    SetSelected(u32, u32),
    /// Remove an identity's flags.
    RemoveSelected(u32),
}

/// Every requirement an allow rule can carry.
/// Most ports with HTTP rules of one workload that go through the
/// waypoint (the lowest); its other ports with HTTP rules stay closed to
/// the peers of Allow rules with HTTP rules.
pub const MAX_WAYPOINT_PORTS: usize = 256;

/// The ports of a workload with `spec` that go through the waypoint: the
/// lowest [`MAX_WAYPOINT_PORTS`] of those with HTTP rules. The same set is
/// marked in `ts_waypointed`, served by the waypoint's sockets, and opened
/// at L4 by Allow rules with HTTP rules.
pub fn waypoint_ports(spec: &IdentityPolicySpec) -> BTreeSet<u16> {
    spec.http_ports()
        .into_iter()
        .take(MAX_WAYPOINT_PORTS)
        .collect()
}

/// Whether a rule is left out of the L4 entries: only some rules with HTTP
/// rules are. Every connection to its ports goes through the waypoint, which checks
/// each request (the destination's ingress check refuses connection starts
/// to those ports that reach any other socket: see `ts_waypointed`). So an
/// Allow rule with HTTP rules admits its peers to its ports as an L4 allow
/// (the waypoint decides each request), and a Deny rule with HTTP rules
/// denies no whole connection (left out). Without ports (the CRD's
/// validation refuses that) it fails closed: an Allow allows nothing (left
/// out), a Deny denies every port (kept).
fn skipped_at_l4(rule: &CompiledRule) -> bool {
    if rule.http.is_empty() && !rule.l7 {
        return false;
    }
    match rule.action {
        PolicyAction::Allow => rule.ports.is_empty(),
        PolicyAction::Deny => !rule.ports.is_empty(),
    }
}

const ALL_REQUIREMENTS: u8 = (TS_RULE_AUTH | TS_RULE_L7) as u8;

fn is_deny(v: &PolicyValue) -> bool {
    v.verdict == TS_VERDICT_DENY as u8
}

/// The writes that turn `current` into `desired`, ordered so that in every
/// intermediate state each connection gets its old decision, its new one, or
/// a denial, and never an allow with fewer requirements than both: new Deny
/// entries and the union of both flag sets first, then Allow entries,
/// removals, the final flags, and the Deny entries that go last.
pub fn plan(current: &Rules, desired: &Rules) -> Vec<Op> {
    let mut ops = Vec::new();
    // 1. Denies that are new or replace an allow.
    for (k, v) in &desired.rules {
        if is_deny(v) && current.rules.get(k) != Some(v) {
            ops.push(Op::SetRule(*k, *v));
        }
    }
    // 2. Flags: both sets' shapes, default deny if either has it.
    let ids: BTreeSet<u32> = current
        .selected
        .keys()
        .chain(desired.selected.keys())
        .copied()
        .collect();
    for id in &ids {
        let (old, new) = (current.selected.get(id), desired.selected.get(id));
        let union = old.copied().unwrap_or(0) | new.copied().unwrap_or(0);
        if old != Some(&union) {
            ops.push(Op::SetSelected(*id, union));
        }
    }
    // 3. Allows that are new or changed: first with every requirement set,
    //    then with their own. Requirements of all matching rules add up, so
    //    until the last allow is in, a connection may need more than in the
    //    end, never less.
    let changed: Vec<(&PolicyKey, &PolicyValue)> = desired
        .rules
        .iter()
        .filter(|(k, v)| !is_deny(v) && current.rules.get(*k) != Some(*v))
        .collect();
    for (k, v) in &changed {
        let strict = PolicyValue {
            flags: ALL_REQUIREMENTS,
            ..**v
        };
        if current.rules.get(*k) != Some(&strict) {
            ops.push(Op::SetRule(**k, strict));
        }
    }
    // 4. Allows that go get every requirement too, before anything is
    //    lowered or removed: the last of them to go leaves only what the new
    //    rules require.
    let stale: Vec<(&PolicyKey, &PolicyValue)> = current
        .rules
        .iter()
        .filter(|(k, v)| !is_deny(v) && !desired.rules.contains_key(*k))
        .collect();
    for (k, v) in &stale {
        if v.flags != ALL_REQUIREMENTS {
            let strict = PolicyValue {
                flags: ALL_REQUIREMENTS,
                ..**v
            };
            ops.push(Op::SetRule(**k, strict));
        }
    }
    for (k, v) in changed {
        if v.flags != ALL_REQUIREMENTS {
            ops.push(Op::SetRule(*k, *v));
        }
    }
    for (k, _) in stale {
        ops.push(Op::RemoveRule(*k));
    }
    // 5. Final flags, where they differ from the union step 2 left (an
    //    unchanged write would still move the inputs version on).
    for id in &ids {
        let union = current.selected.get(id).copied().unwrap_or(0)
            | desired.selected.get(id).copied().unwrap_or(0);
        match desired.selected.get(id) {
            Some(flags) if *flags == union => {}
            Some(flags) => ops.push(Op::SetSelected(*id, *flags)),
            None => ops.push(Op::RemoveSelected(*id)),
        }
    }
    // 6. Denies that go (after the flags no longer make them reachable or
    //    the allows that replace them are in).
    for (k, v) in &current.rules {
        if is_deny(v) && !desired.rules.contains_key(k) {
            ops.push(Op::RemoveRule(*k));
        }
    }
    ops
}

/// Applies one write to `rules` (the reference for tests, and the agent's
/// record of what the maps hold).
pub fn apply(rules: &mut Rules, op: Op) {
    match op {
        Op::SetRule(k, v) => {
            rules.rules.insert(k, v);
        }
        Op::RemoveRule(k) => {
            rules.rules.remove(&k);
        }
        Op::SetSelected(id, f) => {
            rules.selected.insert(id, f);
        }
        Op::RemoveSelected(id) => {
            rules.selected.remove(&id);
        }
    }
}

/// What the data path's policy maps hold now (after a restart: what the
/// previous agent left pinned).
pub fn read(dp: &mut Datapath) -> Result<Rules, DatapathError> {
    Ok(Rules {
        rules: dp.rules()?.into_iter().collect(),
        selected: dp.selected()?.into_iter().collect(),
    })
}

/// Moves the data path's policy maps from what they hold to `desired`, in
/// the order [`plan`] gives.
pub fn write(dp: &mut Datapath, desired: &Rules) -> Result<usize, DatapathError> {
    let current = read(dp)?;
    write_from(dp, &current, desired)
}

/// As [`write`], given what the maps hold (`current`, as last read or
/// written) instead of reading them.
pub fn write_from(
    dp: &mut Datapath,
    current: &Rules,
    desired: &Rules,
) -> Result<usize, DatapathError> {
    let ops = plan(current, desired);
    for op in &ops {
        match *op {
            Op::SetRule(k, v) => dp.set_rule(k, v)?,
            Op::RemoveRule(k) => dp.remove_rule(&k)?,
            Op::SetSelected(id, flags) => dp.set_selected(id, flags)?,
            Op::RemoveSelected(id) => dp.remove_selected(id)?,
        }
    }
    Ok(ops.len())
}

/// What the ingress policy decides, computed from the maps the way the eBPF
/// program does (the reference model for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Denied by policy.
    Deny,
    /// Allowed, with the `TS_RULE_*` requirements of the allowing rules.
    Allow(u8),
}

/// [`Decision`] for traffic from `remote` to `local` on `port`/`proto`: the
/// first entry found decides, most specific first.
pub fn decide(rules: &Rules, local: u32, remote: u32, port: u16, proto: u8) -> Decision {
    let Some(flags) = rules.selected.get(&local) else {
        return Decision::Allow(0);
    };
    let any = TS_ID_ANY as u32;
    let candidates = [
        (TS_SHAPE_EXACT, key(local, remote, port, proto)),
        (TS_SHAPE_REMOTE, key(local, remote, 0, 0)),
        (TS_SHAPE_PORT, key(local, any, port, proto)),
        (TS_SHAPE_ANY, key(local, any, 0, 0)),
    ];
    let found = candidates
        .iter()
        .filter(|(shape, _)| flags & *shape as u32 != 0)
        .find_map(|(_, k)| rules.rules.get(k));
    match found {
        Some(v) if is_deny(v) => Decision::Deny,
        Some(v) => Decision::Allow(v.flags),
        None if flags & TS_DEFAULT_DENY as u32 != 0 => Decision::Deny,
        None => Decision::Allow(0),
    }
}

/// The decision of raw (unclosed) rules by the policy semantics: any
/// matching Deny denies, else matching Allows allow with all their
/// requirements, else the identity's default. The reference that
/// [`close`] plus [`decide`] must agree with.
#[cfg(test)]
fn semantics(
    raw: &BTreeMap<PolicyKey, PolicyValue>,
    default_deny: bool,
    local: u32,
    remote: u32,
    port: u16,
    proto: u8,
) -> Decision {
    let any = TS_ID_ANY as u32;
    let (mut allow, mut need) = (false, 0u8);
    for (k, v) in raw.iter().filter(|(k, _)| k.local == local) {
        let peer = k.remote == any || k.remote == remote;
        let to = k.port == 0 || (k.port == port && k.proto == proto);
        if !(peer && to) {
            continue;
        }
        if is_deny(v) {
            return Decision::Deny;
        }
        allow = true;
        need |= v.flags;
    }
    if allow {
        Decision::Allow(need)
    } else if default_deny {
        Decision::Deny
    } else {
        Decision::Allow(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_api::crd::auth_policy::PortRange;
    use tessera_api::crd::identity_policy::CompiledPeer;

    const WEB: &str = "spiffe://td/ns/shop/sa/web";
    const DB: &str = "spiffe://td/ns/shop/sa/db";
    const OPS: &str = "spiffe://td/ns/ops/sa/tool";

    fn table() -> IdentityTable {
        let mut t = IdentityTable::default();
        t.insert(WEB, 300, 1);
        t.insert(DB, 400, 2);
        t.insert(OPS, 500, 3);
        t
    }

    fn rule(
        action: PolicyAction,
        from: Vec<CompiledPeer>,
        ports: &[(i32, Option<i32>)],
    ) -> CompiledRule {
        CompiledRule {
            action,
            from,
            ports: ports
                .iter()
                .map(|(port, end_port)| PortRange::tcp(*port, *end_port))
                .collect(),
            authentication: Authentication::Mutual,
            external_peers: Default::default(),
            l7: false,
            http: Vec::new(),
        }
    }

    fn ids(list: &[&str]) -> CompiledPeer {
        CompiledPeer {
            spiffe_ids: Some(list.iter().map(|s| (*s).to_owned()).collect()),
            ..CompiledPeer::default()
        }
    }

    #[test]
    fn rules_translate_per_numeric_identity_and_follow_the_model() {
        let db = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: true,
            rules: vec![
                rule(PolicyAction::Allow, vec![ids(&[WEB])], &[(5432, None)]),
                rule(
                    PolicyAction::Deny,
                    vec![CompiledPeer {
                        spiffe_id_prefixes: vec!["spiffe://td/ns/ops".into()],
                        ..CompiledPeer::default()
                    }],
                    &[],
                ),
            ],
            sources: vec![],
        };
        let (rules, errors) = translate(&[&db], &table());
        assert!(errors.is_empty());
        assert_eq!(rules.rules.len(), 2);
        assert_eq!(
            rules.selected[&400],
            (TS_DEFAULT_DENY | TS_SHAPE_EXACT | TS_SHAPE_REMOTE) as u32
        );
        assert_eq!(
            decide(&rules, 400, 300, 5432, TCP),
            Decision::Allow(TS_RULE_AUTH as u8)
        );
        assert_eq!(
            decide(&rules, 400, 300, 22, TCP),
            Decision::Deny,
            "default deny"
        );
        assert_eq!(
            decide(&rules, 400, 500, 5432, TCP),
            Decision::Deny,
            "deny rule"
        );
        assert_eq!(
            decide(&rules, 300, 500, 80, TCP),
            Decision::Allow(0),
            "no policy"
        );
    }

    #[test]
    fn http_rules_admit_their_peers_to_the_waypoint_and_deny_no_whole_port() {
        let http = |action, ports: &[(i32, Option<i32>)]| CompiledRule {
            l7: action == PolicyAction::Allow,
            http: vec![tessera_api::crd::auth_policy::HttpRule::default()],
            ..rule(action, vec![ids(&[WEB])], ports)
        };
        let allow = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: true,
            rules: vec![http(PolicyAction::Allow, &[(8080, None)])],
            sources: vec![],
        };
        let (rules, errors) = translate(&[&allow], &table());
        assert!(errors.is_empty());
        assert!(
            matches!(decide(&rules, 400, 300, 8080, TCP), Decision::Allow(_)),
            "the peer reaches the waypoint, which checks each request"
        );
        assert_eq!(decide(&rules, 400, 300, 8081, TCP), Decision::Deny);
        assert_eq!(decide(&rules, 400, 301, 8080, TCP), Decision::Deny);
        let deny = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: false,
            rules: vec![http(PolicyAction::Deny, &[(8080, None)])],
            sources: vec![],
        };
        let (rules, _) = translate(&[&deny], &table());
        assert_eq!(decide(&rules, 400, 300, 8080, TCP), Decision::Allow(0));
        // Without ports (refused by the CRD): fail closed.
        let portless = |action| IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: action == PolicyAction::Allow,
            rules: vec![http(action, &[])],
            sources: vec![],
        };
        let (rules, _) = translate(&[&portless(PolicyAction::Allow)], &table());
        assert_eq!(decide(&rules, 400, 300, 8080, TCP), Decision::Deny);
        let (rules, _) = translate(&[&portless(PolicyAction::Deny)], &table());
        assert_eq!(decide(&rules, 400, 300, 9000, TCP), Decision::Deny);
        // Beyond the waypoint's cap a port is neither steered nor marked:
        // it stays closed.
        let wide = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: true,
            rules: vec![http(PolicyAction::Allow, &[(1000, Some(1300))])],
            sources: vec![],
        };
        let (rules, _) = translate(&[&wide], &table());
        assert!(matches!(
            decide(&rules, 400, 300, 1000, TCP),
            Decision::Allow(_)
        ));
        assert_eq!(
            decide(&rules, 400, 300, 1000 + MAX_WAYPOINT_PORTS as u16, TCP),
            Decision::Deny
        );
    }

    #[test]
    fn an_identity_that_needs_too_many_entries_fails_closed() {
        let wide = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: false,
            rules: (0..70)
                .map(|i| {
                    rule(
                        PolicyAction::Allow,
                        vec![],
                        &[(1 + i * 1000, Some(1000 + i * 1000))],
                    )
                })
                .collect(),
            sources: vec![],
        };
        let (rules, errors) = translate(&[&wide], &table());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(rules.rules.is_empty());
        assert_eq!(decide(&rules, 400, 300, 80, TCP), Decision::Deny);
    }

    #[test]
    fn a_policy_of_an_unknown_spiffe_id_or_peer_is_skipped() {
        let p = IdentityPolicySpec {
            spiffe_id: "spiffe://td/ns/x/sa/none".into(),
            default_deny: true,
            rules: vec![],
            sources: vec![],
        };
        assert_eq!(translate(&[&p], &table()).0, Rules::default());
        let q = IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: true,
            rules: vec![rule(
                PolicyAction::Allow,
                vec![ids(&["spiffe://td/gone"])],
                &[],
            )],
            sources: vec![],
        };
        let (rules, _) = translate(&[&q], &table());
        assert!(rules.rules.is_empty());
        assert_eq!(decide(&rules, 400, 300, 1, TCP), Decision::Deny);
    }

    /// Small random raw rule sets over identities 1..=3 (0 = any), ports
    /// {0, 80, 443}, with each identity's default deny.
    fn raw_strategy() -> impl Strategy<Value = (BTreeMap<PolicyKey, PolicyValue>, Vec<bool>)> {
        let entry = (
            0u32..4,
            1u32..4,
            prop::sample::select(vec![0u16, 80, 443]),
            0u8..3,
            0u8..4,
        );
        (
            prop::collection::vec(entry, 0..10),
            prop::collection::vec(any::<bool>(), 3),
        )
            .prop_map(|(entries, dd)| {
                let mut raw = BTreeMap::new();
                for (remote, local, port, verdict, flags) in entries {
                    let v = PolicyValue {
                        verdict: if verdict == 0 {
                            TS_VERDICT_DENY as u8
                        } else {
                            TS_VERDICT_ALLOW as u8
                        },
                        flags: if verdict == 0 { 0 } else { flags },
                        pad: [0; 2],
                    };
                    let proto = if port == 0 { 0 } else { TCP };
                    merge(&mut raw, key(local, remote, port, proto), v);
                }
                (raw, dd)
            })
    }

    /// What [`translate`] makes of raw rules: closed entries and flags.
    fn closed(raw: &BTreeMap<PolicyKey, PolicyValue>, dd: &[bool]) -> Rules {
        let mut r = Rules::default();
        for local in 1..4u32 {
            let mine: BTreeMap<PolicyKey, PolicyValue> = raw
                .iter()
                .filter(|(k, _)| k.local == local)
                .map(|(k, v)| (*k, *v))
                .collect();
            let entries = close(&mine);
            let default_deny = dd[local as usize - 1];
            if default_deny || !entries.is_empty() {
                r.selected
                    .insert(local, shapes(entries.keys(), default_deny));
            }
            r.rules.extend(entries);
        }
        r
    }

    fn rules_strategy() -> impl Strategy<Value = Rules> {
        raw_strategy().prop_map(|(raw, dd)| closed(&raw, &dd))
    }

    /// `mid` is acceptable between `old` and `new`: a denial, or an allow
    /// needing at least what one side's allow needs.
    fn acceptable(mid: Decision, old: Decision, new: Decision) -> bool {
        match mid {
            Decision::Deny => true,
            Decision::Allow(f) => [old, new]
                .iter()
                .any(|s| matches!(s, Decision::Allow(g) if f & g == *g)),
        }
    }

    proptest! {
        #[test]
        fn the_first_entry_found_decides_as_the_policy_semantics_say(
            (raw, dd) in raw_strategy(),
        ) {
            let rules = closed(&raw, &dd);
            for local in 1..4u32 {
                for remote in 1..4u32 {
                    for port in [80u16, 443, 8080] {
                        let want = semantics(&raw, dd[local as usize - 1], local, remote, port, TCP);
                        let got = decide(&rules, local, remote, port, TCP);
                        prop_assert_eq!(got, want, "{}<-{}:{} with {:?}", local, remote, port, raw);
                    }
                }
            }
        }

        #[test]
        fn every_intermediate_state_is_safe_and_the_end_is_the_target(
            old in rules_strategy(),
            new in rules_strategy(),
        ) {
            let mut state = old.clone();
            for op in plan(&old, &new) {
                let before = state.clone();
                apply(&mut state, op);
                // A write that changes nothing still moves the inputs
                // version on (every cached verdict, and a sweep of the
                // established connections).
                prop_assert_ne!(&state, &before, "{:?} changes nothing", op);
                for local in 1..4u32 {
                    for remote in 1..4u32 {
                        for port in [80u16, 443, 8080] {
                            let mid = decide(&state, local, remote, port, TCP);
                            let (o, n) = (decide(&old, local, remote, port, TCP), decide(&new, local, remote, port, TCP));
                            prop_assert!(acceptable(mid, o, n), "after {op:?}: {local}<-{remote}:{port} {mid:?} (old {o:?}, new {n:?})");
                        }
                    }
                }
            }
            prop_assert_eq!(&state, &new);
            // The pass after: nothing to write.
            prop_assert_eq!(plan(&state, &new), Vec::new());
        }
    }
}
