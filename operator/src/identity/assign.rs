//! Which SPIFFE ID a pod gets: the WorkloadIdentity objects that select it,
//! resolved deterministically, or the default
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Resolution: WorkloadIdentities whose namespace and pod selectors both match
//! are candidates. Non-fallback candidates win over fallback ones. Among the
//! winners the alphabetically first name is used and the others are reported
//! as conflicts. A template that cannot render for the pod fails closed: the
//! pod gets no identity (never a silent default) and the error is reported.

use std::collections::BTreeMap;

use tessera_api::crd::WorkloadIdentity;
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tessera_api::template::{PodFacts, Template, TemplateError};

use crate::selector::{SelectorError, selector_matches};

/// What the assignment needs to know about a pod.
#[derive(Debug, Clone)]
pub struct Pod<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// Service account (`default` when the pod names none).
    pub service_account: &'a str,
    /// Node it is scheduled on, or empty.
    pub node_name: &'a str,
    /// Pod labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Labels of the pod's namespace.
    pub namespace_labels: &'a BTreeMap<String, String>,
}

/// Why a pod has no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    /// The chosen WorkloadIdentity's template did not render for this pod.
    #[error("WorkloadIdentity {wid}: {source}")]
    Template {
        /// The WorkloadIdentity.
        wid: String,
        /// Why rendering failed.
        source: TemplateError,
    },
    /// The template rendered an ID in a trust domain this cluster does not sign for.
    #[error(
        "WorkloadIdentity {wid} renders {id}, outside trust domain {trust_domain}; this cluster signs only for its own trust domain"
    )]
    ForeignTrustDomain {
        /// The WorkloadIdentity.
        wid: String,
        /// What it rendered.
        id: SpiffeId,
        /// This cluster's trust domain.
        trust_domain: TrustDomain,
    },
    /// The default ID could not be formed (names Kubernetes allows always fit,
    /// so this means a malformed Pod object).
    #[error("default SPIFFE ID for pod {namespace}/{name}: {source}")]
    Default {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// Why the ID is invalid.
        source: tessera_api::spiffe::SpiffeIdError,
    },
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The WorkloadIdentity used, or None for the default.
    pub source: Option<String>,
    /// The pod's SPIFFE ID, or why it has none.
    pub result: Result<SpiffeId, AssignError>,
    /// Other WorkloadIdentities of the winning tier that also selected the pod.
    pub conflicts: Vec<String>,
    /// WorkloadIdentities skipped because a selector could not be evaluated.
    pub broken_selectors: Vec<(String, SelectorError)>,
    /// Trust domains the pod federates with (the chosen WorkloadIdentity's
    /// `federatesWith`, sorted, without duplicates or the own trust domain).
    pub federates_with: Vec<TrustDomain>,
}

/// Decides the SPIFFE ID of `pod` given every WorkloadIdentity.
/// `wids` is borrowed (for example straight from a reflector store), so a
/// reconcile copies no WorkloadIdentity.
pub fn assign<'w>(
    trust_domain: &TrustDomain,
    pod: &Pod<'_>,
    wids: impl IntoIterator<Item = &'w WorkloadIdentity>,
) -> Assignment {
    let mut broken_selectors = Vec::new();
    let mut primary = Vec::new();
    let mut fallback = Vec::new();
    for wid in wids {
        let name = wid.metadata.name.clone().unwrap_or_default();
        let matched = selector_matches(wid.spec.namespace_selector.as_ref(), pod.namespace_labels)
            .and_then(|ns| Ok(ns && selector_matches(wid.spec.pod_selector.as_ref(), pod.labels)?));
        match matched {
            Ok(true) if wid.spec.fallback => fallback.push((name, wid)),
            Ok(true) => primary.push((name, wid)),
            Ok(false) => {}
            Err(e) => broken_selectors.push((name, e)),
        }
    }
    let mut tier = if primary.is_empty() {
        fallback
    } else {
        primary
    };
    tier.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tier = tier.into_iter();
    let Some((name, wid)) = tier.next() else {
        let default = format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            pod.namespace, pod.service_account
        );
        return Assignment {
            source: None,
            result: default.parse().map_err(|source| AssignError::Default {
                namespace: pod.namespace.to_owned(),
                name: pod.name.to_owned(),
                source,
            }),
            conflicts: Vec::new(),
            broken_selectors,
            federates_with: Vec::new(),
        };
    };
    let facts = PodFacts {
        trust_domain: Some(trust_domain),
        namespace: pod.namespace,
        service_account: pod.service_account,
        pod_name: pod.name,
        node_name: pod.node_name,
        labels: pod.labels,
    };
    let result = wid
        .spec
        .spiffe_id_template
        .parse::<Template>()
        .and_then(|t| t.render(&facts))
        .map_err(|source| AssignError::Template {
            wid: name.clone(),
            source,
        })
        .and_then(|id| {
            if id.is_member_of(trust_domain) {
                Ok(id)
            } else {
                Err(AssignError::ForeignTrustDomain {
                    wid: name.clone(),
                    id,
                    trust_domain: trust_domain.clone(),
                })
            }
        });
    // The schema admits only trust domain names; anything else is skipped.
    let mut federates_with: Vec<TrustDomain> = wid
        .spec
        .federates_with
        .iter()
        .filter_map(|td| td.parse().ok())
        .filter(|td| td != trust_domain)
        .collect();
    federates_with.sort();
    federates_with.dedup();
    Assignment {
        source: Some(name),
        result,
        federates_with,
        conflicts: tier.map(|(n, _)| n).collect(),
        broken_selectors,
    }
}

/// [`assign`] for a Pod object, with its namespace's labels looked up in
/// `namespaces` (a namespace not seen yet counts as unlabelled).
pub fn assign_pod<'w>(
    trust_domain: &TrustDomain,
    pod: &k8s_openapi::api::core::v1::Pod,
    namespaces: &kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
    wids: impl IntoIterator<Item = &'w WorkloadIdentity>,
) -> Assignment {
    use kube::ResourceExt;
    let namespace = pod.namespace().unwrap_or_default();
    let namespace_labels = namespaces
        .get(&kube::runtime::reflector::ObjectRef::new(&namespace))
        .map(|ns| ns.labels().clone())
        .unwrap_or_default();
    let spec = pod.spec.as_ref();
    let facts = Pod {
        namespace: &namespace,
        name: pod.metadata.name.as_deref().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default"),
        node_name: spec
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default(),
        labels: pod.labels(),
        namespace_labels: &namespace_labels,
    };
    assign(trust_domain, &facts, wids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use tessera_api::crd::WorkloadIdentitySpec;
    use test_case::test_case;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
            match_labels: None,
        }
    }

    #[test_case(expr("app", "In", &["web", "api"]), true ; "in matches")]
    #[test_case(expr("app", "In", &["db"]), false ; "in misses")]
    #[test_case(expr("app", "NotIn", &["db"]), true ; "not in matches")]
    #[test_case(expr("tier", "NotIn", &["db"]), true ; "not in matches an absent key")]
    #[test_case(expr("app", "Exists", &[]), true ; "exists")]
    #[test_case(expr("tier", "DoesNotExist", &[]), true ; "does not exist")]
    #[test_case(LabelSelector::default(), true ; "empty selector matches all")]
    #[test_case(LabelSelector { match_labels: Some(labels(&[("app", "web"), ("x", "y")])), match_expressions: None }, false ; "all match labels must hold")]
    fn selectors(selector: LabelSelector, want: bool) {
        let l = labels(&[("app", "web")]);
        assert_eq!(selector_matches(Some(&selector), &l), Ok(want));
    }

    #[test]
    fn malformed_selectors_are_errors() {
        let l = labels(&[]);
        assert!(matches!(
            selector_matches(Some(&expr("a", "Near", &["x"])), &l),
            Err(SelectorError::UnknownOperator(_))
        ));
        assert!(matches!(
            selector_matches(Some(&expr("a", "In", &[])), &l),
            Err(SelectorError::BadValues { .. })
        ));
        assert!(matches!(
            selector_matches(Some(&expr("a", "Exists", &["x"])), &l),
            Err(SelectorError::BadValues { .. })
        ));
        assert_eq!(selector_matches(None, &l), Ok(true));
    }

    fn wid(
        name: &str,
        template: &str,
        pod_selector: Option<LabelSelector>,
        fallback: bool,
    ) -> WorkloadIdentity {
        let mut w = WorkloadIdentity::new(
            name,
            WorkloadIdentitySpec {
                spiffe_id_template: template.into(),
                pod_selector,
                namespace_selector: None,
                ttl: None,
                jwt_ttl: None,
                dns_name_templates: Vec::new(),
                federates_with: Vec::new(),
                fallback,
                hint: None,
            },
        );
        w.metadata.name = Some(name.into());
        w
    }

    fn run(wids: &[WorkloadIdentity]) -> Assignment {
        let td: TrustDomain = "cluster.test".parse().unwrap();
        let pod_labels = labels(&[("app", "web")]);
        let ns_labels = labels(&[("team", "shop")]);
        let pod = Pod {
            namespace: "shop",
            name: "web-1",
            service_account: "web-sa",
            node_name: "node-a",
            labels: &pod_labels,
            namespace_labels: &ns_labels,
        };
        assign(&td, &pod, wids)
    }

    #[test]
    fn federates_with_comes_from_the_chosen_workload_identity() {
        let mut chosen = wid("a-web", "spiffe://{trustDomain}/web", None, false);
        chosen.spec.federates_with = vec![
            "c.test".into(),
            "b.test".into(),
            "c.test".into(),
            "cluster.test".into(),
        ];
        let mut other = wid("z-web", "spiffe://{trustDomain}/other", None, false);
        other.spec.federates_with = vec!["d.test".into()];
        let a = run(&[other, chosen]);
        assert_eq!(a.source.as_deref(), Some("a-web"));
        let names: Vec<&str> = a.federates_with.iter().map(TrustDomain::as_str).collect();
        assert_eq!(
            names,
            ["b.test", "c.test"],
            "sorted, once each, never the own trust domain"
        );
        assert!(run(&[]).federates_with.is_empty());
    }

    #[test]
    fn default_when_nothing_selects() {
        let a = run(&[wid(
            "db",
            "spiffe://{trustDomain}/db",
            Some(expr("app", "In", &["db"])),
            false,
        )]);
        assert_eq!(a.source, None);
        assert_eq!(
            a.result.unwrap().as_str(),
            "spiffe://cluster.test/ns/shop/sa/web-sa"
        );
    }

    #[test]
    fn primary_beats_fallback_and_name_order_breaks_ties() {
        let a = run(&[
            wid(
                "zz-fallback",
                "spiffe://{trustDomain}/fb/{podName}",
                None,
                true,
            ),
            wid(
                "b-web",
                "spiffe://{trustDomain}/b/{podLabel:app}",
                Some(expr("app", "Exists", &[])),
                false,
            ),
            wid("a-web", "spiffe://{trustDomain}/a/{nodeName}", None, false),
        ]);
        assert_eq!(a.source.as_deref(), Some("a-web"));
        assert_eq!(a.result.unwrap().as_str(), "spiffe://cluster.test/a/node-a");
        assert_eq!(a.conflicts, ["b-web"]);
        let only_fallback = run(&[wid(
            "zz-fallback",
            "spiffe://{trustDomain}/fb/{podName}",
            None,
            true,
        )]);
        assert_eq!(
            only_fallback.result.unwrap().as_str(),
            "spiffe://cluster.test/fb/web-1"
        );
    }

    #[test]
    fn render_failures_fail_closed() {
        let a = run(&[wid(
            "needs-tier",
            "spiffe://{trustDomain}/{podLabel:tier}",
            None,
            false,
        )]);
        assert!(
            matches!(a.result, Err(AssignError::Template { .. })),
            "{:?}",
            a.result
        );
        let a = run(&[wid("foreign", "spiffe://other.test/x", None, false)]);
        assert!(
            matches!(a.result, Err(AssignError::ForeignTrustDomain { .. })),
            "{:?}",
            a.result
        );
    }

    #[test]
    fn broken_selectors_are_reported_and_skipped() {
        let a = run(&[wid(
            "broken",
            "spiffe://{trustDomain}/x",
            Some(expr("app", "Near", &["x"])),
            false,
        )]);
        assert_eq!(a.source, None);
        assert_eq!(a.broken_selectors.len(), 1);
        assert!(a.result.is_ok());
    }
}
