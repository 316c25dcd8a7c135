//! The SVIDs of this node's pods, from a pod's PodIdentity record to the
//! material the Workload API serves: [`records`] follows the records of the
//! pods scheduled here (the only source of a local pod's SPIFFE ID),
//! [`signer`] gets their X.509-SVIDs from the operator's signing service (or
//! [`spire`] from the local SPIRE agent), [`trust`] follows the trust bundle,
//! and [`store`] holds the result for the Workload API and the handshakes.
//! JWT-SVIDs come through [`jwt`]'s cache from either source.

pub mod jwt;
pub mod records;
pub mod signer;
pub mod spire;
pub mod store;
pub mod trust;

use std::path::PathBuf;

use tracing::warn;

pub use jwt::{JwtCache, JwtSvid};
pub use records::{LocalPod, PodUid};
pub use signer::JwtIssuer;
pub use store::{Bundles, IdentityStore, PodSvids, X509Svid};

/// Why an SVID could not be obtained (retried).
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The token file could not be read.
    #[error(
        "cannot read the service-account token {path}: {source}; is the projected token volume mounted?"
    )]
    Token {
        /// The token path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Making the key or CSR failed.
    #[error("cannot make a key and CSR: {0}")]
    Key(#[from] rcgen::Error),
    /// The signer refused or failed.
    #[error("the signing service answered {}: {}", .0.code(), .0.message())]
    Signer(#[from] tonic::Status),
    /// The signer's answer was unusable.
    #[error("the signing service's answer is unusable: {0}")]
    Answer(String),
}

/// Where the Workload API gets JWT-SVIDs.
#[derive(Debug, Clone)]
pub enum JwtSource {
    /// The operator's signing service.
    Signer(JwtIssuer),
    /// The local SPIRE agent's Delegated Identity API.
    Spire(crate::svid::spire::SpireJwt),
}

impl JwtSource {
    /// A JWT-SVID for `spiffe_id`, one of pod `uid`'s identities, for
    /// `audience`; the error is the Workload API's answer.
    pub async fn jwt_svid(
        &self,
        uid: &PodUid,
        pod: &PodSvids,
        spiffe_id: &str,
        audience: &[String],
    ) -> Result<JwtSvid, tonic::Status> {
        let unavailable = |e: &dyn std::fmt::Display| {
            warn!(pod_uid = %uid, spiffe_id, error = %e, "cannot get a JWT-SVID");
            tonic::Status::unavailable(format!("cannot get a JWT-SVID now: {e}"))
        };
        match self {
            JwtSource::Signer(issuer) => issuer
                .jwt_svid(uid, pod, spiffe_id, audience)
                .await
                .map_err(|e| match e {
                    SvidError::Signer(s) if s.code() == tonic::Code::InvalidArgument => s,
                    e => unavailable(&e),
                }),
            JwtSource::Spire(spire) => spire
                .jwt_svid(uid, spiffe_id, audience)
                .await
                .map_err(|e| unavailable(&e)),
        }
    }
}
