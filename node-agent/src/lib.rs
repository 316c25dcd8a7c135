//! The Tessera node agent's library. Subsystems, each a folder with a root
//! module that declares its error type:
//!
//! - [`svid`]: this node's pods' SVIDs and trust bundles (pod -> PodIdentity
//!   record -> signing service or SPIRE -> identity store);
//! - [`workload_api`]: the SPIFFE Workload API that hands them to workloads;
//! - [`datapath`]: the eBPF maps, the auth cache behind them, and what they
//!   should hold;
//! - [`mesh`]: agent-to-agent handshakes and the loop that drives the data
//!   path from the cluster;
//! - [`app`]: `tessera-agent run`, wiring them together.
//!
//! Below them: [`netns`] (entering pods' network namespaces), [`follow`]
//! (watch-fed maps), [`intern`], [`clock`], [`sync`], [`arenas`]; beside
//! them, [`metrics`].
#![forbid(unsafe_code)]

pub mod app;

pub mod arenas;
#[cfg(feature = "bench")]
pub mod bench;
pub mod clock;
pub mod datapath;
pub mod follow;
pub mod intern;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod svid;
pub mod sync;
pub mod workload_api;
