//! Revocation of established connections. After the maps change, the agent
//! runs `ts_revoke` in its own network namespace (pods on the host network)
//! and in each local pod's: every TCP connection the data path admitted and
//! would no longer admit (its allow gone, its authentication expired or
//! revoked, its peer's address or either side's identity changed) is reset
//! at both ends. Connections still allowed are untouched. The sweep runs
//! again on the next pass, for connections that were being established while
//! the maps changed.
//!
//! A sweep enters every local pod's namespace, so it runs at once only
//! after a change that may take something away (see
//! [`tessera_bpf::datapath::Datapath::narrowings`]); after changes that
//! only added entries (a new pod, a new authentication), which end no
//! connection, at most once per [`ADDED_ONLY_SWEEP`] (it still settles
//! connections that waited for an authentication).

use std::path::PathBuf;
use std::sync::Mutex;

use tessera_bpf::abi::Revoked;
use tessera_bpf::datapath::DatapathError;
use tracing::{debug, info, warn};

use crate::datapath::DataPlane;
use crate::netns::{self, NetnsError};
use crate::sync::lock;

/// Why one namespace could not be swept (logged; retried on the next pass).
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The pod's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Running the iterator failed.
    #[error("eBPF: {0}")]
    Datapath(#[from] DatapathError),
    /// The namespace thread failed.
    #[error("in the pod's network namespace: {0}")]
    Thread(std::io::Error),
}

/// A local pod whose connections are swept.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `namespace/name`, for logs.
    pub name: std::sync::Arc<str>,
    /// Its cgroup (to reach its network namespace).
    pub cgroup: PathBuf,
}

/// After changes that only added entries, the least time between sweeps.
pub const ADDED_ONLY_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// What the last sweep saw.
#[derive(Debug, Clone, Copy)]
struct Swept {
    /// The data path's change and narrowing counts then.
    changes: u64,
    narrowings: u64,
    /// When.
    at: std::time::Instant,
    /// Whether the follow-up sweep after a narrowing is still due.
    follow_up: bool,
}

/// When the connections were last swept.
#[derive(Debug, Default)]
pub struct Revocation {
    swept: Mutex<Option<Swept>>,
    warned: Mutex<bool>,
}

/// Whether to sweep now, given the last sweep and the counts now.
fn due(last: Option<Swept>, changes: u64, narrowings: u64) -> bool {
    let Some(last) = last else { return true };
    if narrowings != last.narrowings || last.follow_up {
        return true;
    }
    changes != last.changes && last.at.elapsed() >= ADDED_ONLY_SWEEP
}

impl Revocation {
    /// Sweeps when the maps changed since the last sweep (or once more on
    /// the pass after one). Returns the connections reset.
    pub fn reconcile(&self, plane: &DataPlane, pods: &[Pod]) -> Vec<Revoked> {
        let (changes, narrowings, can) =
            plane.with_datapath(|dp| (dp.changes(), dp.narrowings(), dp.can_revoke()));
        if !can {
            let mut warned = lock(&self.warned);
            if !*warned {
                warn!(
                    "this kernel has no bpf_sock_destroy (Linux >= 6.5): established connections outlive the allow they began with"
                );
                *warned = true;
            }
            return Vec::new();
        }
        {
            let mut swept = lock(&self.swept);
            let last = *swept;
            if !due(last, changes, narrowings) {
                return Vec::new();
            }
            // A narrowing gets a follow-up sweep on the next pass (for
            // connections being established meanwhile); the follow-up
            // itself, or a sweep after additions, does not.
            let narrowed = last.is_none_or(|l| l.narrowings != narrowings);
            *swept = Some(Swept {
                changes,
                narrowings,
                at: std::time::Instant::now(),
                follow_up: narrowed,
            });
        }
        self.sweep(plane, pods)
    }

    /// Runs `ts_revoke` in the agent's namespace and each pod's now.
    pub fn sweep(&self, plane: &DataPlane, pods: &[Pod]) -> Vec<Revoked> {
        let mut all = Vec::new();
        match plane.with_datapath(|dp| dp.revoke_here()) {
            Ok(reset) => all.extend(reset),
            Err(e) => warn!(error = %e, "cannot sweep the host network namespace's connections"),
        }
        let mut opened = Vec::new();
        for pod in pods {
            match netns::open_pod(&pod.cgroup) {
                Ok(ns) => opened.push((pod, ns)),
                Err(NetnsError::HostNetwork) => {}
                Err(e) => skipped(pod, &RevocationError::Netns(e)),
            }
        }
        let files: Vec<&std::fs::File> = opened.iter().map(|(_, ns)| &ns.file).collect();
        let swept = netns::run_in_each(&files, |_| {
            plane
                .with_datapath(|dp| dp.revoke_here())
                .map_err(std::io::Error::other)
        });
        for ((pod, _), result) in opened.iter().zip(swept) {
            match result {
                Ok(reset) => all.extend(reset),
                Err(e) => skipped(pod, &RevocationError::Thread(e)),
            }
        }
        for r in &all {
            info!(
                local = %r.local,
                remote = %r.remote,
                local_id = r.local_id,
                remote_id = r.remote_id,
                reason = r.reason.map(|r| r.label()).unwrap_or("unknown"),
                "connection reset: the data path no longer allows it"
            );
        }
        all
    }
}

fn skipped(pod: &Pod, e: &RevocationError) {
    debug!(pod = %pod.name, error = %e, "cannot sweep the pod's connections (retried on the next change)");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::time::{Duration, Instant};

    fn swept(changes: u64, narrowings: u64, ago: Duration, follow_up: bool) -> Option<Swept> {
        Some(Swept {
            changes,
            narrowings,
            at: Instant::now() - ago,
            follow_up,
        })
    }

    #[test]
    fn narrowings_sweep_at_once_additions_at_most_once_a_second() {
        assert!(due(None, 0, 0), "the first pass sweeps");
        let now = Duration::ZERO;
        assert!(due(swept(5, 2, now, false), 6, 3), "a narrowing: at once");
        assert!(due(swept(5, 2, now, true), 5, 2), "its follow-up");
        assert!(!due(swept(5, 2, now, false), 5, 2), "nothing changed");
        assert!(
            !due(swept(5, 2, now, false), 9, 2),
            "additions just after a sweep"
        );
        assert!(
            due(swept(5, 2, ADDED_ONLY_SWEEP, false), 9, 2),
            "additions a second later"
        );
    }
}
