//! Caps on the connections the agent accepts from the network (its
//! handshake port, the terminator sockets of peers outside the mesh): so
//! many per peer address and so many in all. A connection past either cap is
//! closed at once, so a flood of idle or slow connections costs the agent a
//! bounded number of descriptors and never starves the Workload API or the
//! handshakes of other peers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Handshake connections at once from one address (a peer node's agent
/// authenticating many pairs after a restart stays well below it).
pub const HANDSHAKES_PER_PEER: usize = 64;
/// Handshake connections at once in all.
pub const HANDSHAKES_TOTAL: usize = 1024;
/// Terminated connections at once from one address (they live as long as
/// the workload's connection).
pub const EXTERNAL_PER_PEER: usize = 256;
/// Terminated connections at once in all.
pub const EXTERNAL_TOTAL: usize = 4096;

/// Counts of open connections, in all and per peer address.
#[derive(Debug)]
pub struct ConnLimits {
    per_peer: usize,
    total: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; its slot is freed on drop.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnLimits>,
    peer: IpAddr,
}

/// Which cap a connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its address has as many open as it may.
    #[error("{0} connections from this address are open already")]
    PerPeer(usize),
    /// The agent has as many open as it takes.
    #[error("{0} connections are open already")]
    Total(usize),
}

impl ConnLimits {
    /// Caps of `per_peer` per address and `total` in all.
    pub fn new(per_peer: usize, total: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            per_peer,
            total,
            open: Mutex::default(),
        })
    }

    /// Admits one more connection from `peer`, or says which cap it met.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let peer = peer.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.total {
            return Err(Refused::Total(self.total));
        }
        let from_peer = open.1.entry(peer).or_default();
        if *from_peer >= self.per_peer {
            return Err(Refused::PerPeer(self.per_peer));
        }
        *from_peer += 1;
        open.0 += 1;
        Ok(Admitted {
            limits: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_peer_and_the_whole_have_their_caps() {
        let limits = ConnLimits::new(2, 3);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:198.18.0.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::PerPeer(2));
        let _third = limits.admit(b).unwrap();
        assert_eq!(
            limits.admit("198.18.0.2".parse().unwrap()).unwrap_err(),
            Refused::Total(3),
            "a mapped IPv4 address counts as itself"
        );
        drop(first);
        assert_eq!(limits.open(), 2);
        assert!(limits.admit(a).is_ok());
    }
}
