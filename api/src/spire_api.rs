//! The parts of SPIRE's APIs Tessera uses (generated from `proto/spire/`,
//! written from the SPIRE API reference): the server's Entry API, to
//! register workload identities when SVIDs come from SPIRE. The module
//! nesting follows the proto packages (`spire.api.types`,
//! `spire.api.server.entry.v1`), as the generated code expects.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

/// `spire.api`.
pub mod api {
    /// `spire.api.types`: entries, selectors, SPIFFE IDs.
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
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
