//! The agent's policy path against the kernel: random compiled policies are
//! translated, written into the real maps in planned order, and every
//! connection start the ingress program judges (BPF_PROG_TEST_RUN) must match
//! the reference model in `policy::decide`. Needs root; fails, never skips,
//! without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use anyhow::{Context, Result};
use tessera_agent::datapath::policy::{self, Decision, IdentityTable};
use tessera_api::crd::IdentityPolicySpec;
use tessera_api::crd::auth_policy::{Authentication, PolicyAction, PortRange, Protocol};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};
use tessera_bpf::abi::Endpoint;
use tessera_bpf::abi::consts::{TS_ID_UNKNOWN, TS_RULE_AUTH};
use tessera_bpf::datapath::Datapath;
use tessera_bpf::packets::{SYN, TCP, ipv4};

const IDS: [(&str, u32, [u8; 4]); 3] = [
    ("spiffe://td/ns/a/sa/web", 300, [198, 18, 0, 1]),
    ("spiffe://td/ns/a/sa/db", 400, [198, 18, 0, 2]),
    ("spiffe://td/ns/b/sa/ops", 500, [198, 18, 0, 3]),
];
const STRANGER: [u8; 4] = [198, 18, 0, 9];
const PORTS: [u16; 3] = [80, 443, 8080];

/// xorshift64: a fixed, seedable sequence, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_rule(rng: &mut Rng) -> CompiledRule {
    let from = match rng.below(4) {
        0 => vec![],
        1 => vec![CompiledPeer {
            spiffe_ids: Some(vec![IDS[rng.below(3) as usize].0.to_owned()]),
            ..CompiledPeer::default()
        }],
        2 => vec![CompiledPeer {
            spiffe_id_prefixes: vec!["spiffe://td/ns/a".into()],
            ..CompiledPeer::default()
        }],
        _ => vec![CompiledPeer {
            trust_domains: vec!["td".into()],
            ..CompiledPeer::default()
        }],
    };
    let ports = match rng.below(3) {
        0 => vec![],
        1 => vec![PortRange {
            port: PORTS[rng.below(3) as usize] as i32,
            end_port: None,
            protocol: Protocol::Tcp,
        }],
        _ => vec![PortRange {
            port: 443,
            end_port: Some(8080),
            protocol: Protocol::Tcp,
        }],
    };
    CompiledRule {
        action: if rng.below(3) == 0 {
            PolicyAction::Deny
        } else {
            PolicyAction::Allow
        },
        from,
        ports,
        authentication: if rng.below(2) == 0 {
            Authentication::Mutual
        } else {
            Authentication::None
        },
        external_peers: Default::default(),
        l7: rng.below(4) == 0,
        http: Vec::new(),
    }
}

#[test]
fn the_kernel_decides_what_the_model_decides_across_random_policy_changes() -> Result<()> {
    let mut dp = Datapath::load().context("loading the data path (needs root)")?;
    let mut table = IdentityTable::default();
    for (spiffe_id, id, ip) in IDS {
        table.insert(spiffe_id, id, 1);
        dp.set_endpoint_ip(
            IpAddr::from(ip),
            Endpoint {
                id,
                node: 1,
                gen_: 1,
            },
        )?;
    }
    let mut rng = Rng(0x7e55e7a);
    let mut checked = 0;
    for round in 0..60 {
        let mut specs = Vec::new();
        for (spiffe_id, _, _) in IDS {
            if rng.below(3) == 0 {
                continue;
            }
            let default_deny = rng.below(2) == 0;
            let rules = (0..rng.below(4)).map(|_| random_rule(&mut rng)).collect();
            specs.push(IdentityPolicySpec {
                spiffe_id: spiffe_id.to_owned(),
                default_deny,
                rules,
                sources: vec![],
            });
        }
        let refs: Vec<&IdentityPolicySpec> = specs.iter().collect();
        let (desired, errors) = policy::translate(&refs, &table);
        assert!(errors.is_empty(), "{errors:?}");
        policy::write(&mut dp, &desired)?;
        assert_eq!(
            policy::read(&mut dp)?,
            desired,
            "round {round}: maps differ from the plan's target"
        );
        for (_, local, dst) in IDS {
            let sources = IDS
                .iter()
                .map(|(_, id, ip)| (*id, *ip))
                .chain([(TS_ID_UNKNOWN as u32, STRANGER)]);
            for (remote, src) in sources {
                for port in PORTS {
                    let (verdict, _) = dp.test_ingress(&ipv4(src, dst, TCP, port, SYN), 1)?;
                    let want = match policy::decide(&desired, local, remote, port, TCP) {
                        Decision::Deny => 0,
                        // No authentication is recorded: required ones fail.
                        Decision::Allow(f) if f & TS_RULE_AUTH as u8 != 0 => 0,
                        Decision::Allow(_) => 1,
                    };
                    assert_eq!(
                        verdict, want,
                        "round {round}: {remote} -> {local}:{port}; rules {desired:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 60 * 3 * 4 * 3);
    Ok(())
}
