//! `FederatedTrustDomain`: a foreign SPIFFE trust domain whose bundle Tessera
//! fetches from its bundle endpoint.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

/// Message of the CEL rule that needs an endpoint SPIFFE ID for https_spiffe.
pub const MSG_SPIFFE_NEEDS_ID: &str = "endpointSPIFFEID is required when type is https_spiffe";
/// Message of the CEL rule that forbids an endpoint SPIFFE ID for https_web.
pub const MSG_WEB_FORBIDS_ID: &str = "endpointSPIFFEID must not be set when type is https_web";
/// Message of the CEL rule that allows caBundle only for https_web.
pub const MSG_CA_BUNDLE_WEB_ONLY: &str =
    "caBundle is only for https_web; https_spiffe endpoints are checked against trustDomainBundle";
/// Message of the CEL rule that keeps the trust domain fixed.
pub const MSG_TD_IMMUTABLE: &str =
    "trustDomain is immutable; create a new FederatedTrustDomain instead";
/// Largest bootstrap bundle accepted, in bytes.
pub const MAX_BUNDLE_LEN: u32 = 256 * 1024;

/// A trust domain Tessera federates with. Cluster-scoped.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "FederatedTrustDomain",
    status = "FederatedTrustDomainStatus",
    shortname = "ftd",
    category = "tessera",
    printcolumn(
        name = "Trust Domain",
        type_ = "string",
        json_path = ".spec.trustDomain"
    ),
    printcolumn(
        name = "Profile",
        type_ = "string",
        json_path = ".spec.bundleEndpointProfile.type"
    ),
    printcolumn(
        name = "Sequence",
        type_ = "integer",
        json_path = ".status.sequenceNumber",
        description = "spiffe_sequence of the bundle in use"
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
pub struct FederatedTrustDomainSpec {
    /// The foreign trust domain's name, for example `b.test`.
    #[schemars(schema_with = "schema::trust_domain")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(MSG_TD_IMMUTABLE))]
    pub trust_domain: String,
    /// Where its SPIFFE bundle endpoint serves the bundle (https only).
    #[serde(rename = "bundleEndpointURL")]
    #[schemars(schema_with = "schema::bundle_endpoint_url")]
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    pub bundle_endpoint_profile: BundleEndpointProfile,
    /// Bootstrap bundle (SPIFFE bundle JSON), needed for https_spiffe until the
    /// first successful fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 262144))]
    pub trust_domain_bundle: Option<String>,
    /// How often to refresh when the bundle gives no refresh hint (30s to 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::refresh_interval")]
    pub refresh_interval: Option<String>,
    /// How long a bundle is trusted without a successful refresh (10s to
    /// 24h; default three refresh intervals, at most 24h). Past it the
    /// bundle is withdrawn until a fetch succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::max_bundle_age")]
    pub max_bundle_age: Option<String>,
}

/// The bundle endpoint profile (SPIFFE Federation specification, section 5).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = kube::core::Rule::new("self.type != 'https_spiffe' || has(self.endpointSPIFFEID)").message(MSG_SPIFFE_NEEDS_ID),
    validation = kube::core::Rule::new("self.type != 'https_web' || !has(self.endpointSPIFFEID)").message(MSG_WEB_FORBIDS_ID),
    validation = kube::core::Rule::new("self.type == 'https_web' || !has(self.caBundle)").message(MSG_CA_BUNDLE_WEB_ONLY)
)]
pub struct BundleEndpointProfile {
    /// `https_web` (Web PKI) or `https_spiffe` (the endpoint presents an SVID).
    #[serde(rename = "type")]
    pub profile_type: BundleEndpointProfileType,
    /// The SPIFFE ID the endpoint must present; only for https_spiffe.
    #[serde(
        rename = "endpointSPIFFEID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "schema::spiffe_id")]
    pub endpoint_spiffe_id: Option<String>,
    /// PEM CA certificates that authenticate an https_web endpoint instead
    /// of the operator's system trust roots (for endpoints with a private
    /// CA). Only for https_web.
    #[serde(rename = "caBundle", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub ca_bundle: Option<String>,
}

/// Bundle endpoint authentication profile.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleEndpointProfileType {
    /// The endpoint has a Web PKI certificate.
    #[serde(rename = "https_web")]
    HttpsWeb,
    /// The endpoint presents an X.509-SVID checked against the trust domain's bundle.
    #[serde(rename = "https_spiffe")]
    HttpsSpiffe,
}

/// Observed state of a FederatedTrustDomain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FederatedTrustDomainStatus {
    /// Standard conditions: `Ready`, with reasons such as `Fresh`, `Stale` or `Error`.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the bundle was last fetched successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// `spiffe_sequence` of the bundle in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<i64>,
    /// Number of keys in the bundle in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_count: Option<i64>,
    /// When the next fetch is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// The last fetch or parse error, cleared on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
