//! The SPIFFE Workload API on a Unix socket: [`server`] answers calls with
//! the material of the caller's pod, which [`attestation`] finds from the
//! kernel's word about the calling process, never from what it says.

pub mod attestation;
pub mod client;
pub mod server;

use std::path::PathBuf;

pub use server::{ISSUANCE_WAIT, WorkloadApi, serve};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The kernel cannot pin connections to processes.
    #[error("refusing to serve the Workload API: {0}")]
    Kernel(#[from] attestation::AttestationError),
    /// Binding or preparing the socket failed.
    #[error("cannot listen on {path}: {source}; check that the directory exists and is writable")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}
