//! The Tessera node agent's library: workload attestation, the identity
//! material of this node's pods, the SPIFFE Workload API server,
//! agent-to-agent handshakes, the auth cache, the policy writer and metrics.
#![forbid(unsafe_code)]

pub mod arenas;
pub mod attestation;
pub mod authcache;
pub mod bench;
pub mod conn_limits;
pub mod dataplane;
pub mod delegated;
pub mod enforcer;
pub mod external;
pub mod follow;
pub mod handshake;
pub mod identities;
pub mod intern;
pub mod metrics;
pub mod netns;
pub mod nodes;
pub mod policy;
pub mod records;
pub mod revocation;
pub mod sandbox;
pub mod svids;
pub mod trust;
pub mod veths;
pub mod view;
pub mod workload_api;
