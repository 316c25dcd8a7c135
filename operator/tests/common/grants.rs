//! Shared by the RBAC tests: what the operator's and the agent's binaries
//! need the API server to allow, and what neither may do, however they are
//! installed (`deploy/` or the OLM bundle). Listed from what the binaries
//! do, not derived from the roles under test.
#![allow(dead_code)]

use tessera_api::names::{BUNDLE_CONFIGMAP, CA_SECRET, NAMESPACE, OPERATOR, SIGNER_SERVICE};
use tessera_tests::rbac::Grant;

const NS: Option<&str> = Some(NAMESPACE);

fn grant(verb: &'static str, resource: &str, namespace: Option<&'static str>) -> Grant {
    (verb, resource.to_owned(), namespace)
}

/// The operator's requests.
pub fn operator_needs() -> Vec<Grant> {
    vec![
        grant("watch", "pods", None),
        grant("list", "namespaces", None),
        grant("create", "tokenreviews.authentication.k8s.io", None),
        grant("patch", "podidentities.tessera.dev", None),
        grant("delete", "podidentities.tessera.dev", None),
        grant("patch", "identitypolicies.tessera.dev", None),
        grant("create", "numericidentities.tessera.dev", None),
        grant("update", "identitycounters.tessera.dev", None),
        grant("patch", "workloadidentities.tessera.dev#status", None),
        grant("patch", "authpolicies.tessera.dev#status", None),
        grant("patch", "federatedtrustdomains.tessera.dev", None),
        grant("create", "events.events.k8s.io", None),
        grant("create", "secrets", NS),
        grant("update", &format!("secrets/{CA_SECRET}"), NS),
        grant("watch", &format!("secrets/{CA_SECRET}"), NS),
        grant("patch", &format!("configmaps/{BUNDLE_CONFIGMAP}"), NS),
        grant(
            "update",
            &format!("leases.coordination.k8s.io/{OPERATOR}"),
            NS,
        ),
        grant(
            "patch",
            &format!("endpointslices.discovery.k8s.io/{SIGNER_SERVICE}"),
            NS,
        ),
    ]
}

/// The agent's requests.
pub fn agent_needs() -> Vec<Grant> {
    vec![
        grant("watch", "pods", None),
        grant("get", "nodes", None),
        grant("watch", "podidentities.tessera.dev", None),
        grant("list", "identitypolicies.tessera.dev", None),
        grant("watch", "numericidentities.tessera.dev", None),
        grant("watch", &format!("configmaps/{BUNDLE_CONFIGMAP}"), NS),
    ]
}

/// What neither account may do: read Secrets beyond the CA's, touch pods,
/// or gain rights (bind, escalate, impersonate, write RBAC, mint tokens).
pub fn forbidden_to_both() -> Vec<Grant> {
    vec![
        grant("get", "secrets", Some("default")),
        grant("list", "secrets", None),
        grant("get", "secrets/some-other-secret", NS),
        grant("list", "secrets", NS),
        grant("create", "pods", None),
        grant("delete", "pods", None),
        grant("patch", "pods", None),
        grant("bind", "clusterroles", None),
        grant("escalate", "clusterroles", None),
        grant("impersonate", "users", None),
        grant("impersonate", "serviceaccounts", None),
        grant("create", "clusterrolebindings", None),
        grant("update", "roles", NS),
        grant("create", "rolebindings", NS),
        grant("create", "serviceaccounts/token", NS),
        grant("update", "configmaps/kube-root-ca.crt", NS),
    ]
}

/// What the agent must not do although the operator may.
pub fn forbidden_to_agent() -> Vec<Grant> {
    vec![
        grant("create", "podidentities.tessera.dev", None),
        grant("patch", "identitypolicies.tessera.dev", None),
        grant("create", "tokenreviews.authentication.k8s.io", None),
    ]
}
