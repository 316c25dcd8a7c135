//! Tessera's API: the CRD types, SPIFFE ID and trust domain types, and templates.
#![forbid(unsafe_code)]

#[cfg(feature = "bundle")]
pub mod bundle;
#[cfg(feature = "crd")]
pub mod client;
#[cfg(feature = "crd")]
pub mod crd;
pub mod duration;
#[cfg(feature = "crd")]
pub mod generated;
#[cfg(feature = "crd")]
pub mod install;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod names;
#[cfg(feature = "probes")]
pub mod probes;
#[cfg(feature = "grpc")]
pub mod signer_api;
pub mod spiffe;
#[cfg(feature = "grpc")]
pub mod spire_api;
#[cfg(feature = "svid")]
pub mod svid;
pub mod template;
#[cfg(feature = "grpc")]
pub mod workload_api;
