//! Internal resources for numeric identities: `NumericIdentity` records which
//! number and generation a SPIFFE ID holds, `IdentityCounter` hands out
//! generations (and the next number) with optimistic concurrency. Only the
//! operator writes them; agents and the data path read them.
//!
//! The invariant: an (id, generation) pair is issued at most once, ever. The
//! counter's generation only grows, every allocation takes a fresh one, and
//! the counter lives in the API server, so neither a restart nor a second
//! operator can hand out a pair again.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::schema;

/// Smallest numeric identity handed to workloads; lower numbers are reserved
/// (for example for "world" or "host" on the data path).
pub const MIN_ID: u32 = 256;
/// Largest numeric identity (24 bits, so it fits the data path's map keys).
pub const MAX_ID: u32 = (1 << 24) - 1;
/// Message of the rule that makes the API server refuse a counter update that
/// does not raise `nextGeneration`.
pub const MSG_GENERATION_GROWS: &str = "nextGeneration only grows";
/// Message of the rule that makes a NumericIdentity immutable.
pub const MSG_IDENTITY_IMMUTABLE: &str =
    "a NumericIdentity never changes; delete it and allocate anew";
/// Name of the one `IdentityCounter` object.
pub const COUNTER_NAME: &str = "default";

/// The NumericIdentity (and IdentityPolicy) object name for a SPIFFE ID:
/// `sid-` and the first 20 bytes of its SHA-256, in hex (a valid DNS label,
/// fixed length).
pub fn numeric_identity_name(id: &crate::spiffe::SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    let mut name = String::with_capacity(44);
    name.push_str("sid-");
    for byte in &digest.as_ref()[..20] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

/// The numeric identity and generation assigned to one SPIFFE ID. The object's
/// name is derived from the SPIFFE ID ([`numeric_identity_name`]), so two
/// writers can never create two objects for one ID.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "NumericIdentity",
    shortname = "nid",
    category = "tessera-internal",
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".spec.spiffeID"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(MSG_IDENTITY_IMMUTABLE))]
pub struct NumericIdentitySpec {
    /// The SPIFFE ID this number stands for.
    #[serde(rename = "spiffeID")]
    #[schemars(schema_with = "schema::spiffe_id")]
    pub spiffe_id: String,
    /// The numeric identity.
    #[schemars(range(min = 256, max = 16777215))]
    pub id: u32,
    /// The generation; no other allocation ever had it.
    #[schemars(range(min = 1))]
    pub generation: i64,
}

/// The allocation counter. There is one, named `default`.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "IdentityCounter",
    category = "tessera-internal",
    printcolumn(name = "Next ID", type_ = "integer", json_path = ".spec.nextID"),
    printcolumn(
        name = "Next Generation",
        type_ = "integer",
        json_path = ".spec.nextGeneration"
    )
)]
#[x_kube(validation = kube::core::Rule::new("self.nextGeneration > oldSelf.nextGeneration").message(MSG_GENERATION_GROWS))]
#[serde(rename_all = "camelCase")]
pub struct IdentityCounterSpec {
    /// The number the next allocation tries first.
    #[serde(rename = "nextID")]
    #[schemars(range(min = 256, max = 16777215))]
    pub next_id: u32,
    /// The generation the next allocation takes.
    #[schemars(range(min = 1))]
    pub next_generation: i64,
}
