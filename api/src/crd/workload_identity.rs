//! `WorkloadIdentity`: which pods get which SPIFFE ID.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::schema;
use crate::spiffe::{SpiffeIdError, TrustDomain};
use crate::template::{Template, TemplateError};

/// Assigns SPIFFE IDs to the pods it selects. Cluster-scoped, because one
/// identity scheme usually spans namespaces. When no WorkloadIdentity selects a
/// pod, it gets `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "WorkloadIdentity",
    status = "WorkloadIdentityStatus",
    shortname = "wid",
    category = "tessera",
    printcolumn(
        name = "Template",
        type_ = "string",
        json_path = ".spec.spiffeIDTemplate",
        description = "SPIFFE ID template"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.podsSelected",
        description = "pods this object selects"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentitySpec {
    /// SPIFFE ID template, for example
    /// `spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}`. Placeholders:
    /// trustDomain, namespace, serviceAccount, podName, nodeName, podLabel:<key>.
    #[serde(rename = "spiffeIDTemplate")]
    #[schemars(schema_with = "schema::spiffe_id_template")]
    pub spiffe_id_template: String,

    /// Pods to select, by label; absent selects every pod in the selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Namespaces to select, by label; absent selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Lifetime of X.509-SVIDs (10m to 720h); absent means the operator default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::svid_ttl")]
    pub ttl: Option<String>,

    /// Lifetime of JWT-SVIDs (1m to 24h); absent means the operator default.
    #[serde(rename = "jwtTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::jwt_ttl")]
    pub jwt_ttl: Option<String>,

    /// DNS SAN templates added to X.509-SVIDs, with the same placeholders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::dns_name_templates")]
    pub dns_name_templates: Vec<String>,

    /// Trust domains whose bundles the selected workloads receive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::trust_domain_set")]
    pub federates_with: Vec<String>,

    /// Applies only to pods that no non-fallback WorkloadIdentity selects.
    #[serde(default)]
    pub fallback: bool,

    /// Free-form hint handed to workloads with their SVID (for example "internal").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub hint: Option<String>,
}

/// Observed state of a WorkloadIdentity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityStatus {
    /// Standard conditions; `Ready` says whether the template renders for the selected pods.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods this object selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_selected: Option<i64>,
    /// How many distinct SPIFFE IDs it rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities_rendered: Option<i64>,
    /// Pods that another WorkloadIdentity also selects, and how that was resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<IdentityConflict>,
}

/// One pod selected by more than one WorkloadIdentity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityConflict {
    /// The pod, as `namespace/name`.
    pub pod: String,
    /// The WorkloadIdentity whose template was used.
    pub chosen: String,
    /// The other WorkloadIdentity objects that also selected the pod.
    #[serde(default)]
    pub others: Vec<String>,
}

/// Why a WorkloadIdentity spec cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadIdentitySpecError {
    /// The SPIFFE ID template is malformed.
    #[error("spec.spiffeIDTemplate: {0}")]
    Template(#[from] TemplateError),
    /// An entry of `federatesWith` is not a trust domain name.
    #[error("spec.federatesWith[{index}]: {source}")]
    FederatesWith {
        /// Position in the list.
        index: usize,
        /// Why it is not a trust domain.
        source: SpiffeIdError,
    },
}

impl WorkloadIdentitySpec {
    /// The parsed SPIFFE ID template.
    pub fn template(&self) -> Result<Template, WorkloadIdentitySpecError> {
        Ok(self.spiffe_id_template.parse()?)
    }

    /// The parsed `federatesWith` trust domains.
    pub fn federates_with(&self) -> Result<Vec<TrustDomain>, WorkloadIdentitySpecError> {
        self.federates_with
            .iter()
            .enumerate()
            .map(|(index, td)| {
                td.parse()
                    .map_err(|source| WorkloadIdentitySpecError::FederatesWith { index, source })
            })
            .collect()
    }
}
