//! What one decision of the ingress program costs, measured by the kernel:
//! `BPF_PROG_TEST_RUN` repeats the program on one packet and reports the
//! mean time per run. Needs root.

use std::net::IpAddr;

use crate::abi::consts::{
    TS_DEFAULT_DENY, TS_ID_ANY, TS_RULE_AUTH, TS_SHAPE_ANY, TS_SHAPE_EXACT, TS_SHAPE_PORT,
    TS_SHAPE_REMOTE, TS_VERDICT_ALLOW,
};
use crate::abi::{AuthKey, AuthValue, Endpoint, PolicyKey, PolicyValue};
use crate::datapath::{Datapath, DatapathError};
use crate::packets::{self, ACK, SYN, TCP};

/// Why the measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// Loading the data path or writing its maps failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The program decided differently than the scenario expects.
    #[error("the {scenario} scenario returned {got}, expected {want}")]
    Verdict {
        /// Which scenario.
        scenario: &'static str,
        /// The program's return value.
        got: u32,
        /// The expected one.
        want: u32,
    },
}

/// Mean nanoseconds per packet of the ingress program.
#[derive(Debug, Clone, Copy)]
pub struct DecisionCost {
    /// A frame that is not IP: the program returns at its first check. What
    /// BPF_PROG_TEST_RUN itself costs per run, plus almost nothing; the
    /// floor every other figure stands on.
    pub floor_ns: f64,
    /// A SYN to a pod no policy selects, full decision (address and
    /// policy-flag lookups).
    pub no_policy_ns: f64,
    /// A SYN to a pod whose policy requires authentication from the source,
    /// with a valid authentication, decided in full: both endpoints, the
    /// policy flags, the (peer, port) entry, the authentication. The path of
    /// a flow key's first connection start, and of the first after any map
    /// change (a miss adds one verdict-cache lookup and an insert to this).
    pub authenticated_ns: f64,
    /// As `authenticated_ns` when the destination has entries of every kind
    /// and only the (any peer, any port) one matches: three policy lookups
    /// miss first. The longest path.
    pub authenticated_worst_ns: f64,
    /// The same SYN as `authenticated_ns` with its verdict cached (the
    /// inputs version unchanged since a connection start of the same source,
    /// destination and port was allowed): one cache lookup, the version and
    /// the expiry. The path of every further connection of the pair. Equals
    /// `authenticated_ns` where the cache is off
    /// ([`crate::datapath::VERDICT_CACHE_SUPPORTED`]).
    pub authenticated_cached_ns: f64,
    /// A packet of an established flow to the same protected pod (ACK, no
    /// SYN): the program parses down to the TCP flags and lets it pass. The
    /// path of nearly every packet.
    pub non_syn_ns: f64,
    /// The longest path there is: `authenticated_worst_ns` over IPv6 with a
    /// hop-by-hop and a destination options header to walk first.
    pub authenticated_worst_v6_ns: f64,
}

impl DecisionCost {
    /// The figures as one JSON object (what `tessera-agent bench-datapath`
    /// prints).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"floor_ns\": {}, \"no_policy_ns\": {}, \"authenticated_ns\": {}, \"authenticated_worst_ns\": {}, \"authenticated_worst_v6_ns\": {}, \"authenticated_cached_ns\": {}, \"non_syn_ns\": {}}}",
            self.floor_ns,
            self.no_policy_ns,
            self.authenticated_ns,
            self.authenticated_worst_ns,
            self.authenticated_worst_v6_ns,
            self.authenticated_cached_ns,
            self.non_syn_ns
        )
    }
}

/// Loads the program, fills the maps for every scenario and runs each
/// `repeat` times.
pub fn measure(repeat: u32) -> Result<DecisionCost, CostError> {
    let mut dp = Datapath::load()?;
    let (a, b, c, d) = (
        [198, 18, 1, 10],
        [198, 18, 2, 10],
        [198, 18, 1, 11],
        [198, 18, 1, 12],
    );
    let ep = |id, node, gen_| Endpoint { id, node, gen_ };
    dp.set_endpoint_ip(IpAddr::from(a), ep(300, 1, 5))?;
    dp.set_endpoint_ip(IpAddr::from(b), ep(400, 2, 7))?;
    dp.set_endpoint_ip(IpAddr::from(c), ep(600, 1, 9))?;
    dp.set_endpoint_ip(IpAddr::from(d), ep(700, 1, 11))?;
    let (b6, d6) = (v6(b), v6(d));
    dp.set_endpoint_ip(IpAddr::from(b6), ep(400, 2, 7))?;
    dp.set_endpoint_ip(IpAddr::from(d6), ep(700, 1, 11))?;
    let allow_auth = PolicyValue {
        verdict: TS_VERDICT_ALLOW as u8,
        flags: TS_RULE_AUTH as u8,
        pad: [0; 2],
    };
    let rule = |local, remote, port, proto| PolicyKey {
        local,
        remote,
        port,
        proto,
        pad: 0,
    };
    // 300: one exact entry for 400 on 8080.
    dp.set_selected(300, (TS_SHAPE_EXACT | TS_DEFAULT_DENY) as u32)?;
    dp.set_rule(rule(300, 400, 8080, TCP), allow_auth)?;
    // 700: entries of every kind, only "any peer, any port" matching 400:8080.
    let all = TS_SHAPE_EXACT | TS_SHAPE_REMOTE | TS_SHAPE_PORT | TS_SHAPE_ANY | TS_DEFAULT_DENY;
    dp.set_selected(700, all as u32)?;
    dp.set_rule(rule(700, 600, 9090, TCP), allow_auth)?;
    dp.set_rule(rule(700, 600, 0, 0), allow_auth)?;
    dp.set_rule(rule(700, TS_ID_ANY as u32, 9090, TCP), allow_auth)?;
    dp.set_rule(rule(700, TS_ID_ANY as u32, 0, 0), allow_auth)?;
    for local in [300, 700] {
        dp.set_auth(
            AuthKey {
                local,
                remote: 400,
                remote_node: 2,
                pad: 0,
            },
            AuthValue {
                local_gen: if local == 300 { 5 } else { 11 },
                remote_gen: 7,
                expires_ns: u64::MAX,
                epoch: 0,
            },
        )?;
    }
    dp.set_epoch(0)?;
    let run = |dp: &Datapath, scenario: &'static str, packet: &[u8]| -> Result<f64, CostError> {
        let (got, mean) = dp.test_ingress(packet, repeat)?;
        if got != 1 {
            return Err(CostError::Verdict {
                scenario,
                got,
                want: 1,
            });
        }
        Ok(mean.as_nanos() as f64)
    };
    let authenticated = packets::ipv4(b, a, TCP, 8080, SYN);
    let cached = run(&dp, "authenticated-cached", &authenticated)?;
    dp.set_verdict_cache(false)?;
    Ok(DecisionCost {
        floor_ns: run(&dp, "not-ip", &packets::not_ip())?,
        no_policy_ns: run(&dp, "no-policy", &packets::ipv4(b, c, TCP, 8080, SYN))?,
        authenticated_ns: run(&dp, "authenticated", &authenticated)?,
        authenticated_worst_ns: run(
            &dp,
            "authenticated-worst",
            &packets::ipv4(b, d, TCP, 8080, SYN),
        )?,
        authenticated_worst_v6_ns: run(
            &dp,
            "authenticated-worst-ipv6",
            &packets::ipv6_with(
                b6,
                d6,
                &[packets::Ext::HopByHop(0), packets::Ext::DestOpts(0)],
                TCP,
                8080,
                SYN,
            ),
        )?,
        authenticated_cached_ns: cached,
        non_syn_ns: run(&dp, "non-syn", &packets::ipv4(b, a, TCP, 8080, ACK))?,
    })
}

/// An IPv6 address for the IPv4 one of a scenario: 2001:db8::a.b.c.d.
fn v6(v4: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    a[12..].copy_from_slice(&v4);
    a
}
