//! The parts of SPIRE's APIs Tessera uses (generated from `proto/spire/`,
//! written from the SPIRE API reference): the server's Entry API, to
//! register workload identities when SVIDs come from SPIRE, and the agent's
//! Delegated Identity API, to obtain them. The module
//! nesting follows the proto packages (`spire.api.types`,
//! `spire.api.server.entry.v1`), as the generated code expects.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

/// `spire.api`.
pub mod api {
    /// `spire.api.types`: entries, selectors, SPIFFE IDs.
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
    }
    /// `spire.api.agent`.
    pub mod agent {
        /// `spire.api.agent.delegatedidentity`.
        pub mod delegatedidentity {
            /// `spire.api.agent.delegatedidentity.v1`: the Delegated Identity API.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/spire.api.agent.delegatedidentity.v1.rs"
                ));
            }
        }
    }
    /// `spire.api.server`.
    pub mod server {
        /// `spire.api.server.entry`.
        pub mod entry {
            /// `spire.api.server.entry.v1`: the Entry API.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/spire.api.server.entry.v1.rs"));
            }
        }
    }
}

/// A gRPC channel to a unix socket (SPIRE's server and agent admin APIs
/// listen on one), connected now: fails with the transport error when
/// nothing listens.
pub async fn unix_channel(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://spire.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// Selector type of the SPIRE entries Tessera registers; no workload
/// attestor produces it, so only a delegate asking for it gets their SVIDs.
pub const TESSERA_SELECTOR_TYPE: &str = "tessera";
/// Prefix of the selector value, before the SPIFFE ID.
pub const TESSERA_SELECTOR_VALUE_PREFIX: &str = "spiffe_id:";

/// The selector of the entries for SPIFFE ID `id`:
/// `tessera:spiffe_id:<id>`. The operator registers entries with it and the
/// node agent subscribes with it.
pub fn tessera_selector(id: &str) -> api::types::Selector {
    api::types::Selector {
        r#type: TESSERA_SELECTOR_TYPE.to_owned(),
        value: format!("{TESSERA_SELECTOR_VALUE_PREFIX}{id}"),
    }
}

impl api::types::Spiffeid {
    /// The SPIFFE ID as a URI string (`spiffe://<trust domain><path>`).
    pub fn uri(&self) -> String {
        format!("spiffe://{}{}", self.trust_domain, self.path)
    }
}
