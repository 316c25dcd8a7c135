//! The agents authenticating workload pairs with each other, and the loop
//! that keeps this node's data path in line with the cluster: [`enforcer`]
//! follows pods, identities and policy into the maps and decides which
//! pairs to authenticate ahead of traffic; [`handshake`] is the
//! agent-to-agent mutual TLS that authenticates one pair, run over
//! [`channel`]s (one long-lived connection per peer agent); [`external`]
//! holds the agent's sockets in pods' network namespaces and terminates TLS
//! for peers outside the mesh; [`waypoint`] checks each HTTP request to a
//! port with HTTP rules; [`limits`] caps the connections accepted from the
//! network.

pub mod channel;
pub mod enforcer;
pub mod external;
pub mod handshake;
pub mod limits;
pub mod waypoint;

use std::net::SocketAddr;

use tessera_bpf::datapath::DatapathError;

use crate::datapath::DataPlaneError;
pub use enforcer::{EnforcerConfig, Handle};

/// Why the data path could not start or keep up.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// Loading, pinning or attaching the eBPF programs failed.
    #[error("eBPF data path: {0}")]
    Datapath(#[from] DatapathError),
    /// Opening the maps or the auth cache failed.
    #[error(transparent)]
    Open(#[from] DataPlaneError),
    /// The handshake port could not be opened.
    #[error("cannot listen for handshakes on {addr}: {source}; is another agent running there?")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The housekeeping thread could not be started.
    #[error(
        "cannot start the data path's housekeeping thread: {0}; check the agent's thread and memory limits"
    )]
    Thread(std::io::Error),
}
