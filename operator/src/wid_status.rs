//! WorkloadIdentity status: how many pods each selects, how many SPIFFE IDs
//! it renders, which pods it lost to (or won from) another WorkloadIdentity,
//! and a Ready condition that says why when its template fails for a pod.
//!
//! Computed from the same stores and the same [`crate::assign`] function the
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

use crate::assign;

/// Most conflicts listed in one status (the count of pods is still exact).
pub const MAX_LISTED_CONFLICTS: usize = 20;

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
    let mut selected = 0i64;
    let mut rendered = BTreeSet::new();
    let mut conflicts = Vec::new();
    let mut failures = Vec::new();
    for pod in pods.state() {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let a = assign::assign_pod(
            trust_domain,
            &pod,
            namespaces,
            wids.iter().map(AsRef::as_ref),
        );
        let namespace = pod.namespace().unwrap_or_default();
        let pod_name_only = pod.metadata.name.clone().unwrap_or_default();
        let won = a.source.as_deref() == Some(name.as_str());
        let lost = a.conflicts.iter().any(|c| c == &name);
        if !won && !lost {
            continue;
        }
        selected += 1;
        let pod_name = format!("{namespace}/{pod_name_only}");
        if won {
            match &a.result {
                Ok(id) => {
                    rendered.insert(id.to_string());
                }
                Err(e) => failures.push(format!("{pod_name}: {e}")),
            }
            if !a.conflicts.is_empty() {
                conflicts.push(IdentityConflict {
                    pod: pod_name,
                    chosen: name.clone(),
                    others: a.conflicts.clone(),
                });
            }
        } else {
            let mut others = a.conflicts.clone();
            others.retain(|c| c != &name);
            others.push(name.clone());
            others.sort();
            conflicts.push(IdentityConflict {
                pod: pod_name,
                chosen: a.source.clone().unwrap_or_default(),
                others,
            });
        }
    }
    conflicts.sort_by(|a, b| a.pod.cmp(&b.pod));
    let conflict_count = conflicts.len();
    conflicts.truncate(MAX_LISTED_CONFLICTS);
    let (status, reason, message) = if let Some(first) = failures.first() {
        (
            "False",
            "RenderFailed",
            format!(
                "the template does not render for {} pod(s), which get no identity; first: {first}",
                failures.len()
            ),
        )
    } else if conflict_count > 0 {
        (
            "True",
            "Conflicts",
            format!(
                "{conflict_count} pod(s) are also selected by other WorkloadIdentities; see status.conflicts"
            ),
        )
    } else {
        ("True", "Rendered", format!("{selected} pod(s) selected"))
    };
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
        pods_selected: Some(selected),
        identities_rendered: Some(rendered.len() as i64),
        conflicts,
    }
}
