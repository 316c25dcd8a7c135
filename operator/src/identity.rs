//! Who each pod is: [`assign`] resolves a pod's SPIFFE ID from the
//! WorkloadIdentity objects that select it, [`allocator`] gives each SPIFFE
//! ID a numeric identity with a generation, [`controller`] writes both to
//! the pod's PodIdentity record (only after the rules naming that ID, see
//! [`crate::policy`]) and collects what no pod uses any more, and
//! [`status`] reports each WorkloadIdentity's outcome.

pub mod allocator;
pub mod assign;
pub mod controller;
pub mod status;

use std::sync::Arc;

use kube::runtime::watcher;

use allocator::AllocatorError;
pub use controller::{Context, run};

/// Why one pod could not be reconciled (it is retried).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// Allocation failed.
    #[error(transparent)]
    Allocator(#[from] AllocatorError),
    /// Writing or deleting the pod's PodIdentity failed.
    #[error(
        "cannot write the PodIdentity of pod {pod}: {source}; check that the operator may create, patch and delete podidentities"
    )]
    Record {
        /// `namespace/name`.
        pod: String,
        /// The API error.
        source: Arc<kube::Error>,
    },
    /// Writing a WorkloadIdentity's status failed.
    #[error(
        "cannot update status of WorkloadIdentity {name}: {source}; check that the operator may patch workloadidentities/status"
    )]
    Status {
        /// The WorkloadIdentity.
        name: String,
        /// The API error.
        source: Arc<kube::Error>,
    },
    /// A watch failed for good.
    #[error("watch on {what} failed: {source}")]
    Watch {
        /// What was watched.
        what: &'static str,
        /// The watcher's error.
        source: Arc<watcher::Error>,
    },
}
