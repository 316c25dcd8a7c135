//! The host side of local pods' veths: which interfaces `ts_from_pod`
//! checks, the addresses each may send from, and the program's attachment
//! (TCX, pinned under `links/veth_<ifindex>` when maps are pinned, so it
//! outlives the agent like the cgroup links).

use std::collections::BTreeSet;
use std::net::IpAddr;

use aya::programs::links::FdLink;
use aya::programs::tc::{SchedClassifier, TcAttachType};

use super::{Datapath, DatapathError, path_err};
use crate::abi::VethKey;
use crate::{maps, programs};

impl Datapath {
    /// Lets the pod behind host-side interface `ifindex` send only from
    /// `ips` (addresses not in `ips` are dropped from its list first).
    pub fn set_veth(&mut self, ifindex: u32, ips: &[IpAddr]) -> Result<(), DatapathError> {
        let wanted: BTreeSet<VethKey> = ips.iter().map(|ip| VethKey::new(ifindex, *ip)).collect();
        let mut owned = self.hash::<VethKey, u32>(maps::VETH_IPS)?;
        let stale: Vec<VethKey> = owned
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex && !wanted.contains(k))
            .collect();
        for key in &wanted {
            owned.insert(key, 0, 0)?;
        }
        for key in &stale {
            super::remove_missing_ok(owned.remove(key))?;
        }
        self.hash::<u32, u32>(maps::VETHS)?.insert(ifindex, 0, 0)?;
        Ok(())
    }

    /// Stops checking interface `ifindex` (its pod is gone) and detaches
    /// the program from it.
    pub fn remove_veth(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        super::remove_missing_ok(self.hash::<u32, u32>(maps::VETHS)?.remove(&ifindex))?;
        let mut owned = self.hash::<VethKey, u32>(maps::VETH_IPS)?;
        let keys: Vec<VethKey> = owned
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for key in &keys {
            super::remove_missing_ok(owned.remove(key))?;
        }
        self.veth_links.remove(&ifindex);
        if let Some(dir) = &self.pin_dir {
            let pin = dir.join("links").join(format!("veth_{ifindex}"));
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(path_err("cannot remove pinned link", &pin)(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The interfaces checked now (those a previous agent left included).
    pub fn veths(&mut self) -> Result<Vec<u32>, DatapathError> {
        Ok(self
            .hash::<u32, u32>(maps::VETHS)?
            .keys()
            .filter_map(Result::ok)
            .collect())
    }

    /// The addresses each checked interface may send from.
    pub fn veth_ips(&mut self) -> Result<Vec<VethKey>, DatapathError> {
        Ok(self
            .hash::<VethKey, u32>(maps::VETH_IPS)?
            .keys()
            .filter_map(Result::ok)
            .collect())
    }

    /// Attaches `ts_from_pod` at the ingress of interface `name` (index
    /// `ifindex`): what its pod sends is checked from now on. With pinned
    /// maps the link is pinned too, replacing (so detaching) a previous
    /// agent's only once this one is attached.
    pub fn attach_veth(&mut self, name: &str, ifindex: u32) -> Result<(), DatapathError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(programs::FROM_POD)
            .ok_or(DatapathError::Missing(programs::FROM_POD))?
            .try_into()?;
        let id = prog.attach(name, TcAttachType::Ingress)?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        let Some(dir) = self.pin_dir.as_ref().map(|d| d.join("links")) else {
            self.veth_links.insert(ifindex, link);
            return Ok(());
        };
        std::fs::create_dir_all(&dir).map_err(path_err("cannot create", &dir))?;
        let fresh = dir.join(format!("veth_{ifindex}_new"));
        let _ = std::fs::remove_file(&fresh);
        link.pin(&fresh).map_err(|e| DatapathError::Path {
            what: "cannot pin link",
            path: fresh.clone(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let path = dir.join(format!("veth_{ifindex}"));
        std::fs::rename(&fresh, &path).map_err(path_err("cannot replace pinned link", &path))
    }
}
