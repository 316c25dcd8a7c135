//! The model the churn test holds the kernel to: pods, their addresses and
//! identities, policies, and authentications, in terms of SPIFFE IDs and
//! identity incarnations only, with the policy semantics docs/policy.md states.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tessera_agent::datapath::policy::IdentityTable;
use tessera_agent::datapath::view::{PodView, View};
use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{Authentication, PolicyAction, PortRange, Protocol};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};

pub const LOCAL: &str = "n1";
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub const PORTS: [u16; 3] = [80, 443, 8080];
pub const IDS: [&str; 5] = [
    "spiffe://td/ns/shop/sa/a",
    "spiffe://td/ns/shop/sa/b",
    "spiffe://td/ns/shop/sa/c",
    "spiffe://td/ns/ops/sa/d",
    "spiffe://td/ns/ops/sa/e",
];
pub const MAX_PODS: usize = 14;
/// Address slots: slot n is 198.19.0.(n+1) and 2001:db8:19::(n+1).
pub const SLOTS: u8 = 18;

/// How far the kernel's expiry of an authentication may lag its NotAfter:
/// the agent converts whole Unix seconds to the monotonic clock (up to 1 s
/// late) and the programs read a coarse clock (a tick late).
pub const EXPIRY_LAG: f64 = 1.1;

/// SplitMix64: small, seedable, good enough for choosing events.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// A pod address: its family and slot.
pub type Addr = (Family, u8);

pub fn ip((family, slot): Addr) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 19, 0, slot + 1)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x19,
            0,
            0,
            0,
            0,
            u16::from(slot) + 1,
        )),
    }
}

/// Families a new pod gets: mostly dual-stack.
pub fn random_families(rng: &mut Rng) -> Vec<Family> {
    match rng.below(5) {
        0 => vec![Family::V4],
        1 => vec![Family::V6],
        _ => vec![Family::V4, Family::V6],
    }
}

#[derive(Debug, Clone)]
pub struct MPod {
    pub spiffe: String,
    pub node: String,
    pub slot: u8,
    pub families: Vec<Family>,
    /// Deleted but still running (graceful termination).
    pub terminating: bool,
    /// Creation order (the agent prefers the newest live pod of an address).
    pub created: u64,
}

impl MPod {
    pub fn addrs(&self) -> impl Iterator<Item = Addr> + '_ {
        self.families.iter().map(|f| (*f, self.slot))
    }
    pub fn is_local(&self) -> bool {
        self.node == LOCAL
    }
}

/// (SPIFFE ID, numeric id, generation).
pub type Incarnation = (String, u32, u64);

/// Local incarnation, remote incarnation, remote node: an authentication
/// as this node's agent records it.
pub type AuthOf = (Incarnation, Incarnation, String);

/// A verdict the model can be sure of, or not (an authentication at the
/// edge of its expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    Yes,
    No,
    Unsure,
}

#[derive(Default)]
pub struct Model {
    pub pods: BTreeMap<String, MPod>,
    pub ids: BTreeMap<String, (u32, u64)>,
    pub next_id: u32,
    pub next_gen: u64,
    pub next_uid: u64,
    pub specs: BTreeMap<String, IdentityPolicySpec>,
    /// Each authentication with the earliest and latest Unix time its
    /// NotAfter may be (they differ after a restart caps it).
    pub auths: BTreeMap<AuthOf, (f64, f64)>,
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Model {
    pub fn incarnation(&self, spiffe: &str) -> Incarnation {
        let (id, generation) = self.ids[spiffe];
        (spiffe.to_owned(), id, generation)
    }

    pub fn fresh_identity(&mut self) -> (u32, u64) {
        self.next_id += 1;
        self.next_gen += 1;
        (self.next_id + 1000, self.next_gen)
    }

    pub fn add_pod(&mut self, spiffe: &str, node: &str, slot: u8, families: Vec<Family>) {
        if !self.ids.contains_key(spiffe) {
            let fresh = self.fresh_identity();
            self.ids.insert(spiffe.to_owned(), fresh);
        }
        self.next_uid += 1;
        self.pods.insert(
            format!("uid-{:08}", self.next_uid),
            MPod {
                spiffe: spiffe.to_owned(),
                node: node.to_owned(),
                slot,
                families,
                terminating: false,
                created: self.next_uid,
            },
        );
    }

    pub fn uids(&self, filter: impl Fn(&MPod) -> bool) -> Vec<String> {
        self.pods
            .iter()
            .filter(|(_, p)| filter(p))
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Slots no pod uses, terminating or not.
    pub fn free_slots(&self) -> Vec<u8> {
        let used: BTreeSet<u8> = self.pods.values().map(|p| p.slot).collect();
        (0..SLOTS).filter(|i| !used.contains(i)).collect()
    }

    /// The pod an address stands for: of the pods claiming it, the live
    /// and newest one.
    pub fn owner(&self, addr: Addr) -> Option<&MPod> {
        self.pods
            .values()
            .filter(|p| p.addrs().any(|a| a == addr))
            .max_by_key(|p| (!p.terminating, p.created))
    }

    /// Every address some pod claims, with the pod it stands for.
    pub fn owned(&self) -> Vec<(Addr, &MPod)> {
        let addrs: BTreeSet<Addr> = self.pods.values().flat_map(|p| p.addrs()).collect();
        addrs
            .into_iter()
            .filter_map(|a| Some((a, self.owner(a)?)))
            .collect()
    }

    fn live(&self, inc: &Incarnation, node: &str) -> bool {
        self.pods.values().any(|p| {
            !p.terminating
                && p.node == node
                && p.spiffe == inc.0
                && self.incarnation(&p.spiffe) == *inc
        })
    }

    /// Authentications hold while both incarnations keep a live pod on
    /// their node (and until they expire).
    pub fn prune(&mut self) {
        let keep: Vec<bool> = self
            .auths
            .keys()
            .map(|(l, r, node)| self.live(l, LOCAL) && self.live(r, node))
            .collect();
        let mut keep = keep.into_iter();
        self.auths.retain(|_, _| keep.next().unwrap_or(false));
    }

    /// A restarted agent caps every restored authentication at `grace`
    /// seconds from its restart (which fell between `before` and `after`).
    pub fn cap_restored(&mut self, before: f64, after: f64, grace: f64) {
        for (lo, hi) in self.auths.values_mut() {
            *lo = lo.min(before.floor() + grace);
            *hi = hi.min(after.floor() + grace);
        }
    }

    /// Whether the pair is authenticated at `now`, and whether it was
    /// until its authentication expired.
    fn auth(&self, key: &AuthOf, now: f64) -> (Tri, bool) {
        match self.auths.get(key) {
            Some((lo, _)) if now < lo - 0.05 => (Tri::Yes, false),
            Some((_, hi)) if now < hi + EXPIRY_LAG => (Tri::Unsure, false),
            Some(_) => (Tri::No, true),
            None => (Tri::No, false),
        }
    }

    pub fn view(&self) -> View {
        let pods = self.pods.iter().map(|(uid, p)| {
            let (id, generation) = self.ids[&p.spiffe];
            let node_ip = NODES.iter().position(|n| *n == p.node).unwrap_or(0) as u8 + 1;
            PodView {
                uid: uid.as_str().into(),
                name: uid.as_str().into(),
                node: p.node.as_str().into(),
                ips: p.addrs().map(ip).collect(),
                host_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, node_ip))),
                spiffe_id: p.spiffe.as_str().into(),
                id,
                generation,
                terminating: p.terminating,
                created: p.created as i64,
                host_network: false,
                vouched: false,
            }
        });
        View::new(LOCAL, pods)
    }

    pub fn table(&self) -> IdentityTable {
        let mut t = IdentityTable::default();
        for (s, (id, generation)) in &self.ids {
            t.insert(s.as_str(), *id, *generation);
        }
        t
    }

    /// An authentication as this node records it: its local pod `local`,
    /// with `remote` on its node.
    fn auth_of(&self, local: &MPod, remote: &MPod) -> AuthOf {
        (
            self.incarnation(&local.spiffe),
            self.incarnation(&remote.spiffe),
            remote.node.clone(),
        )
    }

    /// A connection start from `src` to local pod `dst`:`port` at the
    /// ingress check (it needs `dst`'s authentication with `src`). The
    /// verdict, and whether it is a refusal because that authentication
    /// expired.
    pub fn ingress(&self, src: &MPod, dst: &MPod, port: u16, now: f64) -> (Tri, bool) {
        let key = self.auth_of(dst, src);
        self.decide(src, dst, port, || self.auth(&key, now))
    }

    /// A connect() of local pod `src` to `dst`:`port` at the egress gate
    /// (it needs `src`'s authentication with `dst`).
    pub fn egress(&self, src: &MPod, dst: &MPod, port: u16, now: f64) -> (Tri, bool) {
        let key = self.auth_of(src, dst);
        self.decide(src, dst, port, || self.auth(&key, now))
    }

    /// Whether the destination's policy admits `src` -> `dst`:`port` once
    /// the pair is authenticated, and not before: the egress gate holds
    /// such a connection while the authentication is pending.
    pub fn needs_auth(&self, src: &MPod, dst: &MPod, port: u16) -> bool {
        self.decide(src, dst, port, || (Tri::No, false)).0 == Tri::No
            && self.decide(src, dst, port, || (Tri::Yes, false)).0 == Tri::Yes
    }

    /// The destination's policy for `src` -> `dst`:`port`; `auth` says
    /// whether the pair is authenticated, where a rule asks for it.
    fn decide(
        &self,
        src: &MPod,
        dst: &MPod,
        port: u16,
        auth: impl Fn() -> (Tri, bool),
    ) -> (Tri, bool) {
        let Some(spec) = self.specs.get(&dst.spiffe) else {
            return (Tri::Yes, false);
        };
        let matching: Vec<&CompiledRule> = spec
            .rules
            .iter()
            .filter(|r| r.from.iter().any(|p| peer_matches(p, &src.spiffe)))
            .filter(|r| r.ports.is_empty() || r.ports.iter().any(|pr| port_in(pr, port)))
            .collect();
        if matching.iter().any(|r| r.action == PolicyAction::Deny) {
            return (Tri::No, false);
        }
        let allows: Vec<&&CompiledRule> = matching
            .iter()
            .filter(|r| r.action == PolicyAction::Allow)
            .collect();
        if allows.is_empty() {
            return (if spec.default_deny { Tri::No } else { Tri::Yes }, false);
        }
        if allows
            .iter()
            .all(|r| r.authentication == Authentication::None)
        {
            return (Tri::Yes, false);
        }
        auth()
    }
}

/// A policy for `dst`: anyone may connect, authenticated.
pub fn mutual_from_anyone(dst: &str) -> IdentityPolicySpec {
    IdentityPolicySpec {
        spiffe_id: dst.to_owned(),
        default_deny: true,
        rules: vec![CompiledRule {
            action: PolicyAction::Allow,
            from: vec![CompiledPeer::default()],
            ports: vec![],
            authentication: Authentication::Mutual,
            l7: false,
            http: Vec::new(),
            external_peers: Default::default(),
        }],
        sources: vec![],
    }
}

fn port_in(range: &PortRange, port: u16) -> bool {
    range.protocol == Protocol::Tcp
        && i32::from(port) >= range.port
        && i32::from(port) <= range.end_port.unwrap_or(range.port)
}

/// The model's own peer matching, for the peers this test generates.
fn peer_matches(peer: &CompiledPeer, id: &str) -> bool {
    let exact = peer
        .spiffe_ids
        .as_ref()
        .is_none_or(|ids| ids.iter().any(|i| i == id));
    let prefix = peer.spiffe_id_prefixes.is_empty()
        || peer.spiffe_id_prefixes.iter().any(|p| {
            id.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        });
    exact && prefix
}

fn random_peer(rng: &mut Rng) -> CompiledPeer {
    match rng.below(4) {
        0 => CompiledPeer::default(),
        1 => CompiledPeer {
            spiffe_id_prefixes: vec![
                rng.pick(&["spiffe://td/ns/shop", "spiffe://td/ns/ops"])
                    .to_string(),
            ],
            ..Default::default()
        },
        _ => CompiledPeer {
            spiffe_ids: Some(
                (0..=rng.below(2))
                    .map(|_| rng.pick(&IDS).to_string())
                    .collect(),
            ),
            ..Default::default()
        },
    }
}

fn random_ports(rng: &mut Rng) -> Vec<PortRange> {
    match rng.below(3) {
        0 => vec![],
        1 => vec![PortRange {
            port: i32::from(*rng.pick(&PORTS)),
            end_port: None,
            protocol: Protocol::Tcp,
        }],
        _ => vec![PortRange {
            port: 440,
            end_port: Some(450),
            protocol: Protocol::Tcp,
        }],
    }
}

pub fn random_spec(rng: &mut Rng, dst: &str) -> IdentityPolicySpec {
    let mut rules = Vec::new();
    for _ in 0..=rng.below(3) {
        let from = vec![random_peer(rng)];
        let ports = random_ports(rng);
        rules.push(CompiledRule {
            action: if rng.chance(25) {
                PolicyAction::Deny
            } else {
                PolicyAction::Allow
            },
            from,
            ports,
            authentication: if rng.chance(70) {
                Authentication::Mutual
            } else {
                Authentication::None
            },
            l7: false,
            http: Vec::new(),
            external_peers: Default::default(),
        });
    }
    IdentityPolicySpec {
        spiffe_id: dst.to_owned(),
        default_deny: rules.iter().any(|r| r.action == PolicyAction::Allow) || rng.chance(20),
        rules,
        sources: vec![],
    }
}
