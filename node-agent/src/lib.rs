//! The Tessera node agent's library: workload attestation, the identity
//! material of this node's pods, and the SPIFFE Workload API server.
#![forbid(unsafe_code)]

pub mod attestation;
pub mod identities;
pub mod policy;
pub mod svids;
pub mod workload_api;
