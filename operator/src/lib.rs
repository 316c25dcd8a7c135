//! The Tessera operator's library: the pieces the `tessera-operator` binary
//! runs, each testable on its own against a real API server.
#![forbid(unsafe_code)]

pub mod agent_daemonset;
pub mod allocator;
pub mod assign;
pub mod bundle_endpoint;
pub mod ca;
pub mod federation;
pub mod fetch;
pub mod identity;
pub mod leader_endpoints;
pub mod metrics;
pub mod policy;
pub mod signer;
pub mod spire_entries;
pub mod wid_status;
