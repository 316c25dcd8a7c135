//! The waypoint: enforces the HTTP rules of AuthPolicies on each request,
//! with the source identity the node agents authenticated. This crate holds
//! the decision ([`policy`]) and the proxy that applies it to each request
//! of a connection ([`proxy`]); the node agent steers connections to it
//! and names their peers.
#![forbid(unsafe_code)]

pub mod policy;
pub mod proxy;

/// Locks `m`; a lock poisoned by a panic elsewhere is taken as it is (the
/// data behind these locks is whole at every point a panic could leave it).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
