//! What the agent reads of Node objects: each node's pod address ranges
//! (`spec.podCIDRs`, see [`crate::datapath::sandbox`]) and its addresses
//! (`status.addresses`, where its agent listens).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

/// Why a Node object's field could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// A range is not a CIDR.
    #[error("{0:?} is not a CIDR (address/prefix length)")]
    Cidr(String),
}

/// An address range, such as a node's pod CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = NodesError;

    fn from_str(text: &str) -> Result<Cidr, NodesError> {
        let bad = || NodesError::Cidr(text.to_owned());
        let (net, prefix) = text.split_once('/').ok_or_else(bad)?;
        let net: IpAddr = net.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in the range (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (
                u128::from(u32::from(n)) << 96,
                u128::from(u32::from(i)) << 96,
                32,
            ),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        debug_assert!(self.prefix <= bits);
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        a & mask == b & mask
    }
}

/// What a Node object says that the agent uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// Its pod ranges (those of `spec.podCIDRs` that are CIDRs).
    pub ranges: Arc<[Cidr]>,
    /// Its internal and external addresses (`status.addresses`).
    pub addresses: Arc<[IpAddr]>,
}

/// The facts of a Node object.
pub fn node_facts(node: &Node) -> Option<NodeFacts> {
    let spec = node.spec.as_ref();
    let mut ranges: Vec<Cidr> = Vec::new();
    for range in spec
        .into_iter()
        .flat_map(|s| s.pod_cidrs.iter().flatten().chain(s.pod_cidr.iter()))
        .filter_map(|t| t.parse::<Cidr>().ok())
    {
        if !ranges.contains(&range) {
            ranges.push(range);
        }
    }
    let mut addresses: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    Some(NodeFacts {
        ranges: ranges.into(),
        addresses: addresses.into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_hold_what_they_should_and_nothing_else() {
        assert!(cidr("198.18.1.0/24").contains(ip("198.18.1.200")));
        assert!(!cidr("198.18.1.0/24").contains(ip("198.18.2.1")));
        assert!(!cidr("198.18.1.0/24").contains(ip("::ffff:198.18.1.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(cidr("fd00::1:0/112").contains(ip("fd00::1:10")));
        assert!(!cidr("fd00::1:0/112").contains(ip("fd00::2:10")));
        assert!(cidr("fd00::1/128").contains(ip("fd00::1")));
        for bad in [
            "198.18.1.0",
            "198.18.1.0/33",
            "fd00::/129",
            "x/8",
            "1.2.3.4/-1",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_gives_its_ranges_and_addresses_and_nothing_unreadable() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"podCIDR": "198.18.1.0/24", "podCIDRs": ["198.18.1.0/24", "fd00::1:0/112", "junk"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "198.18.0.1"},
                {"type": "Hostname", "address": "n"},
                {"type": "ExternalIP", "address": "not an address"}
            ]}
        }))
        .unwrap();
        let facts = node_facts(&node).unwrap();
        assert!(facts.ranges.iter().any(|r| r.contains(ip("198.18.1.7"))));
        assert!(facts.ranges.iter().any(|r| r.contains(ip("fd00::1:7"))));
        assert_eq!(&*facts.addresses, &[ip("198.18.0.1")]);
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(node_facts(&bare), Some(NodeFacts::default()));
    }
}
