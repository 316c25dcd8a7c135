//! WorkloadIdentity status: how many pods each selects, how many SPIFFE IDs
//! it renders, which pods it lost to (or won from) another WorkloadIdentity,
//! and a Ready condition that says why when its template fails for a pod.
//!
//! Computed from the same stores and the same [`crate::identity::assign`] function the
//! identity controller uses, so status and PodIdentity records cannot disagree.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tessera_api::crd::workload_identity::IdentityConflict;
use tessera_api::crd::{CONDITION_READY, WorkloadIdentity, WorkloadIdentityStatus};
use tessera_api::spiffe::TrustDomain;

use crate::identity::assign;

/// Most conflicts listed in one status (the count of pods is still exact).
pub const MAX_LISTED_CONFLICTS: usize = 20;

/// What one WorkloadIdentity's pods came to.
#[derive(Debug, Default)]
struct Tally {
    selected: i64,
    rendered: BTreeSet<String>,
    conflicts: Vec<IdentityConflict>,
    failures: Vec<String>,
}

impl Tally {
    /// Counts `pod`, whose assignment is `a`, for the WorkloadIdentity `name`.
    fn count(&mut self, name: &str, pod_name: String, a: &assign::Assignment) {
        let won = a.source.as_deref() == Some(name);
        let lost = a.conflicts.iter().any(|c| c == name);
        if !won && !lost {
            return;
        }
        self.selected += 1;
        if !won {
            let mut others = a.conflicts.clone();
            others.retain(|c| c != name);
            others.push(name.to_owned());
            others.sort();
            let chosen = a.source.clone().unwrap_or_default();
            self.conflicts.push(IdentityConflict {
                pod: pod_name,
                chosen,
                others,
            });
            return;
        }
        match &a.result {
            Ok(id) => drop(self.rendered.insert(id.to_string())),
            Err(e) => self.failures.push(format!("{pod_name}: {e}")),
        }
        if !a.conflicts.is_empty() {
            let others = a.conflicts.clone();
            self.conflicts.push(IdentityConflict {
                pod: pod_name,
                chosen: name.to_owned(),
                others,
            });
        }
    }

    /// The Ready condition's status, reason and message.
    fn ready(&self, conflict_count: usize) -> (&'static str, &'static str, String) {
        if let Some(first) = self.failures.first() {
            let message = format!(
                "the template does not render for {} pod(s), which get no identity; first: {first}",
                self.failures.len()
            );
            ("False", "RenderFailed", message)
        } else if conflict_count > 0 {
            let message = format!(
                "{conflict_count} pod(s) are also selected by other WorkloadIdentities; see status.conflicts"
            );
            ("True", "Conflicts", message)
        } else {
            (
                "True",
                "Rendered",
                format!("{} pod(s) selected", self.selected),
            )
        }
    }
}

/// The status `wid` should have given every pod, namespace and WorkloadIdentity.
pub fn compute(
    trust_domain: &TrustDomain,
    wid: &WorkloadIdentity,
    pods: &Store<Pod>,
    namespaces: &Store<Namespace>,
    wids: &[Arc<WorkloadIdentity>],
    previous: Option<&WorkloadIdentityStatus>,
    now: Time,
) -> WorkloadIdentityStatus {
    let name = wid.name_any();
    let mut tally = Tally::default();
    for pod in pods
        .state()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let a = assign::assign_pod(
            trust_domain,
            pod,
            namespaces,
            wids.iter().map(AsRef::as_ref),
        );
        let pod_name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        tally.count(&name, pod_name, &a);
    }
    tally.conflicts.sort_by(|a, b| a.pod.cmp(&b.pod));
    let conflict_count = tally.conflicts.len();
    tally.conflicts.truncate(MAX_LISTED_CONFLICTS);
    let (status, reason, message) = tally.ready(conflict_count);
    let generation = wid.metadata.generation;
    let old = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION_READY));
    // The transition time moves only when the status value does.
    let last_transition_time = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    WorkloadIdentityStatus {
        conditions: vec![Condition {
            type_: CONDITION_READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }],
        observed_generation: generation,
        pods_selected: Some(tally.selected),
        identities_rendered: Some(tally.rendered.len() as i64),
        conflicts: tally.conflicts,
    }
}
