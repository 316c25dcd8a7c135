//! A randomized churn test of the node's data path against a model, as root:
//! the real eBPF programs and maps (pinned on bpffs, attached to a real
//! cgroup), the real auth cache in sled, and the agent's own code for
//! endpoints, policy, handshake results and restarts ([`DataPlane`]).
//!
//! Events: pods created (IPv4, IPv6 or both), terminating and deleted,
//! addresses reused by pods of other identities (the old pod deleted or
//! still terminating), numeric identities reassigned (also to other SPIFFE
//! IDs), policies changed, handshakes recorded (some expiring within
//! seconds), agent restarts and mass revocations (epoch bumps). After every
//! event the kernel decides (source, local destination, port) connection
//! starts at the ingress check (`BPF_PROG_TEST_RUN`, both families) and
//! real connect() calls of local pods at the egress gate (from each pod's
//! cgroup), and each verdict is compared with the model's; any difference
//! fails, a wrong allow first of all. A verdict that rests on an
//! authentication within a second of its expiry is not compared (the
//! kernel's clock there is only that precise).
//!
//! `TESSERA_CHURN_SEED` replays a run; `TESSERA_CHURN_EVENTS` sets its length
//! (default 10,000); `cargo xtask churn --events N [--seed S]` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod kernel;
mod model;

use std::collections::BTreeMap;

use tessera_agent::datapath::authcache::Authenticated;

use kernel::Kernel;
use model::{
    Family, IDS, MAX_PODS, Model, NODES, PORTS, Rng, Tri, random_families, random_spec, unix_now,
};

/// What the run did and checked.
#[derive(Default)]
struct Tally {
    events: BTreeMap<&'static str, usize>,
    ingress: usize,
    egress: usize,
    ipv6: usize,
    allowed_under_policy: usize,
    unsure: usize,
    expired: usize,
}

struct Run {
    rng: Rng,
    model: Model,
    kernel: Kernel,
    seed: u64,
    tally: Tally,
}

fn env_or<T: std::str::FromStr>(name: &str, default: impl FnOnce() -> T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(default)
}

#[test]
fn churn_never_allows_what_the_model_denies() {
    let seed: u64 = env_or("TESSERA_CHURN_SEED", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let events: usize = env_or("TESSERA_CHURN_EVENTS", || 10_000);
    println!("seed {seed} (replay with TESSERA_CHURN_SEED={seed}), {events} events");
    let state = tempfile::tempdir().unwrap();
    let mut run = Run {
        rng: Rng(seed),
        model: Model::default(),
        kernel: Kernel::new(state.path()),
        seed,
        tally: Tally::default(),
    };
    let started = std::time::Instant::now();
    for event in 0..events {
        let Some(kind) = run.event(event) else {
            continue;
        };
        *run.tally.events.entry(kind).or_default() += 1;
        run.model.prune();
        run.kernel.sync(&run.model);
        // Every decision after restarts and every 25th event; otherwise a
        // random sample (the kernel's work dominates the run time).
        let full = matches!(kind, "agent restart" | "time passes") || event % 25 == 0;
        run.check(event, kind, full);
        if (event + 1) % 100_000 == 0 {
            println!("{} events in {:?}", event + 1, started.elapsed());
        }
    }
    run.report(events, started.elapsed());
}

impl Run {
    /// One random event applied to the model and, where the agent would
    /// act on it directly (handshakes, restarts, revocations), the kernel;
    /// None when the roll cannot happen now (no pods, no room).
    fn event(&mut self, event: usize) -> Option<&'static str> {
        if event % 5000 == 999 {
            // An authentication that expires in two seconds, and time for
            // it to expire, surely, with its pods still there.
            if let Some(auth) = self.record(event, Some(2)) {
                // A policy under which it matters.
                let spec = model::mutual_from_anyone(&auth.remote);
                self.model.specs.insert(auth.remote, spec);
            }
            std::thread::sleep(std::time::Duration::from_millis(3300));
            return Some("time passes");
        }
        let roll = self.rng.below(100);
        let m = &self.model;
        let pods = m.pods.len();
        match roll {
            0..=17 if pods < MAX_PODS && !m.free_slots().is_empty() => Some(self.create_pod()),
            18..=26 if pods > 0 => Some(self.delete_pod()),
            27..=31 if m.pods.values().any(|p| !p.terminating) => Some(self.terminate_pod()),
            32..=40 if pods > 0 => Some(self.reuse_address()),
            41..=45 if !m.ids.is_empty() => Some(self.reassign_identity()),
            46..=59 => Some(self.change_policy()),
            60..=98 => self.handshake(event),
            99 if self.rng.chance(80) => Some(self.restart()),
            99 => {
                self.kernel.plane().revoke_all().unwrap();
                self.model.auths.clear();
                Some("mass revocation")
            }
            _ => None,
        }
    }

    fn create_pod(&mut self) -> &'static str {
        let slot = *self.rng.pick(&self.model.free_slots());
        let s = self.rng.pick(&IDS).to_string();
        let n = self.rng.pick(&NODES).to_string();
        let families = random_families(&mut self.rng);
        self.model.add_pod(&s, &n, slot, families);
        "create pod"
    }

    fn delete_pod(&mut self) -> &'static str {
        let uid = self.rng.pick(&self.model.uids(|_| true)).clone();
        self.model.pods.remove(&uid);
        "delete pod"
    }

    fn terminate_pod(&mut self) -> &'static str {
        let uid = self.rng.pick(&self.model.uids(|p| !p.terminating)).clone();
        if let Some(p) = self.model.pods.get_mut(&uid) {
            p.terminating = true;
        }
        "pod terminating"
    }

    /// The address of a pod goes to a new pod of another identity, while
    /// the old one is deleted or still terminating.
    fn reuse_address(&mut self) -> &'static str {
        let uid = self.rng.pick(&self.model.uids(|_| true)).clone();
        let keep = self.model.pods.len() < MAX_PODS + 4 && self.rng.chance(50);
        let old = if keep {
            let p = self.model.pods.get_mut(&uid).unwrap();
            p.terminating = true;
            p.clone()
        } else {
            self.model.pods.remove(&uid).unwrap()
        };
        let others: Vec<&str> = IDS.iter().copied().filter(|s| *s != old.spiffe).collect();
        let s = self.rng.pick(&others).to_string();
        let n = self.rng.pick(&NODES).to_string();
        let families = random_families(&mut self.rng);
        self.model.add_pod(&s, &n, old.slot, families);
        if keep {
            "address reused while its pod terminates"
        } else {
            "address reused"
        }
    }

    /// A SPIFFE ID gets a new number; its old number may go to another
    /// SPIFFE ID, at a newer generation.
    fn reassign_identity(&mut self) -> &'static str {
        let ids: Vec<String> = self.model.ids.keys().cloned().collect();
        let s1 = self.rng.pick(&ids).clone();
        let (old_id, _) = self.model.ids[&s1];
        let fresh = self.model.fresh_identity();
        self.model.ids.insert(s1.clone(), fresh);
        if self.rng.chance(60) {
            let s2 = self.rng.pick(&IDS).to_string();
            if s2 != s1 {
                self.model.next_gen += 1;
                let generation = self.model.next_gen;
                self.model.ids.insert(s2, (old_id, generation));
            }
        }
        "identity reassigned"
    }

    fn change_policy(&mut self) -> &'static str {
        let dst = self.rng.pick(&IDS).to_string();
        if self.rng.chance(25) {
            self.model.specs.remove(&dst);
        } else {
            let spec = random_spec(&mut self.rng, &dst);
            self.model.specs.insert(dst, spec);
        }
        "policy changed"
    }

    /// A handshake between a live local pod and a live pod anywhere is
    /// recorded; a quarter expire within 2 to 4 s (at least 2: the agent
    /// counts whole seconds, and a NotAfter 1 s ahead may be due by the
    /// time it records it), and a few begin before
    /// a mass revocation and must not be recorded after it.
    fn handshake(&mut self, event: usize) -> Option<&'static str> {
        if self.rng.chance(1) {
            let auth = self.pair(3600)?;
            let (plane, view) = (self.kernel.plane(), self.model.view());
            let started_in = plane.epoch();
            plane.revoke_all().unwrap();
            self.model.auths.clear();
            assert!(
                !plane.record(&view, &auth, None, started_in),
                "event {event}: a handshake begun before a revocation was recorded after it"
            );
            return Some("handshake across a revocation");
        }
        let short = self.rng.chance(25);
        let expires_in = short.then(|| 2 + self.rng.below(3) as i64);
        self.record(event, expires_in)?;
        Some(if short {
            "short-lived handshake"
        } else {
            "handshake"
        })
    }

    /// A live local pod and a live pod anywhere, authenticated until
    /// `expires_in` seconds from now.
    fn pair(&mut self, expires_in: i64) -> Option<Authenticated> {
        let m = &self.model;
        let locals = m.uids(|p| p.is_local() && !p.terminating);
        let all = m.uids(|p| !p.terminating);
        if locals.is_empty() {
            return None;
        }
        let l = &m.pods[self.rng.pick(&locals)];
        let r = &m.pods[self.rng.pick(&all)];
        Some(Authenticated {
            local: l.spiffe.clone(),
            remote: r.spiffe.clone(),
            remote_node: r.node.clone(),
            not_after: tessera_agent::clock::unix_now() + expires_in,
        })
    }

    /// Records a handshake of a random pair, in the kernel and the model
    /// (an hour long unless `expires_in` seconds are given).
    fn record(&mut self, event: usize, expires_in: Option<i64>) -> Option<Authenticated> {
        let auth = self.pair(expires_in.unwrap_or(3600))?;
        let plane = self.kernel.plane();
        let view = self.model.view();
        assert!(
            plane.record(&view, &auth, None, plane.epoch()),
            "event {event}: handshake not recorded"
        );
        let m = &self.model;
        let key = (
            m.incarnation(&auth.local),
            m.incarnation(&auth.remote),
            auth.remote_node.clone(),
        );
        let t = auth.not_after as f64;
        self.model.auths.insert(key, (t, t));
        Some(auth)
    }

    fn restart(&mut self) -> &'static str {
        let before = unix_now();
        self.kernel.restart(&self.model);
        let grace = tessera_agent::datapath::maps::RESTORE_GRACE.as_secs_f64();
        self.model.cap_restored(before, unix_now(), grace);
        "agent restart"
    }
}

impl Run {
    /// Compares the kernel's verdicts with the model's: all of them when
    /// `full`, else a random sample.
    fn check(&mut self, event: usize, kind: &str, full: bool) {
        let m = &self.model;
        let owned = m.owned();
        let mut ingress = Vec::new();
        for (dst_addr, dst) in owned.iter().filter(|(_, p)| p.is_local()) {
            for (src_addr, src) in owned.iter().filter(|(a, _)| a.0 == dst_addr.0) {
                for port in PORTS {
                    ingress.push((*src_addr, *src, *dst_addr, *dst, port));
                }
            }
        }
        let mut egress = Vec::new();
        for (uid, src) in m.pods.iter().filter(|(_, p)| p.is_local()) {
            for (dst_addr, dst) in &owned {
                for port in PORTS {
                    egress.push((uid.clone(), src, *dst_addr, *dst, port));
                }
            }
        }
        if !full {
            ingress = sample(&mut self.rng, ingress, 30);
            egress = sample(&mut self.rng, egress, 20);
            egress.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let mut tally = Tally {
            ingress: ingress.len(),
            egress: egress.len(),
            ..Tally::default()
        };
        type Case<'a> = (&'a model::MPod, &'a model::MPod, Family, u16);
        let mut judge = |at: &str,
                         (src, dst, family, port): Case,
                         verdict: (Tri, bool),
                         got: bool| {
            let under_policy = m.specs.contains_key(&dst.spiffe);
            tally.count(verdict, got, family, under_policy);
            let (want, _) = verdict;
            let wrong = match (want, got) {
                (Tri::No, true) => "WRONG ALLOW",
                (Tri::Yes, false) => "wrong deny",
                _ => return,
            };
            panic!(
                "{wrong} at {at} after event {event} ({kind}), seed {}: {src:?} -> {dst:?}:{port}",
                self.seed
            );
        };
        for (src_addr, src, dst_addr, dst, port) in ingress {
            let before = unix_now();
            let got = self
                .kernel
                .ingress_allows(model::ip(src_addr), model::ip(dst_addr), port);
            let (a, b) = (
                m.ingress(src, dst, port, before),
                m.ingress(src, dst, port, unix_now()),
            );
            judge("ingress", (src, dst, dst_addr.0, port), steady(a, b), got);
        }
        let calls: Vec<_> = egress
            .iter()
            .map(|(uid, _, a, _, port)| (uid.clone(), model::ip(*a), *port))
            .collect();
        let before = unix_now();
        let verdicts = self.kernel.connects(&calls);
        let after = unix_now();
        for ((_, src, dst_addr, dst, port), got) in egress.into_iter().zip(verdicts) {
            let (a, b) = (
                m.egress(src, dst, port, before),
                m.egress(src, dst, port, after),
            );
            let want = steady(a, b);
            let case = (src, dst, dst_addr.0, port);
            let allowed = got.admitted && !got.held;
            judge("the connect gate", case, want, allowed);
            // Not allowed (yet): held while the policy waits for an
            // authentication, refused otherwise.
            let holds = m.needs_auth(src, dst, port);
            if want.0 != Tri::Yes && !allowed && got.held != holds {
                panic!(
                    "the connect gate {} after event {event} ({kind}), seed {}: {src:?} -> {dst:?}:{port}",
                    if holds {
                        "refused a connection it should hold"
                    } else {
                        "held a connection the policy refuses"
                    },
                    self.seed
                );
            }
        }
        self.tally.add(&tally);
    }

    fn report(&self, events: usize, took: std::time::Duration) {
        let t = &self.tally;
        println!("events: {:?}", t.events);
        println!(
            "{} ingress and {} connect-gate decisions checked ({} IPv6, {} allowed under a policy, {} refused because an authentication expired, {} not compared: an authentication at its expiry); 0 wrong; {events} events in {took:?}, seed {}",
            t.ingress, t.egress, t.ipv6, t.allowed_under_policy, t.expired, t.unsure, self.seed
        );
        if events < 5000 {
            return;
        }
        // The run must have exercised what it claims to.
        for kind in [
            "create pod",
            "delete pod",
            "pod terminating",
            "address reused",
            "address reused while its pod terminates",
            "identity reassigned",
            "policy changed",
            "handshake",
            "short-lived handshake",
            "handshake across a revocation",
            "agent restart",
            "mass revocation",
            "time passes",
        ] {
            assert!(
                t.events.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} event"
            );
        }
        assert!(t.ingress > 0 && t.egress > 0 && t.ipv6 > 0 && t.allowed_under_policy > 0);
        assert!(
            t.expired > 0,
            "no connection was refused for an expired authentication"
        );
    }
}

impl Tally {
    fn count(
        &mut self,
        (want, expired): (Tri, bool),
        got: bool,
        family: Family,
        under_policy: bool,
    ) {
        if want == Tri::Unsure {
            self.unsure += 1;
        }
        if expired {
            self.expired += 1;
        }
        if family == Family::V6 {
            self.ipv6 += 1;
        }
        if got && want == Tri::Yes && under_policy {
            self.allowed_under_policy += 1;
        }
    }

    fn add(&mut self, other: &Tally) {
        self.ingress += other.ingress;
        self.egress += other.egress;
        self.ipv6 += other.ipv6;
        self.allowed_under_policy += other.allowed_under_policy;
        self.unsure += other.unsure;
        self.expired += other.expired;
    }
}

/// The model's verdict for a kernel decision made between two instants,
/// given its verdicts at each: unsure when an authentication expired in
/// between (a slow check on a busy machine).
fn steady(before: (Tri, bool), after: (Tri, bool)) -> (Tri, bool) {
    if before.0 == after.0 {
        after
    } else {
        (Tri::Unsure, false)
    }
}

fn sample<T: Clone>(rng: &mut Rng, all: Vec<T>, n: usize) -> Vec<T> {
    if all.is_empty() {
        return all;
    }
    (0..n).map(|_| all[rng.below(all.len())].clone()).collect()
}
