//! Least-privilege RBAC for each binary: every verb it is granted, on
//! what, and why, as data. The roles in `deploy/` and the table in
//! `deploy/RBAC.md` are both generated from it, so neither can say what
//! the other does not.

use serde_json::{Value, json};

use super::{
    AGENT, BUNDLE_CONFIGMAP, BUNDLE_ENDPOINT_SERVICE, CA_SECRET, FEDERATED_CONFIGMAP, NAMESPACE,
    OPERATOR, SIGNER_SERVICE, labels,
};

/// One rule: verbs on resources of an API group, cluster-wide or in
/// Tessera's namespace, optionally only on named objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resources (and subresources, `pods/status`).
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Only these objects (empty: any). Kubernetes cannot restrict
    /// `create` by name, so grants with names never include it.
    pub names: &'static [&'static str],
    /// In Tessera's namespace only (a Role), not cluster-wide.
    pub namespaced: bool,
    /// Why the binary needs it.
    pub why: &'static str,
}

/// A binary's service account and what it is granted.
#[derive(Debug, Clone)]
pub struct Account {
    /// The service account's name (also the roles' and bindings').
    pub name: &'static str,
    /// What runs as it.
    pub binary: &'static str,
    /// Its grants.
    pub grants: Vec<Grant>,
}

const fn cluster(
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
    why: &'static str,
) -> Grant {
    Grant {
        namespaced: false,
        ..local(group, resources, verbs, &[], why)
    }
}

const fn local(
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
    names: &'static [&'static str],
    why: &'static str,
) -> Grant {
    Grant {
        group,
        resources,
        verbs,
        names,
        namespaced: true,
        why,
    }
}

const READ: &[&str] = &["get", "list", "watch"];
const TESSERA: &str = crate::crd::GROUP;

/// The operator's service account.
pub fn operator() -> Account {
    let mut grants = operator_cluster_grants();
    grants.extend(operator_namespace_grants());
    Account {
        name: OPERATOR,
        binary: "tessera-operator",
        grants,
    }
}

/// What the operator may do cluster-wide.
fn operator_cluster_grants() -> Vec<Grant> {
    vec![
        cluster(
            "",
            &["pods"],
            READ,
            "assign each pod its identity, and check the pod an agent asks an SVID for",
        ),
        cluster(
            "",
            &["namespaces"],
            READ,
            "namespace selectors of WorkloadIdentities and AuthPolicies",
        ),
        cluster(
            "",
            &["nodes"],
            READ,
            "SPIRE mode: the parent ID of each node's registration entries",
        ),
        cluster(
            "authentication.k8s.io",
            &["tokenreviews"],
            &["create"],
            "the signing service checks each agent's node-bound token",
        ),
        cluster(
            "events.k8s.io",
            &["events"],
            &["create", "patch"],
            "events on WorkloadIdentities, FederatedTrustDomains and pods",
        ),
        cluster(
            TESSERA,
            &["workloadidentities", "authpolicies"],
            READ,
            "the identities and policies users write",
        ),
        cluster(
            TESSERA,
            &[
                "workloadidentities/status",
                "authpolicies/status",
                "federatedtrustdomains/status",
            ],
            &["patch"],
            "report conditions and counts in their status",
        ),
        cluster(
            TESSERA,
            &["federatedtrustdomains"],
            &["get", "list", "watch", "patch"],
            "follow federated trust domains; patch: add and remove the finalizer that removes a deleted trust domain's bundle",
        ),
        cluster(
            TESSERA,
            &["podidentities", "identitypolicies"],
            &["get", "list", "watch", "create", "patch", "delete"],
            "write each pod's identity record and each identity's compiled policy (server-side apply), and delete them when they go",
        ),
        cluster(
            TESSERA,
            &["numericidentities"],
            &["get", "list", "watch", "create", "delete"],
            "allocate numeric identities (create fails on a taken number) and release unused ones",
        ),
        cluster(
            TESSERA,
            &["identitycounters"],
            &["get", "create", "update"],
            "the allocator's counter, advanced by compare-and-swap",
        ),
    ]
}

/// What the operator may do in its own namespace.
fn operator_namespace_grants() -> Vec<Grant> {
    vec![
        local(
            "",
            &["secrets"],
            &["create"],
            &[],
            "create the CA Secret on first start (Kubernetes cannot limit create by name)",
        ),
        local(
            "",
            &["secrets"],
            &["get", "list", "watch", "update"],
            &[CA_SECRET],
            "load, follow and rotate the CA roots; no other Secret",
        ),
        local(
            "",
            &["configmaps"],
            &["create"],
            &[],
            "create the trust bundle ConfigMaps on first start",
        ),
        local(
            "",
            &["configmaps"],
            &["get", "list", "watch", "patch"],
            &[BUNDLE_CONFIGMAP, FEDERATED_CONFIGMAP],
            "publish the trust bundle and the federated bundles for the agents",
        ),
        local(
            "coordination.k8s.io",
            &["leases"],
            &["create"],
            &[],
            "create the leader Lease on first start",
        ),
        local(
            "coordination.k8s.io",
            &["leases"],
            &["get", "patch", "update"],
            &[OPERATOR],
            "leader election: one replica leads, the other stands by",
        ),
        local(
            "discovery.k8s.io",
            &["endpointslices"],
            &["create"],
            &[],
            "create the leader's EndpointSlices on first election",
        ),
        local(
            "discovery.k8s.io",
            &["endpointslices"],
            &["get", "patch", "update"],
            &[SIGNER_SERVICE, BUNDLE_ENDPOINT_SERVICE],
            "point the signer and bundle endpoint Services at the leader only",
        ),
    ]
}

/// The node agents' service account.
pub fn agent() -> Account {
    Account {
        name: AGENT,
        binary: "tessera-agent",
        grants: vec![
            cluster(
                "",
                &["pods"],
                READ,
                "map pods' addresses to their identities in the data path",
            ),
            cluster(
                "",
                &["nodes"],
                READ,
                "nodes' pod address ranges (spec.podCIDRs): an address an agent vouches for before the pod's status has it must be in that agent's node's range",
            ),
            cluster(
                TESSERA,
                &["podidentities", "identitypolicies", "numericidentities"],
                READ,
                "pods' identity records, compiled policies and identity generations",
            ),
            local(
                "",
                &["configmaps"],
                READ,
                &[BUNDLE_CONFIGMAP, FEDERATED_CONFIGMAP],
                "follow the trust bundle and the federated bundles",
            ),
        ],
    }
}

/// What the operator needs more where it runs the node agents itself (OLM
/// installs, `--agent-image`): the agent DaemonSet and what it reports on
/// it. `deploy/` ships the DaemonSet instead and grants none of this.
pub fn operator_runs_agents() -> Vec<Grant> {
    vec![
        local(
            "apps",
            &["daemonsets"],
            &["create"],
            &[],
            "create the agent DaemonSet on first start (Kubernetes cannot limit create by name)",
        ),
        local(
            "apps",
            &["daemonsets"],
            &["get", "patch"],
            &[AGENT],
            "keep the agent DaemonSet as the operator's image and settings say (server-side apply)",
        ),
        local(
            "apps",
            &["daemonsets/status"],
            &["patch"],
            &[AGENT],
            "the PodSecurityAdmitted condition on the agent DaemonSet",
        ),
        local(
            "apps",
            &["deployments"],
            &["get"],
            &[OPERATOR],
            "make the operator's Deployment the agent DaemonSet's owner, so that uninstalling (OLM deletes the CSV, and with it the Deployment) removes the agents too",
        ),
        local(
            "",
            &["events"],
            &["list"],
            &[],
            "read the DaemonSet controller's FailedCreate events (Pod Security refusals)",
        ),
    ]
}

/// Every account.
pub fn accounts() -> [Account; 2] {
    [operator(), agent()]
}

pub(super) fn rule(g: &Grant) -> Value {
    let mut rule = json!({
        "apiGroups": [g.group],
        "resources": g.resources,
        "verbs": g.verbs,
    });
    if !g.names.is_empty() {
        rule["resourceNames"] = json!(g.names);
    }
    rule
}

/// The account's ServiceAccount, ClusterRole and Role, and their bindings.
pub fn objects(account: &Account) -> Vec<Value> {
    let meta = |namespaced: bool| {
        let mut m = json!({"name": account.name, "labels": labels(&[])});
        if namespaced {
            m["namespace"] = json!(NAMESPACE);
        }
        m
    };
    let subject = json!([{"kind": "ServiceAccount", "name": account.name, "namespace": NAMESPACE}]);
    let rules = |namespaced: bool| -> Vec<Value> {
        account
            .grants
            .iter()
            .filter(|g| g.namespaced == namespaced)
            .map(rule)
            .collect()
    };
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(true),
               "automountServiceAccountToken": false}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": meta(false), "rules": rules(false)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": meta(false), "subjects": subject,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account.name}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": meta(true), "rules": rules(true)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta(true), "subjects": subject,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account.name}}),
    ]
}

/// `deploy/RBAC.md`: every grant of every account, and why.
pub fn markdown() -> String {
    let mut out = String::from(
        "<!-- Generated from api/src/install/rbac.rs by `cargo xtask generate`. Do not edit. -->\n\
         # What each Tessera service account may do, and why\n\n\
         Each binary runs as its own service account with only the verbs below. \
         Nothing may read Secrets other than the operator's CA Secret, create or \
         delete pods, or write RBAC, bind, escalate or impersonate; \
         `operator/tests/deploy.rs` checks this with `kubectl auth can-i`.\n",
    );
    let olm = Account {
        name: OPERATOR,
        binary: "tessera-operator, OLM installs only: it runs the agents",
        grants: operator_runs_agents(),
    };
    for account in accounts().into_iter().chain([olm]) {
        out.push_str(&format!(
            "\n## `{}` ({})\n\n| API group | resources | verbs | scope | why |\n|---|---|---|---|---|\n",
            account.name, account.binary
        ));
        for g in &account.grants {
            let scope = match (g.namespaced, g.names) {
                (false, _) => "cluster".to_owned(),
                (true, []) => format!("`{NAMESPACE}`"),
                (true, names) => format!("`{NAMESPACE}`: {}", names.join(", ")),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {scope} | {} |\n",
                if g.group.is_empty() { "core" } else { g.group },
                g.resources.join(", "),
                g.verbs.join(", "),
                g.why
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_account_may_escalate_touch_pods_or_read_any_secret() {
        for account in accounts() {
            for g in &account.grants {
                let who = format!("{}: {g:?}", account.name);
                assert!(
                    !g.verbs
                        .iter()
                        .any(|v| ["bind", "escalate", "impersonate", "*"].contains(v)),
                    "{who}"
                );
                assert!(!g.group.starts_with("rbac."), "{who}");
                if g.resources.contains(&"pods") {
                    assert_eq!(g.verbs, READ, "{who}");
                }
                if g.resources.contains(&"secrets") {
                    assert!(g.namespaced, "{who}");
                    let reads = g.verbs.iter().any(|v| *v != "create");
                    assert!(!reads || g.names == [CA_SECRET], "{who}");
                }
                if !g.names.is_empty() {
                    assert!(!g.verbs.contains(&"create"), "{who}: create ignores names");
                }
            }
        }
    }

    #[test]
    fn every_grant_says_why_in_the_table() {
        let table = markdown();
        for account in accounts() {
            for g in &account.grants {
                assert!(table.contains(g.why), "{}", g.why);
            }
        }
    }
}
