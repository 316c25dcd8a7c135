//! Tessera's signing service (`tessera.signer.v1`), generated from
//! `proto/signer.proto`.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/tessera.signer.v1.rs"));

/// The token audience the signer accepts.
pub const TOKEN_AUDIENCE: &str = "tessera-signer";
