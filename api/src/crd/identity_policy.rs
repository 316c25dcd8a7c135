//! `IdentityPolicy`: the ingress rules of one SPIFFE ID, compiled by the
//! operator from every AuthPolicy that selects a pod with that ID. Node agents
//! read them and write the data path's policy map; only the operator writes
//! them.
//!
//! Rules name peers by SPIFFE ID (exact IDs, prefixes, trust domains), never
//! by numeric identity: each agent maps IDs to its own current view of the
//! numbers and generations, so a number freed and handed to another SPIFFE ID
//! can never carry an old rule to a new workload. Label selectors are resolved
//! by the operator into the exact SPIFFE IDs of the pods they pick.

use std::collections::BTreeSet;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::auth_policy::{Authentication, ExternalPeers, HttpRule, PolicyAction, PortRange};

/// The compiled ingress policy of one SPIFFE ID. The object's name is the
/// NumericIdentity name of that ID (`sid-` and a digest).
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "IdentityPolicy",
    shortname = "idp",
    category = "tessera-internal",
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".spec.spiffeID"),
    printcolumn(
        name = "Default Deny",
        type_ = "boolean",
        json_path = ".spec.defaultDeny"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPolicySpec {
    /// The SPIFFE ID whose inbound traffic these rules govern.
    #[serde(rename = "spiffeID")]
    pub spiffe_id: String,
    /// An Allow policy selects this ID: traffic no rule allows is denied.
    #[serde(default)]
    pub default_deny: bool,
    /// The rules, from every AuthPolicy selecting this ID.
    #[serde(default)]
    pub rules: Vec<CompiledRule>,
    /// The AuthPolicies compiled into this object, as `namespace/name`.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// One compiled rule. Empty `from` matches any peer, empty `ports` any port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRule {
    /// What matching traffic gets.
    pub action: PolicyAction,
    /// Peers; a peer matching any entry matches the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<CompiledPeer>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Whether mutual authentication is required (Allow rules only).
    #[serde(default)]
    pub authentication: Authentication,
    /// Whether HTTP rules apply (Allow rules only): node agents steer every
    /// connection to the rule's ports through the waypoint, which checks
    /// each request.
    #[serde(default)]
    pub l7: bool,
    /// The rule's HTTP conditions, as the AuthPolicy gives them (Allow and
    /// Deny rules): what the waypoint checks each request against. Empty:
    /// the rule applies to whole connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    /// Whether the node agent terminates the TLS of peers outside the mesh
    /// on these ports (Allow rules only).
    #[serde(default, skip_serializing_if = "is_deny")]
    pub external_peers: ExternalPeers,
}

impl CompiledRule {
    /// The TCP ports the rule names (none when it names no port, meaning
    /// every port; ports beyond 65535 or below 1 left out).
    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .filter(|r| r.protocol == crate::crd::auth_policy::Protocol::Tcp)
            .flat_map(|r| {
                let last = r.end_port.unwrap_or(r.port).min(i32::from(u16::MAX));
                (r.port.max(1)..=last).filter_map(|p| u16::try_from(p).ok())
            })
    }
}

impl IdentityPolicySpec {
    /// The TCP ports named by the rules `which` selects, lowest first.
    pub fn tcp_ports_of(&self, which: impl Fn(&CompiledRule) -> bool) -> BTreeSet<u16> {
        self.rules
            .iter()
            .filter(|r| which(r))
            .flat_map(CompiledRule::tcp_ports)
            .collect()
    }

    /// The TCP ports with HTTP rules (of Allow or Deny rules): every
    /// connection to them goes through the waypoint.
    pub fn http_ports(&self) -> BTreeSet<u16> {
        self.tcp_ports_of(|r| !r.http.is_empty())
    }
}

fn is_deny(e: &ExternalPeers) -> bool {
    *e == ExternalPeers::Deny
}

/// Peer identities: a peer matches when it satisfies every field that is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPeer {
    /// Exactly these SPIFFE IDs (absent: not constrained; empty: nobody).
    #[serde(rename = "spiffeIDs", default, skip_serializing_if = "Option::is_none")]
    pub spiffe_ids: Option<Vec<String>>,
    /// SPIFFE ID prefixes, matched segment by segment.
    #[serde(
        rename = "spiffeIDPrefixes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub spiffe_id_prefixes: Vec<String>,
    /// Trust domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
}

impl CompiledPeer {
    /// True when `id` satisfies every constraint of this peer.
    pub fn matches(&self, id: &crate::spiffe::SpiffeId) -> bool {
        let exact = self
            .spiffe_ids
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|x| x == id.as_str()));
        let prefix = self.spiffe_id_prefixes.is_empty()
            || self
                .spiffe_id_prefixes
                .iter()
                .any(|p| prefix_matches(p, id.as_str()));
        let td = self.trust_domains.is_empty()
            || self
                .trust_domains
                .iter()
                .any(|t| id.trust_domain().as_str() == t);
        exact && prefix && td
    }
}

/// True when `prefix` is `id` or a whole-segment prefix of it
/// (`spiffe://td/ns/a` matches `spiffe://td/ns/a/sa/b`, not `spiffe://td/ns/ab`).
pub fn prefix_matches(prefix: &str, id: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match id.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::SpiffeId;
    use test_case::test_case;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test_case("spiffe://td/ns/a", "spiffe://td/ns/a/sa/b", true; "segment prefix")]
    #[test_case("spiffe://td/ns/a", "spiffe://td/ns/a", true; "equal")]
    #[test_case("spiffe://td/ns/a/", "spiffe://td/ns/a/sa/b", true; "trailing slash")]
    #[test_case("spiffe://td/ns/a", "spiffe://td/ns/ab", false; "not at a segment boundary")]
    #[test_case("spiffe://td", "spiffe://td/x", true; "trust domain root")]
    #[test_case("spiffe://td", "spiffe://tdx/x", false; "longer trust domain")]
    fn prefixes(prefix: &str, candidate: &str, expected: bool) {
        assert_eq!(prefix_matches(prefix, candidate), expected);
    }

    #[test]
    fn a_peer_needs_every_constraint() {
        let peer = CompiledPeer {
            spiffe_ids: Some(vec!["spiffe://a.test/ns/x/sa/y".into()]),
            spiffe_id_prefixes: vec!["spiffe://a.test/ns/x".into()],
            trust_domains: vec!["a.test".into()],
        };
        assert!(peer.matches(&id("spiffe://a.test/ns/x/sa/y")));
        assert!(!peer.matches(&id("spiffe://a.test/ns/x/sa/z")));
        let nobody = CompiledPeer {
            spiffe_ids: Some(vec![]),
            ..CompiledPeer::default()
        };
        assert!(!nobody.matches(&id("spiffe://a.test/ns/x/sa/y")));
        let td_only = CompiledPeer {
            trust_domains: vec!["b.test".into()],
            ..CompiledPeer::default()
        };
        assert!(td_only.matches(&id("spiffe://b.test/anything")));
        assert!(!td_only.matches(&id("spiffe://a.test/anything")));
    }

    #[test]
    fn absent_and_empty_id_lists_serialize_apart() {
        let any = serde_json::to_value(CompiledPeer::default()).unwrap();
        assert_eq!(any, serde_json::json!({}));
        let nobody = serde_json::to_value(CompiledPeer {
            spiffe_ids: Some(vec![]),
            ..CompiledPeer::default()
        })
        .unwrap();
        assert_eq!(nobody, serde_json::json!({"spiffeIDs": []}));
    }
}
