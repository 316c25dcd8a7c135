//! The agent's memory and glibc's allocator arenas.
//!
//! glibc gives threads that allocate at the same time separate arenas (up
//! to eight per core) and each arena keeps what it once held. The agent's
//! passes run on whichever runtime thread is free, and its housekeeping and
//! blocking threads come and go, so at 10,000 identities its anonymous
//! memory was 66 MB with the default arenas against 38.5 MB with one
//! (measured with `cargo xtask bench auth-cluster`, 2026-12-07). The number
//! of arenas can only be set before the allocator starts, through
//! `GLIBC_TUNABLES`: [`limit`] sets it and starts the agent again in the
//! same process when it is not set yet.

use std::ffi::OsString;

/// The environment variable glibc reads its tunables from.
pub const TUNABLES: &str = "GLIBC_TUNABLES";
/// The tunable that bounds the arenas.
const ARENA_MAX: &str = "glibc.malloc.arena_max";
/// Arenas: two, so that one thread's allocation rarely waits for another's.
const ARENAS: u32 = 2;

/// `GLIBC_TUNABLES` with the arena bound added; None when `current`
/// already bounds them (set by the agent, or by whoever started it).
pub fn tunables(current: Option<&str>) -> Option<String> {
    match current {
        Some(t) if t.split(':').any(|kv| kv.starts_with(ARENA_MAX)) => None,
        Some(t) if !t.is_empty() => Some(format!("{t}:{ARENA_MAX}={ARENAS}")),
        _ => Some(format!("{ARENA_MAX}={ARENAS}")),
    }
}

/// Re-executes this program with its arguments and the arena bound in its
/// environment, unless the bound is there already. Returns only when it is
/// (nothing to do) or when the program cannot be executed again (the error:
/// the agent then goes on with glibc's default arenas).
pub fn limit() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    let current = std::env::var(TUNABLES).ok();
    let tunables = tunables(current.as_deref())?;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Some(e),
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    Some(
        std::process::Command::new(exe)
            .args(args)
            .env(TUNABLES, tunables)
            .exec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_added_once_and_other_tunables_kept() {
        assert_eq!(tunables(None).as_deref(), Some("glibc.malloc.arena_max=2"));
        assert_eq!(
            tunables(Some("")).as_deref(),
            Some("glibc.malloc.arena_max=2")
        );
        assert_eq!(
            tunables(Some("glibc.malloc.tcache_count=0")).as_deref(),
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2")
        );
        assert_eq!(tunables(Some("glibc.malloc.arena_max=4")), None);
        assert_eq!(
            tunables(Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1")),
            None
        );
    }
}
