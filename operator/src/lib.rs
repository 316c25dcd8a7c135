//! The Tessera operator's library. Subsystems, each a folder with a root
//! module that declares its error type:
//!
//! - [`identity`]: each pod's SPIFFE ID and numeric identity, recorded in
//!   its PodIdentity;
//! - [`policy`]: AuthPolicy compiled onto SPIFFE IDs (IdentityPolicy);
//! - [`ca`]: the trust domain's CA, its bundle, and the signing service;
//! - [`federation`]: other trust domains' bundles, and this one's endpoint;
//! - [`deploy`]: the agents' DaemonSet and the leader's EndpointSlices;
//! - [`spire_entries`]: SPIRE registration entries (SPIRE mode);
//! - [`app`]: `tessera-operator run`, wiring them together under a leader
//!   lease.
//!
//! Below them: [`selector`] (label selectors); beside them, [`metrics`].
#![forbid(unsafe_code)]

pub mod app;
#[cfg(feature = "bench")]
pub mod bench;
pub mod ca;
pub mod commands;
pub mod deploy;
pub mod federation;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod selector;
pub mod spire_entries;
