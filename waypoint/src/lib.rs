//! The waypoint: enforces the HTTP rules of AuthPolicies on each request,
//! with the source identity the node agents authenticated. This crate holds
//! the decision ([`policy`]); the proxy around it comes with issue 22's
//! placement and steering work.
#![forbid(unsafe_code)]

pub mod policy;
