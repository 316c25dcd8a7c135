//! `PodIdentity`: the identity the operator assigned to one pod, the only
//! place the signer, the node agents, SPIRE registration and the policy
//! compiler take it from.
//!
//! Why an object of its own rather than pod annotations: whoever may create
//! or patch a pod may write its annotations, so any identity read from them
//! is the pod author's to choose. A PodIdentity is cluster-scoped and only
//! the operator's service account may write PodIdentities (the install grants
//! nobody else any verb on them, and agents only get, list and watch), so
//! RBAC alone keeps pod authors out; no admission policy has to be installed,
//! kept and trusted. The object is named by the pod's UID: a pod deleted and
//! created again under the same name is another pod with another record.
//!
//! The operator deletes the record when the pod is deleted, starts
//! terminating, or its identity cannot be assigned (a WorkloadIdentity
//! template that fails for it): then the pod has no identity anywhere.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::schema;

/// The field agents select their node's records by (a CRD selectable field).
pub const NODE_NAME_FIELD: &str = "spec.nodeName";

/// One pod's identity, as the operator assigned it. Named by the pod's UID.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "PodIdentity",
    shortname = "podid",
    category = "tessera-internal",
    selectable = ".spec.nodeName",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podName"),
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".spec.spiffeID"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName")
)]
#[serde(rename_all = "camelCase")]
pub struct PodIdentitySpec {
    /// The pod's UID (also the object's name).
    #[serde(rename = "podUID")]
    #[schemars(length(max = 128))]
    pub pod_uid: String,
    /// The pod's namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The pod's name.
    #[schemars(length(max = 253))]
    pub pod_name: String,
    /// The node the pod was scheduled on when the identity was assigned.
    #[schemars(length(max = 253))]
    pub node_name: String,
    /// The pod's SPIFFE ID.
    #[serde(rename = "spiffeID")]
    #[schemars(schema_with = "schema::spiffe_id")]
    pub spiffe_id: String,
    /// The numeric identity of that SPIFFE ID.
    #[schemars(range(min = 256, max = 16777215))]
    pub id: u32,
    /// The generation of that numeric identity.
    #[schemars(range(min = 1))]
    pub generation: i64,
    /// The WorkloadIdentity that chose the SPIFFE ID; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub source: Option<String>,
    /// Trust domains whose bundles the pod receives (its WorkloadIdentity's
    /// `federatesWith`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::trust_domain_set")]
    pub federates_with: Vec<String>,
}

impl PodIdentity {
    /// The record's spec when it is well formed for the pod `uid`: named by
    /// that UID and saying so. Consumers take nothing from a record that is
    /// not (only the operator writes these, so this guards against bugs and
    /// hand edits, not pod authors).
    pub fn for_pod(&self, uid: &str) -> Option<&PodIdentitySpec> {
        (self.metadata.name.as_deref() == Some(uid) && self.spec.pod_uid == uid)
            .then_some(&self.spec)
    }

    /// The spec when the record is well formed (named by the UID it carries).
    pub fn checked(&self) -> Option<&PodIdentitySpec> {
        self.for_pod(&self.spec.pod_uid)
    }
}
