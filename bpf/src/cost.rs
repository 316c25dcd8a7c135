//! What one decision of the ingress program costs, measured by the kernel:
//! `BPF_PROG_TEST_RUN` repeats the program on one packet and reports the
//! mean time per run. Needs root.

use std::net::IpAddr;

use crate::abi::consts::{
    TS_DEFAULT_DENY, TS_RULE_AUTH, TS_SHAPE_ANY, TS_SHAPE_EXACT, TS_SHAPE_PORT, TS_SHAPE_REMOTE,
    TS_VERDICT_ALLOW,
};
use crate::abi::{AuthKey, AuthValue, Endpoint, PolicyKey, PolicyValue};
use crate::datapath::{Datapath, DatapathError};
use crate::packets::{self, SYN, TCP};

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
    /// A SYN to a pod no policy selects (one lookup after parsing).
    pub no_policy_ns: f64,
    /// A SYN to a pod whose policy has every rule kind and requires
    /// authentication, with a valid authentication: the longest path.
    pub authenticated_ns: f64,
}

/// Loads the program, fills the maps for both scenarios and runs each
/// `repeat` times.
pub fn measure(repeat: u32) -> Result<DecisionCost, CostError> {
    let mut dp = Datapath::load()?;
    let (a, b, c) = ([198, 18, 1, 10], [198, 18, 2, 10], [198, 18, 1, 11]);
    let ep = |id, node, gen_| Endpoint { id, node, gen_ };
    dp.set_endpoint_ip(IpAddr::from(a), ep(300, 1, 5))?;
    dp.set_endpoint_ip(IpAddr::from(b), ep(400, 2, 7))?;
    dp.set_endpoint_ip(IpAddr::from(c), ep(600, 1, 9))?;
    let all = TS_SHAPE_EXACT | TS_SHAPE_REMOTE | TS_SHAPE_PORT | TS_SHAPE_ANY | TS_DEFAULT_DENY;
    dp.set_selected(300, all as u32)?;
    dp.set_rule(
        PolicyKey {
            local: 300,
            remote: 400,
            port: 8080,
            proto: TCP,
            pad: 0,
        },
        PolicyValue {
            verdict: TS_VERDICT_ALLOW as u8,
            flags: TS_RULE_AUTH as u8,
            pad: [0; 2],
        },
    )?;
    dp.set_auth(
        AuthKey {
            local: 300,
            remote: 400,
            remote_node: 2,
            pad: 0,
        },
        AuthValue {
            local_gen: 5,
            remote_gen: 7,
            expires_ns: u64::MAX,
            epoch: 0,
        },
    )?;
    dp.set_epoch(0)?;
    let run = |scenario: &'static str, packet: &[u8]| -> Result<f64, CostError> {
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
    Ok(DecisionCost {
        no_policy_ns: run("no-policy", &packets::ipv4(b, c, TCP, 8080, SYN))?,
        authenticated_ns: run("authenticated", &packets::ipv4(b, a, TCP, 8080, SYN))?,
    })
}
