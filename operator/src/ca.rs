//! The trust domain's certificate authority and what it signs:
//! [`authority`] keeps the CA roots (Secret `tessera-ca`), rotates them with
//! overlap and publishes the trust bundle; [`signer`] is the signing service
//! node agents get workload SVIDs from.

pub mod authority;
pub mod signer;

pub use authority::{CaConfig, TrustDomainCa};
use std::sync::Arc;

/// Why the CA could not be loaded, created, rotated or published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    /// The API server refused or failed a request.
    #[error(
        "API server error while managing the CA: {0}; check that the operator may get, create and update secrets and configmaps in its namespace"
    )]
    Api(#[source] Arc<kube::Error>),
    /// The Secret exists but does not hold roots this operator can read.
    #[error(
        "Secret {namespace}/{name} exists but is unreadable ({reason}); it is left untouched: restore it from backup, or delete it to create a new CA (every workload will need new SVIDs)"
    )]
    Unreadable {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Generating or parsing a certificate failed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// Every root has expired.
    #[error("every root in the CA Secret has expired; delete the Secret to create a new CA")]
    Expired,
    /// Two writers kept changing the Secret.
    #[error("the CA Secret kept changing under concurrent writers; retry")]
    Contention,
}
