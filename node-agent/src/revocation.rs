//! Revocation of established connections. After the maps change, the agent
//! runs `ts_revoke` in its own network namespace (pods on the host network)
//! and in each local pod's: every TCP connection the data path admitted and
//! would no longer admit (its allow gone, its authentication expired or
//! revoked, its peer's address or either side's identity changed) is reset
//! at both ends. Connections still allowed are untouched. The sweep runs
//! again on the next pass, for connections that were being established while
//! the maps changed.

use std::path::PathBuf;
use std::sync::Mutex;

use tessera_bpf::abi::Revoked;
use tessera_bpf::datapath::DatapathError;
use tracing::{debug, info, warn};

use crate::dataplane::{DataPlane, lock};
use crate::netns::{self, NetnsError};

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

/// When the connections were last swept.
#[derive(Debug, Default)]
pub struct Revocation {
    /// The data path's change count at the last sweep, and whether the
    /// follow-up sweep after it is still due.
    swept: Mutex<Option<(u64, bool)>>,
    warned: Mutex<bool>,
}

impl Revocation {
    /// Sweeps when the maps changed since the last sweep (or once more on
    /// the pass after one). Returns the connections reset.
    pub fn reconcile(&self, plane: &DataPlane, pods: &[Pod]) -> Vec<Revoked> {
        let (changes, can) = plane.with_datapath(|dp| (dp.changes(), dp.can_revoke()));
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
            match *swept {
                Some((at, false)) if at == changes => return Vec::new(),
                Some((at, true)) if at == changes => *swept = Some((changes, false)),
                _ => *swept = Some((changes, true)),
            }
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
