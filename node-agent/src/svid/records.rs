//! This node's pods as their PodIdentity records describe them: the only
//! source of a local pod's SPIFFE ID and federated trust domains for the
//! SVID followers ([`crate::svid::signer`], [`crate::svid::spire`]). Only the operator
//! writes records, so nothing a pod author writes on the pod decides them.

use kube::runtime::watcher;
use tessera_api::crd::PodIdentity;
use tessera_api::crd::pod_identity::NODE_NAME_FIELD;

/// A local pod's identity, from its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    /// The pod's UID.
    pub uid: PodUid,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Trust domain IDs (`spiffe://b.test`) whose bundles it receives.
    pub federates_with: Vec<String>,
}

impl LocalPod {
    /// The watch of the records of `node`'s pods (a field selector on the
    /// CRD's selectable `spec.nodeName`).
    pub fn watch_config(node: &str) -> watcher::Config {
        watcher::Config::default().fields(&format!("{NODE_NAME_FIELD}={node}"))
    }

    /// The pod a well-formed record of `node` describes; None for any other.
    pub fn of(record: &PodIdentity, node: &str) -> Option<LocalPod> {
        let spec = record.checked().filter(|s| s.node_name == node)?;
        Some(LocalPod {
            uid: PodUid::parse(&spec.pod_uid)?,
            namespace: spec.namespace.clone(),
            name: spec.pod_name.clone(),
            spiffe_id: spec.spiffe_id.clone(),
            federates_with: spec
                .federates_with
                .iter()
                .filter_map(|td| td.parse::<tessera_api::spiffe::TrustDomain>().ok())
                .map(|td| td.id().to_string())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn record(name: &str, uid: &str, node: &str) -> PodIdentity {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "PodIdentity",
            "metadata": {"name": name},
            "spec": {"podUID": uid, "namespace": "shop", "podName": "web-1", "nodeName": node,
                "spiffeID": "spiffe://td/web", "id": 300, "generation": 2,
                "federatesWith": ["b.test", "Not Valid"]}
        }))
        .unwrap()
    }

    #[test]
    fn only_well_formed_records_of_this_node_count() {
        let uid = "0f0e0d0c-0b0a-0908-0706-050403020100";
        let pod = LocalPod::of(&record(uid, uid, "node-a"), "node-a").unwrap();
        assert_eq!(pod.spiffe_id, "spiffe://td/web");
        assert_eq!(pod.federates_with, ["spiffe://b.test"]);
        assert_eq!(LocalPod::of(&record(uid, uid, "node-b"), "node-a"), None);
        let other = "1f0e0d0c-0b0a-0908-0706-050403020100";
        assert_eq!(LocalPod::of(&record(other, uid, "node-a"), "node-a"), None);
    }
}

/// A pod UID, normalized to the lower-case 8-4-4-4-12 form the API server uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Parses a UID written with `-` (cgroupfs driver) or `_` (systemd driver).
    pub fn parse(text: &str) -> Option<PodUid> {
        let uid: String = text
            .chars()
            .map(|c| {
                if c == '_' {
                    '-'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        let groups: Vec<&str> = uid.split('-').collect();
        let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
        shape_ok.then_some(PodUid(uid))
    }

    /// The UID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
