//! A randomized churn test of the node's data path against a model, as root:
//! the real eBPF programs and maps (pinned on bpffs), the real auth cache in
//! sled, and the agent's own code for endpoints, policy, handshake results
//! and restarts ([`DataPlane`]). Events: pods created and deleted, addresses
//! reused by pods of other identities, numeric identities reassigned (also
//! to other SPIFFE IDs), policies changed, handshakes recorded, agent
//! restarts and mass revocations (epoch bumps). After every event every (source pod, local destination pod,
//! port) is decided by the kernel (`BPF_PROG_TEST_RUN` of the ingress
//! program) and compared with the model; any difference fails, a wrong allow
//! first of all.
//!
//! The model speaks only of SPIFFE IDs and identity incarnations: an
//! authentication made between (SPIFFE ID, numeric id, generation) L on this
//! node and R on node N holds while both incarnations still have a pod
//! there; policy semantics as the README states them.
//!
//! `TESSERA_CHURN_SEED` replays a run; `TESSERA_CHURN_EVENTS` sets its length
//! (default 10,000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_agent::dataplane::DataPlane;
use tessera_agent::handshake::Authenticated;
use tessera_agent::policy::IdentityTable;
use tessera_agent::view::{PodView, View};
use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{Authentication, PolicyAction, PortRange, Protocol};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};
use tessera_bpf::packets;

const LOCAL: &str = "n1";
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const PORTS: [u16; 3] = [80, 443, 8080];
const IDS: [&str; 5] = [
    "spiffe://td/ns/shop/sa/a",
    "spiffe://td/ns/shop/sa/b",
    "spiffe://td/ns/shop/sa/c",
    "spiffe://td/ns/ops/sa/d",
    "spiffe://td/ns/ops/sa/e",
];
const MAX_PODS: usize = 14;
const IPS: u8 = 18;

/// SplitMix64: small, seedable, good enough for choosing events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone)]
struct MPod {
    spiffe: String,
    node: String,
    ip: u8,
}

/// (SPIFFE ID, numeric id, generation).
type Incarnation = (String, u32, u64);

#[derive(Default)]
struct Model {
    pods: BTreeMap<String, MPod>,
    ids: BTreeMap<String, (u32, u64)>,
    next_id: u32,
    next_gen: u64,
    next_uid: u64,
    specs: BTreeMap<String, IdentityPolicySpec>,
    auths: BTreeSet<(Incarnation, Incarnation, String)>,
}

fn ip_of(n: u8) -> [u8; 4] {
    [198, 19, 0, n + 1]
}

impl Model {
    fn incarnation(&self, spiffe: &str) -> Incarnation {
        let (id, generation) = self.ids[spiffe];
        (spiffe.to_owned(), id, generation)
    }

    fn fresh_identity(&mut self) -> (u32, u64) {
        self.next_id += 1;
        self.next_gen += 1;
        (self.next_id + 1000, self.next_gen)
    }

    fn add_pod(&mut self, spiffe: &str, node: &str, ip: u8) {
        if !self.ids.contains_key(spiffe) {
            let fresh = self.fresh_identity();
            self.ids.insert(spiffe.to_owned(), fresh);
        }
        self.next_uid += 1;
        self.pods.insert(
            format!("uid-{}", self.next_uid),
            MPod {
                spiffe: spiffe.to_owned(),
                node: node.to_owned(),
                ip,
            },
        );
    }

    fn free_ips(&self) -> Vec<u8> {
        let used: BTreeSet<u8> = self.pods.values().map(|p| p.ip).collect();
        (0..IPS).filter(|i| !used.contains(i)).collect()
    }

    /// Authentications hold while both incarnations keep a pod on their node.
    fn prune(&mut self) {
        let live: BTreeSet<(Incarnation, String)> = self
            .pods
            .values()
            .map(|p| (self.incarnation(&p.spiffe), p.node.clone()))
            .collect();
        self.auths.retain(|(l, r, node)| {
            live.contains(&(l.clone(), LOCAL.to_owned()))
                && live.contains(&(r.clone(), node.clone()))
        });
    }

    fn view(&self) -> View {
        let pods = self.pods.iter().map(|(uid, p)| {
            let (id, generation) = self.ids[&p.spiffe];
            let node_ip = NODES.iter().position(|n| *n == p.node).unwrap() as u8 + 1;
            PodView {
                uid: uid.clone(),
                name: uid.clone(),
                node: p.node.as_str().into(),
                ips: Box::new([IpAddr::V4(Ipv4Addr::from(ip_of(p.ip)))]),
                host_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, node_ip))),
                spiffe_id: p.spiffe.as_str().into(),
                id,
                generation,
                terminating: false,
                created: 0,
            }
        });
        View::new(LOCAL, pods)
    }

    fn table(&self) -> IdentityTable {
        let mut t = IdentityTable::default();
        for (s, (id, generation)) in &self.ids {
            t.insert(s.as_str(), *id, *generation);
        }
        t
    }

    /// The model's verdict for `src` -> `dst`:`port`.
    fn allows(&self, src: &MPod, dst: &MPod, port: u16) -> bool {
        let Some(spec) = self.specs.get(&dst.spiffe) else {
            return true;
        };
        let matching: Vec<&CompiledRule> = spec
            .rules
            .iter()
            .filter(|r| r.from.iter().any(|p| peer_matches(p, &src.spiffe)))
            .filter(|r| {
                r.ports.is_empty()
                    || r.ports.iter().any(|pr| {
                        pr.protocol == Protocol::Tcp
                            && i32::from(port) >= pr.port
                            && i32::from(port) <= pr.end_port.unwrap_or(pr.port)
                    })
            })
            .collect();
        if matching.iter().any(|r| r.action == PolicyAction::Deny) {
            return false;
        }
        let allows: Vec<&&CompiledRule> = matching
            .iter()
            .filter(|r| r.action == PolicyAction::Allow)
            .collect();
        if allows.is_empty() {
            return !spec.default_deny;
        }
        if allows
            .iter()
            .all(|r| r.authentication == Authentication::None)
        {
            return true;
        }
        self.auths.contains(&(
            self.incarnation(&dst.spiffe),
            self.incarnation(&src.spiffe),
            src.node.clone(),
        ))
    }
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

fn random_spec(rng: &mut Rng, dst: &str) -> IdentityPolicySpec {
    let mut rules = Vec::new();
    for _ in 0..=rng.below(3) {
        let peer = match rng.below(4) {
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
        };
        let ports = match rng.below(3) {
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
        };
        rules.push(CompiledRule {
            action: if rng.chance(25) {
                PolicyAction::Deny
            } else {
                PolicyAction::Allow
            },
            from: vec![peer],
            ports,
            authentication: if rng.chance(70) {
                Authentication::Mutual
            } else {
                Authentication::None
            },
            l7: false,
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

struct Harness {
    pin_dir: PathBuf,
    cache_dir: PathBuf,
    plane: Option<DataPlane>,
}

impl Harness {
    fn plane(&self) -> &DataPlane {
        self.plane.as_ref().unwrap()
    }

    fn sync(&self, model: &Model) {
        let specs: Vec<&IdentityPolicySpec> = model.specs.values().collect();
        self.plane()
            .apply(&model.view(), &model.table(), &specs, &mut |_| None)
            .unwrap();
    }

    /// Drops the data path and cache (as a killed agent would) and opens
    /// them again from the pins and the cache directory.
    fn restart(&mut self, model: &Model) -> usize {
        self.plane.take();
        let (plane, opened) =
            DataPlane::open(Some(&self.pin_dir), &self.cache_dir, Arc::default()).unwrap();
        assert!(opened.discarded.is_none(), "{:?}", opened.discarded);
        self.plane = Some(plane);
        self.sync(model);
        self.plane().restore(&model.view()).unwrap()
    }

    fn kernel_allows(&self, src: u8, dst: u8, port: u16) -> bool {
        let packet = packets::ipv4(ip_of(src), ip_of(dst), packets::TCP, port, packets::SYN);
        let (ret, _) = self
            .plane()
            .with_datapath(|dp| dp.test_ingress(&packet, 1))
            .unwrap();
        ret == 1
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.plane.take();
        let _ = tessera_bpf::datapath::Datapath::remove_pins(&self.pin_dir);
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[test]
fn churn_never_allows_what_the_model_denies() {
    tessera_bpf::pinning::ensure_bpffs(Path::new("/sys/fs/bpf"))
        .expect("bpffs at /sys/fs/bpf (this test needs root)");
    let seed = std::env::var("TESSERA_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let events: usize = std::env::var("TESSERA_CHURN_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    println!("seed {seed} (replay with TESSERA_CHURN_SEED={seed}), {events} events");
    let mut rng = Rng(seed);
    let state = tempfile::tempdir().unwrap();
    let pin_root = Path::new("/sys/fs/bpf").join(format!("tessera-churn-{}", std::process::id()));
    let mut h = Harness {
        pin_dir: tessera_bpf::pinning::version_dir(&pin_root),
        cache_dir: state.path().join("authcache"),
        plane: None,
    };
    let (plane, _) = DataPlane::open(Some(&h.pin_dir), &h.cache_dir, Arc::default()).unwrap();
    h.plane = Some(plane);
    let mut model = Model::default();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut checks, mut allowed_under_policy) = (0usize, 0usize);
    for event in 0..events {
        let roll = rng.below(100);
        let kind = match roll {
            0..=19 if model.pods.len() < MAX_PODS && !model.free_ips().is_empty() => {
                let ip = *rng.pick(&model.free_ips());
                let (s, n) = (rng.pick(&IDS).to_string(), rng.pick(&NODES).to_string());
                model.add_pod(&s, &n, ip);
                "create pod"
            }
            20..=31 if !model.pods.is_empty() => {
                let uid = rng
                    .pick(&model.pods.keys().cloned().collect::<Vec<_>>())
                    .clone();
                model.pods.remove(&uid);
                "delete pod"
            }
            32..=41 if !model.pods.is_empty() => {
                // The address of a deleted pod goes to a pod of another identity.
                let uid = rng
                    .pick(&model.pods.keys().cloned().collect::<Vec<_>>())
                    .clone();
                let old = model.pods.remove(&uid).unwrap();
                let others: Vec<&str> = IDS.iter().copied().filter(|s| *s != old.spiffe).collect();
                let s = rng.pick(&others).to_string();
                let n = rng.pick(&NODES).to_string();
                model.add_pod(&s, &n, old.ip);
                "address reused"
            }
            42..=46 if !model.ids.is_empty() => {
                // A SPIFFE ID gets a new number; its old number may go to
                // another SPIFFE ID, at a newer generation.
                let s1 = rng
                    .pick(&model.ids.keys().cloned().collect::<Vec<_>>())
                    .clone();
                let (old_id, _) = model.ids[&s1];
                let fresh = model.fresh_identity();
                model.ids.insert(s1.clone(), fresh);
                if rng.chance(60) {
                    let s2 = rng.pick(&IDS).to_string();
                    if s2 != s1 {
                        model.next_gen += 1;
                        model.ids.insert(s2, (old_id, model.next_gen));
                    }
                }
                "identity reassigned"
            }
            47..=61 => {
                let dst = rng.pick(&IDS).to_string();
                if rng.chance(25) {
                    model.specs.remove(&dst);
                } else {
                    model.specs.insert(dst.clone(), random_spec(&mut rng, &dst));
                }
                "policy changed"
            }
            62..=98 => {
                let locals: Vec<MPod> = model
                    .pods
                    .values()
                    .filter(|p| p.node == LOCAL)
                    .cloned()
                    .collect();
                let all: Vec<MPod> = model.pods.values().cloned().collect();
                if locals.is_empty() {
                    continue;
                }
                let (l, r) = (rng.pick(&locals).clone(), rng.pick(&all).clone());
                let view = model.view();
                let auth = Authenticated {
                    local: l.spiffe.clone(),
                    remote: r.spiffe.clone(),
                    remote_node: r.node.clone(),
                    not_after: tessera_agent::svids::unix_now() + 3600,
                };
                let started_in = h.plane().epoch();
                if rng.chance(5) {
                    // Every authentication is revoked while this handshake
                    // runs: its result must not be recorded.
                    h.plane().revoke_all().unwrap();
                    model.auths.clear();
                    assert!(
                        !h.plane().record(&view, &auth, None, started_in),
                        "event {event}: a handshake begun before a revocation was recorded after it"
                    );
                    "handshake across a revocation"
                } else {
                    assert!(
                        h.plane().record(&view, &auth, None, started_in),
                        "event {event}: handshake not recorded"
                    );
                    model.auths.insert((
                        model.incarnation(&l.spiffe),
                        model.incarnation(&r.spiffe),
                        r.node.clone(),
                    ));
                    "handshake"
                }
            }
            99 if rng.chance(80) => {
                h.restart(&model);
                "agent restart"
            }
            99 => {
                h.plane().revoke_all().unwrap();
                model.auths.clear();
                "mass revocation"
            }
            // A guarded event that cannot happen now (no pods, no room).
            _ => continue,
        };
        *counts.entry(kind).or_default() += 1;
        model.prune();
        h.sync(&model);
        // Every decision after restarts and every 25th event; otherwise a
        // random sample of 30 (test runs dominate the run time).
        let mut triples = Vec::new();
        for dst in model.pods.values().filter(|p| p.node == LOCAL) {
            for src in model.pods.values() {
                for port in PORTS {
                    triples.push((src, dst, port));
                }
            }
        }
        if kind != "agent restart" && event % 25 != 0 {
            let all = std::mem::take(&mut triples);
            if !all.is_empty() {
                triples = (0..30).map(|_| all[rng.below(all.len())]).collect();
            }
        }
        for (src, dst, port) in triples {
            let want = model.allows(src, dst, port);
            let got = h.kernel_allows(src.ip, dst.ip, port);
            checks += 1;
            if got && want && model.specs.contains_key(&dst.spiffe) {
                allowed_under_policy += 1;
            }
            assert!(
                want || !got,
                "WRONG ALLOW after event {event} ({kind}), seed {seed}: {src:?} -> {dst:?}:{port}"
            );
            assert!(
                got || !want,
                "wrong deny after event {event} ({kind}), seed {seed}: {src:?} -> {dst:?}:{port}"
            );
        }
    }
    println!("events: {counts:?}");
    println!("{checks} decisions checked, {allowed_under_policy} allowed under a policy; 0 wrong");
    // The run must have exercised what it claims to.
    for kind in [
        "create pod",
        "delete pod",
        "address reused",
        "identity reassigned",
        "policy changed",
        "handshake",
        "agent restart",
        "mass revocation",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0 || events < 1000,
            "no {kind} event"
        );
    }
    assert!(checks > 0 && (allowed_under_policy > 0 || events < 1000));
}
