//! Federation with other trust domains: [`controller`] follows
//! FederatedTrustDomain objects, [`fetch`]es each one's bundle from its
//! endpoint (https_web or https_spiffe) and publishes what it may use;
//! [`endpoint`] serves this trust domain's own bundle to them.

pub mod controller;
pub mod endpoint;
pub mod fetch;

use std::sync::Arc;
/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The API server refused or failed a request.
    #[error(
        "API server error while federating {what}: {source}; check that the operator may update federatedtrustdomains and their status, and get, create and patch configmaps in its namespace"
    )]
    Api {
        /// What was being done.
        what: String,
        /// The error.
        source: Arc<kube::Error>,
    },
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}
