//! Tessera's signing service (`tessera.signer.v1`), generated from
//! `proto/signer.proto`.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/tessera.signer.v1.rs"));

pub use crate::names::TOKEN_AUDIENCE;
