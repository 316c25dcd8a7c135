//! The waypoint: enforces the HTTP rules of AuthPolicies on each request,
//! with the source identity the node agents authenticated. This crate holds
//! the decision ([`policy`]) and the proxy that applies it to each request
//! of a connection ([`proxy`]); the node agent steers connections to it
//! and names their peers.
#![forbid(unsafe_code)]

pub mod policy;
pub mod proxy;
