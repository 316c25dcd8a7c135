//! Policy compilation: every AuthPolicy becomes rules on the SPIFFE IDs of the
//! pods it selects, merged per ID into one `IdentityPolicy` object that node
//! agents turn into data-path map entries. Label selectors on peers are
//! resolved here into the exact SPIFFE IDs of the pods they pick; SPIFFE ID
//! matchers are passed on for the agents to match against their numeric
//! identities.
//!
//! Semantics (also in docs/policy.md): with no policy selecting a workload,
//! traffic is allowed; any matching Deny denies; otherwise any matching Allow
//! allows; otherwise, once any Allow policy selects the workload, deny.
//!
//! Policies apply per SPIFFE ID, because that is what the data path knows
//! about a packet: pods sharing an ID with a selected pod get the same rules,
//! and the status says how many.
//!
//! Fail closed: a policy that cannot be compiled (a bad selector, a port range
//! too wide for the data path) never lets more traffic through than a correct
//! one would. A broken Allow rule is dropped (the selected IDs stay
//! default-deny); a broken Deny rule becomes "deny everything"; a broken
//! policy selector selects nothing and the status says so.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::runtime::reflector::{self, Store};

use tessera_api::crd::auth_policy::{
    Authentication, ExternalPeers, PeerSelector, PolicyAction, PortRange, Protocol,
};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};
use tessera_api::crd::{
    AuthPolicy, AuthPolicyStatus, CONDITION_HTTP_RULES, CONDITION_READY, IdentityPolicySpec,
    PodIdentity,
};
use tessera_api::spiffe::SpiffeId;

use crate::selector::{SelectorError, selector_matches};

/// Most destination ports one rule may cover (the data path holds one entry
/// per port and peer; wider ranges are refused, fail-closed).
pub const MAX_PORTS_PER_RULE: u32 = 1024;

/// Why a policy, or one of its rules, cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The policy's own selector is invalid.
    #[error("spec.selector: {0}")]
    Selector(SelectorError),
    /// A peer selector is invalid.
    #[error("spec.rules[{rule}].from[{peer}]: {source}")]
    Peer {
        /// Index of the rule.
        rule: usize,
        /// Index of the peer.
        peer: usize,
        /// The selector problem.
        source: SelectorError,
    },
    /// A rule covers too many ports.
    #[error(
        "spec.rules[{rule}].ports cover {ports} ports; at most {MAX_PORTS_PER_RULE} per rule are supported, split the rule or narrow the ranges"
    )]
    TooManyPorts {
        /// Index of the rule.
        rule: usize,
        /// How many ports it covers.
        ports: u32,
    },
    /// A rule names a UDP port (stored before the API server refused them).
    #[error(
        "spec.rules[{rule}].ports name UDP, which the data path does not enforce; use protocol TCP or remove the port"
    )]
    Udp {
        /// Index of the rule.
        rule: usize,
    },
}

/// What the compiler needs to know about a pod.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The SPIFFE ID the operator gave it.
    pub spiffe_id: SpiffeId,
    /// The node it runs on, if scheduled.
    pub node: Option<&'a str>,
}

/// The facts of a pod that has an identity (a PodIdentity record, which
/// only the operator writes) and is not being deleted.
pub fn pod_facts<'p>(pod: &'p Pod, records: &Store<PodIdentity>) -> Option<PodFacts<'p>> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let uid = pod.metadata.uid.as_deref()?;
    let spiffe_id = records
        .get(&reflector::ObjectRef::new(uid))?
        .for_pod(uid)?
        .spiffe_id
        .parse()
        .ok()?;
    Some(PodFacts {
        namespace: pod.metadata.namespace.as_deref()?,
        labels: pod.labels(),
        spiffe_id,
        node: pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
    })
}

/// How compiling one AuthPolicy went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyOutcome {
    /// Pods the selector picks (with an identity).
    pub endpoints: i64,
    /// Nodes those pods run on.
    pub nodes: i64,
    /// SPIFFE IDs the rules were attached to.
    pub identities: usize,
    /// Pods that are not selected but share an ID with a selected pod.
    pub widened: usize,
    /// What could not be compiled (enforced fail-closed).
    pub errors: Vec<CompileError>,
    /// Allow rules with HTTP rules (the waypoint checks each request).
    pub http_allows: usize,
    /// Deny rules with HTTP rules (likewise).
    pub http_denies: usize,
}

/// The result of compiling every policy.
#[derive(Debug, Default)]
pub struct Compiled {
    /// IdentityPolicy specs by SPIFFE ID.
    pub identities: BTreeMap<String, IdentityPolicySpec>,
    /// Per AuthPolicy, keyed `namespace/name`.
    pub outcomes: BTreeMap<String, PolicyOutcome>,
}

/// Compiles `policies` against the cluster's pods and namespace labels.
pub fn compile(
    policies: &[Arc<AuthPolicy>],
    pods: &[PodFacts<'_>],
    namespace_labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Compiled {
    let mut sorted: Vec<&AuthPolicy> = policies.iter().map(AsRef::as_ref).collect();
    sorted.sort_by_key(|p| (p.namespace(), p.name_any()));
    let mut out = Compiled::default();
    for policy in sorted {
        let namespace = policy.namespace().unwrap_or_default();
        let key = format!("{namespace}/{}", policy.name_any());
        let mut outcome = PolicyOutcome::default();
        let selected: Vec<&PodFacts> = match pods
            .iter()
            .filter(|p| p.namespace == namespace)
            .filter_map(
                |p| match selector_matches(Some(&policy.spec.selector), p.labels) {
                    Ok(true) => Some(Ok(p)),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                },
            )
            .collect::<Result<_, _>>()
        {
            Ok(selected) => selected,
            Err(e) => {
                outcome.errors.push(CompileError::Selector(e));
                out.outcomes.insert(key, outcome);
                continue;
            }
        };
        let ids: BTreeSet<&str> = selected.iter().map(|p| p.spiffe_id.as_str()).collect();
        outcome.endpoints = selected.len() as i64;
        outcome.nodes = selected
            .iter()
            .filter_map(|p| p.node)
            .collect::<BTreeSet<_>>()
            .len() as i64;
        outcome.identities = ids.len();
        outcome.widened = pods
            .iter()
            .filter(|p| ids.contains(p.spiffe_id.as_str()))
            .count()
            .saturating_sub(selected.len());
        let rules = compile_rules(policy, &namespace, pods, namespace_labels, &mut outcome);
        for id in ids {
            let entry = out
                .identities
                .entry(id.to_owned())
                .or_insert_with(|| IdentityPolicySpec {
                    spiffe_id: id.to_owned(),
                    default_deny: false,
                    rules: Vec::new(),
                    sources: Vec::new(),
                });
            entry.default_deny |= policy.spec.action == PolicyAction::Allow;
            entry.rules.extend(rules.iter().cloned());
            entry.sources.push(key.clone());
        }
        out.outcomes.insert(key, outcome);
    }
    out
}

fn deny_everything() -> CompiledRule {
    CompiledRule {
        action: PolicyAction::Deny,
        from: Vec::new(),
        ports: Vec::new(),
        authentication: Authentication::None,
        l7: false,
        http: Vec::new(),
        external_peers: ExternalPeers::Deny,
    }
}

fn compile_rules(
    policy: &AuthPolicy,
    namespace: &str,
    pods: &[PodFacts<'_>],
    namespace_labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
    outcome: &mut PolicyOutcome,
) -> Vec<CompiledRule> {
    let action = policy.spec.action;
    let mut rules = Vec::new();
    for (index, rule) in policy.spec.rules.iter().enumerate() {
        let compiled = (|| {
            if rule.ports.iter().any(|p| p.protocol == Protocol::Udp) {
                return Err(CompileError::Udp { rule: index });
            }
            let width: u32 = rule.ports.iter().map(port_count).sum();
            if width > MAX_PORTS_PER_RULE {
                return Err(CompileError::TooManyPorts {
                    rule: index,
                    ports: width,
                });
            }
            let from = rule
                .from
                .iter()
                .enumerate()
                .map(|(p, peer)| {
                    compile_peer(peer, namespace, pods, namespace_labels).map_err(|source| {
                        CompileError::Peer {
                            rule: index,
                            peer: p,
                            source,
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(CompiledRule {
                action,
                from,
                ports: rule.ports.clone(),
                authentication: match action {
                    PolicyAction::Allow => rule.authentication,
                    PolicyAction::Deny => Authentication::None,
                },
                l7: action == PolicyAction::Allow && !rule.http.is_empty(),
                http: rule.http.clone(),
                external_peers: match action {
                    PolicyAction::Allow => rule.external_peers,
                    PolicyAction::Deny => ExternalPeers::Deny,
                },
            })
        })();
        match compiled {
            Ok(r) => {
                if !rule.http.is_empty() {
                    match action {
                        PolicyAction::Allow => outcome.http_allows += 1,
                        PolicyAction::Deny => outcome.http_denies += 1,
                    }
                }
                rules.push(r)
            }
            Err(e) => {
                outcome.errors.push(e);
                if action == PolicyAction::Deny {
                    rules.push(deny_everything());
                }
            }
        }
    }
    // A policy with no rules matches nothing: an Allow selects (default
    // deny), a Deny has no effect.
    rules
}

/// How many ports a range covers (an invalid range covers none; the API
/// server's validation rejects those).
fn port_count(range: &PortRange) -> u32 {
    let first = range.port.clamp(0, 65535) as u32;
    let last = range.end_port.unwrap_or(range.port).clamp(0, 65535) as u32;
    (last + 1).saturating_sub(first)
}

fn compile_peer(
    peer: &PeerSelector,
    policy_namespace: &str,
    pods: &[PodFacts<'_>],
    namespace_labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Result<CompiledPeer, SelectorError> {
    let explicit = (!peer.spiffe_ids.is_empty()).then(|| peer.spiffe_ids.clone());
    let by_pods = !peer.namespaces.is_empty()
        || peer.pod_selector.is_some()
        || peer.namespace_selector.is_some();
    let spiffe_ids = if by_pods {
        let mut found = BTreeSet::new();
        for pod in pods {
            if !pod_in_peer(peer, policy_namespace, pod, namespace_labels)? {
                continue;
            }
            let id = pod.spiffe_id.as_str();
            if explicit.as_ref().is_none_or(|e| e.iter().any(|x| x == id)) {
                found.insert(id.to_owned());
            }
        }
        Some(found.into_iter().collect())
    } else {
        explicit
    };
    Ok(CompiledPeer {
        spiffe_ids,
        spiffe_id_prefixes: peer.spiffe_id_prefixes.clone(),
        trust_domains: peer.trust_domains.clone(),
    })
}

fn pod_in_peer(
    peer: &PeerSelector,
    policy_namespace: &str,
    pod: &PodFacts<'_>,
    namespace_labels: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Result<bool, SelectorError> {
    if !peer.namespaces.is_empty() && !peer.namespaces.iter().any(|n| n == pod.namespace) {
        return Ok(false);
    }
    match &peer.namespace_selector {
        Some(selector) => {
            let labels = namespace_labels(pod.namespace).unwrap_or_default();
            if !selector_matches(Some(selector), &labels)? {
                return Ok(false);
            }
        }
        // A pod selector alone means the policy's own namespace.
        None if peer.namespaces.is_empty() && pod.namespace != policy_namespace => {
            return Ok(false);
        }
        None => {}
    }
    selector_matches(peer.pod_selector.as_ref(), pod.labels)
}

/// The status an AuthPolicy should have after compiling to `outcome`.
pub fn status(
    policy: &AuthPolicy,
    outcome: &PolicyOutcome,
    previous: Option<&AuthPolicyStatus>,
    now: Time,
) -> AuthPolicyStatus {
    let (state, reason, message) = if let Some(first) = outcome.errors.first() {
        let effect = match policy.spec.action {
            PolicyAction::Allow => "the broken rules allow nothing",
            PolicyAction::Deny => "each broken rule denies all traffic to the selected pods",
        };
        (
            "False",
            "Invalid",
            format!(
                "{} problem(s), enforced fail-closed ({effect}); first: {first}",
                outcome.errors.len()
            ),
        )
    } else {
        let mut message = format!(
            "compiled for {} pod(s) with {} SPIFFE ID(s) on {} node(s)",
            outcome.endpoints, outcome.identities, outcome.nodes
        );
        if outcome.widened > 0 {
            message.push_str(&format!(
                "; {} other pod(s) share those SPIFFE IDs and get the same rules (policies apply per SPIFFE ID)",
                outcome.widened
            ));
        }
        ("True", "Compiled", message)
    };
    let generation = policy.metadata.generation;
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        let old = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == type_));
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: match old {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => now.clone(),
            },
        }
    };
    let mut conditions = vec![condition(CONDITION_READY, state, reason, message)];
    if outcome.http_allows + outcome.http_denies > 0 {
        conditions.push(condition(
            CONDITION_HTTP_RULES,
            "True",
            "EnforcedByWaypoint",
            format!(
                "every connection to the ports of the {} Allow and {} Deny rule(s) with http goes through the node agent's waypoint, which checks each request",
                outcome.http_allows, outcome.http_denies
            ),
        ));
    }
    AuthPolicyStatus {
        conditions,
        observed_generation: generation,
        endpoints: Some(outcome.endpoints),
        nodes: Some(outcome.nodes),
    }
}

/// The IdentityPolicy object name for a SPIFFE ID (that of its NumericIdentity).
pub fn object_name(spiffe_id: &str) -> Option<String> {
    spiffe_id
        .parse::<SpiffeId>()
        .ok()
        .map(|id| tessera_api::crd::identity::numeric_identity_name(&id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use tessera_api::crd::AuthPolicySpec;
    use tessera_api::crd::auth_policy::{AuthRule, HttpRule, Protocol};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        }
    }

    /// (namespace, app label, SPIFFE ID, node)
    const PODS: &[(&str, &str, &str, &str)] = &[
        ("shop", "web", "spiffe://td/ns/shop/sa/web", "n1"),
        ("shop", "web", "spiffe://td/ns/shop/sa/web", "n2"),
        ("shop", "db", "spiffe://td/ns/shop/sa/db", "n1"),
        ("shop", "cache", "spiffe://td/ns/shop/sa/db", "n2"),
        ("ops", "web", "spiffe://td/ns/ops/sa/web", "n1"),
    ];

    struct World {
        labels: Vec<BTreeMap<String, String>>,
    }

    impl World {
        fn new() -> World {
            World {
                labels: PODS.iter().map(|p| labels(&[("app", p.1)])).collect(),
            }
        }

        fn facts(&self) -> Vec<PodFacts<'_>> {
            PODS.iter()
                .zip(&self.labels)
                .map(|(p, l)| PodFacts {
                    namespace: p.0,
                    labels: l,
                    spiffe_id: p.2.parse().unwrap(),
                    node: Some(p.3),
                })
                .collect()
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        action: PolicyAction,
        app: &str,
        rules: Vec<AuthRule>,
    ) -> Arc<AuthPolicy> {
        let mut p = AuthPolicy::new(
            name,
            AuthPolicySpec {
                selector: selector(&[("app", app)]),
                action,
                rules,
            },
        );
        p.metadata.namespace = Some(ns.into());
        Arc::new(p)
    }

    fn ns_labels(name: &str) -> Option<BTreeMap<String, String>> {
        Some(labels(&[(
            "team",
            if name == "ops" { "ops" } else { "shop" },
        )]))
    }

    fn compile_one(policies: &[Arc<AuthPolicy>]) -> Compiled {
        let world = World::new();
        compile(policies, &world.facts(), &ns_labels)
    }

    fn peer_pods(selector_app: &str) -> PeerSelector {
        PeerSelector {
            pod_selector: Some(selector(&[("app", selector_app)])),
            ..PeerSelector::default()
        }
    }

    #[test]
    fn an_allow_policy_attaches_rules_to_the_selected_ids() {
        let rule = AuthRule {
            from: vec![peer_pods("web")],
            ports: vec![PortRange {
                port: 5432,
                end_port: None,
                protocol: Protocol::Tcp,
            }],
            ..AuthRule::default()
        };
        let out = compile_one(&[policy("shop", "db", PolicyAction::Allow, "db", vec![rule])]);
        assert_eq!(out.identities.len(), 1, "{:?}", out.identities);
        let db = &out.identities["spiffe://td/ns/shop/sa/db"];
        assert!(db.default_deny);
        assert_eq!(db.sources, vec!["shop/db".to_owned()]);
        assert_eq!(db.rules.len(), 1);
        let r = &db.rules[0];
        assert_eq!(r.authentication, Authentication::Mutual);
        // The pod selector resolves to the SPIFFE IDs of the shop pods
        // labelled web, not the ops one.
        assert_eq!(
            r.from[0].spiffe_ids,
            Some(vec!["spiffe://td/ns/shop/sa/web".to_owned()])
        );
        let o = &out.outcomes["shop/db"];
        assert_eq!((o.endpoints, o.nodes, o.identities), (1, 1, 1));
        // The cache pod shares the db pod's SPIFFE ID without being selected.
        assert_eq!(o.widened, 1);
        assert!(o.errors.is_empty());
    }

    #[test]
    fn deny_policies_do_not_make_default_deny_and_merge_per_id() {
        let deny = policy(
            "shop",
            "no-ops",
            PolicyAction::Deny,
            "web",
            vec![AuthRule {
                from: vec![PeerSelector {
                    namespace_selector: Some(selector(&[("team", "ops")])),
                    ..PeerSelector::default()
                }],
                authentication: Authentication::Mutual,
                // Refused by the API server in a Deny policy; the compiler
                // does not pass it on either.
                external_peers: ExternalPeers::TerminateTls,
                ..AuthRule::default()
            }],
        );
        let allow = policy(
            "shop",
            "web-http",
            PolicyAction::Allow,
            "web",
            vec![AuthRule {
                ports: vec![PortRange {
                    port: 80,
                    end_port: None,
                    protocol: Protocol::Tcp,
                }],
                http: vec![HttpRule::default()],
                external_peers: ExternalPeers::TerminateTls,
                ..AuthRule::default()
            }],
        );
        let out = compile_one(&[allow, deny.clone()]);
        let web = &out.identities["spiffe://td/ns/shop/sa/web"];
        assert!(web.default_deny, "the Allow policy selects web");
        assert_eq!(
            web.sources,
            vec!["shop/no-ops".to_owned(), "shop/web-http".to_owned()]
        );
        assert_eq!(web.rules[0].action, PolicyAction::Deny);
        assert_eq!(web.rules[0].authentication, Authentication::None);
        assert_eq!(
            web.rules[0].from[0].spiffe_ids,
            Some(vec!["spiffe://td/ns/ops/sa/web".to_owned()])
        );
        assert!(web.rules[1].l7);
        assert_eq!(web.rules[0].external_peers, ExternalPeers::Deny);
        assert_eq!(web.rules[1].external_peers, ExternalPeers::TerminateTls);
        assert_eq!(out.outcomes["shop/web-http"].nodes, 2);

        let only_deny = compile_one(&[deny]);
        assert!(!only_deny.identities["spiffe://td/ns/shop/sa/web"].default_deny);
    }

    #[test]
    fn a_peer_selector_with_no_pods_matches_nobody() {
        let out = compile_one(&[policy(
            "shop",
            "p",
            PolicyAction::Allow,
            "db",
            vec![AuthRule {
                from: vec![peer_pods("nothing-has-this")],
                ..AuthRule::default()
            }],
        )]);
        let rule = &out.identities["spiffe://td/ns/shop/sa/db"].rules[0];
        assert_eq!(rule.from[0].spiffe_ids, Some(vec![]));
    }

    #[test]
    fn spiffe_id_peers_pass_through_and_intersect_with_pods() {
        let out = compile_one(&[policy(
            "shop",
            "p",
            PolicyAction::Allow,
            "db",
            vec![
                AuthRule {
                    from: vec![PeerSelector {
                        spiffe_id_prefixes: vec!["spiffe://td/ns/ops".into()],
                        ..PeerSelector::default()
                    }],
                    ..AuthRule::default()
                },
                AuthRule {
                    from: vec![PeerSelector {
                        spiffe_ids: vec!["spiffe://td/ns/ops/sa/web".into()],
                        namespaces: vec!["shop".into(), "ops".into()],
                        ..PeerSelector::default()
                    }],
                    ..AuthRule::default()
                },
            ],
        )]);
        let rules = &out.identities["spiffe://td/ns/shop/sa/db"].rules;
        assert_eq!(rules[0].from[0].spiffe_ids, None);
        assert_eq!(
            rules[0].from[0].spiffe_id_prefixes,
            vec!["spiffe://td/ns/ops"]
        );
        assert_eq!(
            rules[1].from[0].spiffe_ids,
            Some(vec!["spiffe://td/ns/ops/sa/web".to_owned()])
        );
    }

    fn wide_rule() -> AuthRule {
        AuthRule {
            ports: vec![PortRange {
                port: 1,
                end_port: Some(2000),
                protocol: Protocol::Tcp,
            }],
            ..AuthRule::default()
        }
    }

    #[test]
    fn broken_rules_fail_closed() {
        let allow = compile_one(&[policy(
            "shop",
            "a",
            PolicyAction::Allow,
            "db",
            vec![wide_rule()],
        )]);
        let db = &allow.identities["spiffe://td/ns/shop/sa/db"];
        assert!(db.default_deny);
        assert!(db.rules.is_empty(), "a broken Allow rule allows nothing");
        assert!(matches!(
            allow.outcomes["shop/a"].errors[0],
            CompileError::TooManyPorts {
                rule: 0,
                ports: 2000
            }
        ));

        let deny = compile_one(&[policy(
            "shop",
            "d",
            PolicyAction::Deny,
            "db",
            vec![wide_rule()],
        )]);
        let db = &deny.identities["spiffe://td/ns/shop/sa/db"];
        assert_eq!(
            db.rules,
            vec![deny_everything()],
            "a broken Deny rule denies everything"
        );

        let mut bad = (*policy("shop", "s", PolicyAction::Allow, "db", vec![])).clone();
        bad.spec.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "app".into(),
                operator: "Near".into(),
                values: None,
            },
        ]);
        let out = compile_one(&[Arc::new(bad.clone())]);
        assert!(out.identities.is_empty());
        let st = status(
            &bad,
            &out.outcomes["shop/s"],
            None,
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!(st.conditions[0].status, "False");
        assert!(
            st.conditions[0]
                .message
                .contains("unknown selector operator"),
            "{}",
            st.conditions[0].message
        );
    }

    #[test]
    fn udp_rules_fail_closed() {
        let udp = AuthRule {
            ports: vec![PortRange {
                port: 53,
                end_port: None,
                protocol: Protocol::Udp,
            }],
            ..AuthRule::default()
        };
        let allow = compile_one(&[policy(
            "shop",
            "a",
            PolicyAction::Allow,
            "db",
            vec![udp.clone()],
        )]);
        assert!(
            allow.identities["spiffe://td/ns/shop/sa/db"]
                .rules
                .is_empty()
        );
        assert_eq!(
            allow.outcomes["shop/a"].errors,
            vec![CompileError::Udp { rule: 0 }]
        );
        let deny = compile_one(&[policy("shop", "d", PolicyAction::Deny, "db", vec![udp])]);
        assert_eq!(
            deny.identities["spiffe://td/ns/shop/sa/db"].rules,
            vec![deny_everything()]
        );
    }

    #[test]
    fn http_rules_go_to_the_waypoint_and_status_says_so() {
        let http = AuthRule {
            ports: vec![PortRange::tcp(8080, None)],
            http: vec![HttpRule::default()],
            ..AuthRule::default()
        };
        let t0 = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let p = policy("shop", "h", PolicyAction::Allow, "db", vec![http.clone()]);
        let out = compile_one(std::slice::from_ref(&p));
        let rules = &out.identities["spiffe://td/ns/shop/sa/db"].rules;
        assert!(rules[0].l7, "compiled for the waypoint, marked as HTTP");
        let st = status(&p, &out.outcomes["shop/h"], None, t0.clone());
        assert_eq!(st.conditions[0].status, "True", "compiled");
        let http_cond = &st.conditions[1];
        assert_eq!(
            (
                http_cond.type_.as_str(),
                http_cond.status.as_str(),
                http_cond.reason.as_str()
            ),
            (CONDITION_HTTP_RULES, "True", "EnforcedByWaypoint")
        );
        assert!(
            http_cond
                .message
                .contains("ports of the 1 Allow and 0 Deny rule(s) with http"),
            "{}",
            http_cond.message
        );
        let d = policy("shop", "hd", PolicyAction::Deny, "db", vec![http]);
        let out = compile_one(std::slice::from_ref(&d));
        let st = status(&d, &out.outcomes["shop/hd"], None, t0.clone());
        assert!(
            st.conditions[1]
                .message
                .contains("ports of the 0 Allow and 1 Deny rule(s) with http")
        );
        // Without HTTP rules there is no such condition.
        let plain = policy("shop", "p", PolicyAction::Allow, "db", vec![]);
        let out = compile_one(std::slice::from_ref(&plain));
        assert_eq!(
            status(&plain, &out.outcomes["shop/p"], None, t0)
                .conditions
                .len(),
            1
        );
    }

    #[test]
    fn status_keeps_the_transition_time_while_the_state_holds() {
        let p = policy("shop", "db", PolicyAction::Allow, "db", vec![]);
        let out = compile_one(std::slice::from_ref(&p));
        let t0 = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let first = status(&p, &out.outcomes["shop/db"], None, t0.clone());
        assert_eq!(first.conditions[0].reason, "Compiled");
        assert!(
            first.conditions[0].message.contains("1 other pod(s) share"),
            "{}",
            first.conditions[0].message
        );
        let later = Time(k8s_openapi::jiff::Timestamp::now());
        let second = status(&p, &out.outcomes["shop/db"], Some(&first), later);
        assert_eq!(first, second);
    }
}
