//! The loaded eBPF object and typed access to its maps: what the agent, the
//! tests and the decision-cost benchmark write and read. Loading needs root
//! (CAP_BPF).

use std::net::IpAddr;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupSkb, TestRun, TestRunOptions};

use crate::abi::{
    AuthEvent, AuthKey, AuthValue, Endpoint, IpKey, PolicyKey, PolicyValue, Reason, Selected,
};
use crate::{maps, programs};

/// Why loading the data path or touching its maps failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Loading the object failed.
    #[error("cannot load the eBPF object: {0}; run as root (CAP_BPF)")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed (the verifier's log is in the message).
    #[error("eBPF program error: {0}; run as root (CAP_BPF)")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    /// A program or map is missing from the object.
    #[error("{0} is missing from the eBPF object; was it built from another bpf/ tree?")]
    Missing(&'static str),
}

/// The data-path object with its ingress program loaded (not attached).
pub struct Datapath {
    ebpf: Ebpf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Datapath")
    }
}

impl Datapath {
    /// Loads [`crate::OBJECT`] and its ingress program into the kernel.
    pub fn load() -> Result<Datapath, DatapathError> {
        let mut ebpf = Ebpf::load(crate::OBJECT)?;
        let prog: &mut CgroupSkb = ebpf
            .program_mut(programs::INGRESS)
            .ok_or(DatapathError::Missing(programs::INGRESS))?
            .try_into()?;
        prog.load()?;
        Ok(Datapath { ebpf })
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        Ok(HashMap::try_from(self.map(name)?)?)
    }

    /// Sets who a pod address belongs to.
    pub fn set_endpoint_ip(&mut self, ip: IpAddr, ep: Endpoint) -> Result<(), DatapathError> {
        Ok(self.hash(maps::EP_IP)?.insert(IpKey::from(ip), ep, 0)?)
    }

    /// Sets which rule kinds exist for `local`, and default deny.
    pub fn set_selected(&mut self, local: u32, flags: u32) -> Result<(), DatapathError> {
        Ok(self
            .hash(maps::SELECTED)?
            .insert(local, Selected { flags }, 0)?)
    }

    /// Sets one ingress rule.
    pub fn set_rule(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        Ok(self.hash(maps::POLICY)?.insert(key, value, 0)?)
    }

    /// Removes one ingress rule.
    pub fn remove_rule(&mut self, key: &PolicyKey) -> Result<(), DatapathError> {
        Ok(self
            .hash::<PolicyKey, PolicyValue>(maps::POLICY)?
            .remove(key)?)
    }

    /// Records an authentication.
    pub fn set_auth(&mut self, key: AuthKey, value: AuthValue) -> Result<(), DatapathError> {
        Ok(self.hash(maps::AUTH)?.insert(key, value, 0)?)
    }

    /// Sets the global epoch (authentications of other epochs stop counting).
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::EPOCH)?)?;
        Ok(map.set(0, epoch, 0)?)
    }

    /// How many decisions had `reason`, summed over CPUs.
    pub fn counter(&mut self, reason: Reason) -> Result<u64, DatapathError> {
        let map: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(maps::COUNTERS)?)?;
        Ok(map.get(&(reason as u32), 0)?.iter().sum())
    }

    /// Takes the events waiting in the ring buffer.
    pub fn take_events(&mut self) -> Result<Vec<AuthEvent>, DatapathError> {
        let mut ring = RingBuf::try_from(self.map(maps::EVENTS)?)?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.extend(AuthEvent::parse(&item));
        }
        Ok(out)
    }

    /// Runs the ingress program `repeat` times on `packet` (Ethernet header
    /// first) with BPF_PROG_TEST_RUN: its return value (1 pass, 0 drop) and
    /// the kernel's mean time per run.
    pub fn test_ingress(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DatapathError> {
        let prog: &CgroupSkb = self
            .ebpf
            .program(programs::INGRESS)
            .ok_or(DatapathError::Missing(programs::INGRESS))?
            .try_into()?;
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok((result.return_value, result.duration))
    }
}
