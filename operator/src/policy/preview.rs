//! Rules before identities: the identity controller hands a pod's new
//! SPIFFE ID to the policy compiler ([`Preview::admit`]) and writes the
//! pod's PodIdentity only once the IdentityPolicies naming that ID are
//! written.

use std::collections::BTreeMap;
use std::time::Duration;

use tessera_api::spiffe::SpiffeId;

use super::compiler::PodFacts;

/// A pod the identity controller is about to give a SPIFFE ID, known to the
/// compiler before the pod's PodIdentity record is written.
#[derive(Debug, Clone)]
pub struct PendingPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE ID it is about to get.
    pub spiffe_id: SpiffeId,
    /// The node it runs on, if scheduled.
    pub node: Option<String>,
    since: std::time::Instant,
}

impl PendingPod {
    /// A pod in `namespace` with `labels` about to get `spiffe_id`.
    pub fn new(
        namespace: String,
        name: String,
        labels: BTreeMap<String, String>,
        spiffe_id: SpiffeId,
        node: Option<String>,
    ) -> PendingPod {
        PendingPod {
            namespace,
            name,
            labels,
            spiffe_id,
            node,
            since: std::time::Instant::now(),
        }
    }

    pub(super) fn facts(&self) -> PodFacts<'_> {
        PodFacts {
            namespace: &self.namespace,
            labels: &self.labels,
            spiffe_id: self.spiffe_id.clone(),
            node: self.node.as_deref(),
        }
    }
}

/// How long a pending pod is compiled in without its record showing up
/// (the identity controller's write failed or the pod went away).
const PENDING_FOR: Duration = Duration::from_secs(30);

/// Rules before identities: the identity controller hands a pod's new SPIFFE
/// ID to the compiler and waits until the IdentityPolicies that name it are
/// written, and only then writes the pod's PodIdentity record. Agents learn
/// a pod's identity from that record, so by the time one can put the pod on the data path
/// the policies that let it talk (or deny it) are already out, and the pod's
/// first connection does not meet a policy that has not caught up yet.
#[derive(Debug)]
pub struct Preview {
    pending: std::sync::Mutex<BTreeMap<(String, String), PendingPod>>,
    requested: std::sync::atomic::AtomicU64,
    pub(super) wake: tokio::sync::Notify,
    done: tokio::sync::watch::Sender<u64>,
}

impl Default for Preview {
    fn default() -> Preview {
        Preview {
            pending: std::sync::Mutex::default(),
            requested: std::sync::atomic::AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            done: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Preview {
    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), PendingPod>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Compiles `pod` in and waits, at most
    /// `timeout`, until a compile that includes it has been written. False
    /// when that did not happen in time (the compiler is failing or not
    /// running); the caller goes on anyway, as it would without a preview.
    pub async fn admit(&self, pod: PendingPod, timeout: Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.pending()
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
        let mine = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        let mut done = self.done.subscribe();
        tokio::time::timeout(timeout, done.wait_for(|d| *d >= mine))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The round a compile starting now covers, and the pending pods it
    /// includes: those `recorded` does not yet show with their new SPIFFE
    /// ID (the stores then carry them themselves).
    pub(super) fn begin(&self, recorded: impl Fn(&PendingPod) -> bool) -> (u64, Vec<PendingPod>) {
        let round = self.requested.load(std::sync::atomic::Ordering::SeqCst);
        let mut pending = self.pending();
        pending.retain(|_, p| !recorded(p) && p.since.elapsed() < PENDING_FOR);
        (round, pending.values().cloned().collect())
    }

    /// A compile that began at `round` has been written.
    pub(super) fn finished(&self, round: u64) {
        self.done.send_if_modified(|d| {
            let newer = round > *d;
            if newer {
                *d = round;
            }
            newer
        });
    }
}
