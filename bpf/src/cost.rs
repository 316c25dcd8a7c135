//! What one decision of the ingress program costs, measured by the kernel:
//! `BPF_PROG_TEST_RUN` repeats the program on one packet and reports the
//! mean time per run. Needs root.

use std::net::IpAddr;

use aya::maps::{Array, HashMap, MapData};
use aya::programs::{CgroupSkb, TestRun, TestRunOptions};

use crate::abi::consts::{
    TS_DEFAULT_DENY, TS_RULE_AUTH, TS_SHAPE_ANY, TS_SHAPE_EXACT, TS_SHAPE_PORT, TS_SHAPE_REMOTE,
    TS_VERDICT_ALLOW,
};
use crate::abi::{AuthKey, AuthValue, Endpoint, IpKey, PolicyKey, PolicyValue, Selected};
use crate::packets::{self, SYN, TCP};
use crate::{maps, programs};

/// Why the measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// Loading the object or a program failed.
    #[error("cannot load the eBPF object: {0}; run as root (CAP_BPF)")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("eBPF program error: {0}; run as root (CAP_BPF)")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    /// A program or map is missing from the object.
    #[error("{0} is missing from the eBPF object")]
    Missing(&'static str),
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
    let mut ebpf = aya::Ebpf::load(crate::OBJECT)?;
    {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(programs::INGRESS)
            .ok_or(CostError::Missing(programs::INGRESS))?
            .try_into()?;
        prog.load()?;
    }
    let (a, b, c) = ([198, 18, 1, 10], [198, 18, 2, 10], [198, 18, 1, 11]);
    {
        let mut eps: HashMap<&mut MapData, IpKey, Endpoint> = HashMap::try_from(
            ebpf.map_mut(maps::EP_IP)
                .ok_or(CostError::Missing(maps::EP_IP))?,
        )?;
        let ep = |id, node, gen_| Endpoint { id, node, gen_ };
        eps.insert(IpKey::from(IpAddr::from(a)), ep(300, 1, 5), 0)?;
        eps.insert(IpKey::from(IpAddr::from(b)), ep(400, 2, 7), 0)?;
        eps.insert(IpKey::from(IpAddr::from(c)), ep(600, 1, 9), 0)?;
    }
    {
        let mut sel: HashMap<&mut MapData, u32, Selected> = HashMap::try_from(
            ebpf.map_mut(maps::SELECTED)
                .ok_or(CostError::Missing(maps::SELECTED))?,
        )?;
        let all = TS_SHAPE_EXACT | TS_SHAPE_REMOTE | TS_SHAPE_PORT | TS_SHAPE_ANY | TS_DEFAULT_DENY;
        sel.insert(300, Selected { flags: all as u32 }, 0)?;
    }
    {
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyValue> = HashMap::try_from(
            ebpf.map_mut(maps::POLICY)
                .ok_or(CostError::Missing(maps::POLICY))?,
        )?;
        let key = PolicyKey {
            local: 300,
            remote: 400,
            port: 8080,
            proto: TCP,
            pad: 0,
        };
        let value = PolicyValue {
            verdict: TS_VERDICT_ALLOW as u8,
            flags: TS_RULE_AUTH as u8,
            pad: [0; 2],
        };
        policy.insert(key, value, 0)?;
    }
    {
        let mut auth: HashMap<&mut MapData, AuthKey, AuthValue> = HashMap::try_from(
            ebpf.map_mut(maps::AUTH)
                .ok_or(CostError::Missing(maps::AUTH))?,
        )?;
        let key = AuthKey {
            local: 300,
            remote: 400,
            remote_node: 2,
            pad: 0,
        };
        let value = AuthValue {
            local_gen: 5,
            remote_gen: 7,
            expires_ns: u64::MAX,
            epoch: 0,
        };
        auth.insert(key, value, 0)?;
        let mut epoch: Array<&mut MapData, u64> = Array::try_from(
            ebpf.map_mut(maps::EPOCH)
                .ok_or(CostError::Missing(maps::EPOCH))?,
        )?;
        epoch.set(0, 0, 0)?;
    }
    let prog: &CgroupSkb = ebpf
        .program(programs::INGRESS)
        .ok_or(CostError::Missing(programs::INGRESS))?
        .try_into()?;
    let run = |scenario: &'static str, packet: &[u8]| -> Result<f64, CostError> {
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })?;
        if result.return_value != 1 {
            return Err(CostError::Verdict {
                scenario,
                got: result.return_value,
                want: 1,
            });
        }
        Ok(result.duration.as_nanos() as f64)
    };
    Ok(DecisionCost {
        no_policy_ns: run("no-policy", &packets::ipv4(b, c, TCP, 8080, SYN))?,
        authenticated_ns: run("authenticated", &packets::ipv4(b, a, TCP, 8080, SYN))?,
    })
}
