//! Time as the agent's records count it.

use std::time::Duration;

use tokio::time::Instant;

/// The wall clock in Unix seconds, the unit of SVID expiry times.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When to renew an SVID that expires at `expires_at` (Unix seconds): half-way.
pub fn renew_at(expires_at: i64) -> Instant {
    let remaining = (expires_at - unix_now()).max(0) as u64;
    Instant::now() + Duration::from_secs(remaining / 2)
}
