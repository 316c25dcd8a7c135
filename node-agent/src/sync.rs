//! Locks that a panicking holder does not make unusable: the state they
//! guard is replaced whole or checked on use, so the agent keeps going
//! instead of failing every later caller.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over the guard of a holder that panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
