//! AuthPolicy compiled onto SPIFFE IDs: [`compiler`] turns every policy
//! into rules naming peers by SPIFFE ID and merges them per ID into one
//! IdentityPolicy; [`preview`] tells the identity controller when the rules
//! a new pod's identity needs are written; [`controller`] follows pods,
//! namespaces and policies, recompiles and writes IdentityPolicies and
//! AuthPolicy status.

pub mod compiler;
pub mod controller;
pub mod preview;

pub use compiler::CompileError;
pub use controller::run;
pub use preview::{PendingPod, Preview};
use std::sync::Arc;

/// Why the policy controller stopped or failed to write.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Writing an IdentityPolicy or an AuthPolicy status failed.
    #[error("cannot write {what}: {source}; check the operator's RBAC for tessera.dev resources")]
    Write {
        /// What was being written.
        what: String,
        /// The API error.
        source: Arc<kube::Error>,
    },
}
