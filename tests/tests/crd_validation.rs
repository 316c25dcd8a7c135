//! The API server itself rejects invalid Tessera objects.
//!
//! Each case names the schema rules it covers, as JSON pointers into the CRD's
//! `openAPIV3Schema`. `invalid_objects_are_rejected` checks that the real API
//! server refuses the object with a message naming the field and the rule;
//! `each_case_is_rejected_by_the_rules_it_names` removes exactly those rules
//! from the installed CRD and checks that the same object is then accepted, so
//! every case fails when its rule is removed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;
use tessera_api::crd::auth_policy::{
    MSG_EMPTY_PEER, MSG_HEADER_ONE_OF, MSG_HTTP_NEEDS_TCP, MSG_PATH_SLASH, MSG_PORT_RANGE,
    MSG_TERMINATE_ALLOW_ONLY, MSG_TERMINATE_NEEDS, MSG_UDP_NOT_ENFORCED,
};
use tessera_api::crd::federated_trust_domain::{
    MSG_CA_BUNDLE_WEB_ONLY, MSG_SPIFFE_NEEDS_ID, MSG_TD_IMMUTABLE, MSG_WEB_FORBIDS_ID,
};
use tessera_api::crd::schema::{
    MSG_HTTPS_ONLY, MSG_NO_FRAGMENT, MSG_NO_USERINFO, MSG_TEMPLATE_SCHEME,
};
use tessera_tests::{ControlPlane, resources};

const WID: &str = "/properties/spec/properties";
const AP_RULE: &str = "/properties/spec/properties/rules/items/properties";
const AP_PORT: &str = "/properties/spec/properties/rules/items/properties/ports/items";
const AP_PEER: &str = "/properties/spec/properties/rules/items/properties/from/items";
const AP_HTTP: &str = "/properties/spec/properties/rules/items/properties/http/items/properties";
const FTD: &str = "/properties/spec/properties";
const FTD_PROFILE: &str = "/properties/spec/properties/bundleEndpointProfile";

/// One invalid object and the rules that must reject it.
struct Case {
    name: &'static str,
    /// The CRD (by plural) whose schema holds the rules.
    plural: &'static str,
    /// The invalid object; for update cases, what the valid `base` is changed to.
    object: Value,
    /// A valid object stored first, for rules that compare with the old object.
    base: Option<Value>,
    /// JSON pointers into `openAPIV3Schema` of the rules this case covers.
    rules: Vec<String>,
    /// Text the rejection must contain: the field path and the rule's message.
    expect: Vec<&'static str>,
}

fn wid(name: &str, spec: Value) -> Value {
    serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": name}, "spec": spec})
}

fn ap(name: &str, spec: Value) -> Value {
    serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "AuthPolicy",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

fn ftd(name: &str, spec: Value) -> Value {
    serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "FederatedTrustDomain",
        "metadata": {"name": name}, "spec": spec})
}

/// A valid AuthPolicy spec with one rule, with `rule` merged into that rule.
fn ap_rule(rule: Value) -> Value {
    let mut base =
        serde_json::json!({"from": [{"namespaces": ["shop"]}], "ports": [{"port": 8080}]});
    if let (Some(b), Some(r)) = (base.as_object_mut(), rule.as_object()) {
        for (k, v) in r {
            b.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({"selector": {"matchLabels": {"app": "ledger"}}, "rules": [base]})
}

fn ftd_spec(url: &str, profile: Value) -> Value {
    serde_json::json!({"trustDomain": "partner.test", "bundleEndpointURL": url, "bundleEndpointProfile": profile})
}

fn web() -> Value {
    serde_json::json!({"type": "https_web"})
}

fn case(
    name: &'static str,
    plural: &'static str,
    object: Value,
    rules: &[String],
    expect: &[&'static str],
) -> Case {
    Case {
        name,
        plural,
        object,
        base: None,
        rules: rules.to_vec(),
        expect: expect.to_vec(),
    }
}

fn p(prefix: &str, rest: &str) -> String {
    format!("{prefix}{rest}")
}

fn cases() -> Vec<Case> {
    let tmpl = |name, t: &str| wid(name, serde_json::json!({"spiffeIDTemplate": t}));
    let wid_with = |name, extra: Value| {
        let mut spec =
            serde_json::json!({"spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace}"});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        wid(name, spec)
    };
    let long_template = format!(
        "spiffe://{{trustDomain}}/{}",
        "a/".repeat(1100).trim_end_matches('/')
    );
    let bad_url = |name, url: &str| ftd(name, ftd_spec(url, web()));
    let mut immutable = case(
        "ftd-trust-domain-immutable",
        "federatedtrustdomains",
        ftd(
            "immutable",
            serde_json::json!({"trustDomain": "other.test", "bundleEndpointURL": "https://b.test/", "bundleEndpointProfile": web()}),
        ),
        &[p(FTD, "/trustDomain/x-kubernetes-validations/0")],
        &["spec.trustDomain", MSG_TD_IMMUTABLE],
    );
    immutable.base = Some(ftd("immutable", ftd_spec("https://b.test/", web())));
    vec![
        // WorkloadIdentity
        case(
            "wid-template-wrong-scheme",
            "workloadidentities",
            tmpl("t1", "http://{trustDomain}/x"),
            &[
                p(WID, "/spiffeIDTemplate/pattern"),
                p(WID, "/spiffeIDTemplate/x-kubernetes-validations/0"),
            ],
            &["spec.spiffeIDTemplate", MSG_TEMPLATE_SCHEME],
        ),
        case(
            "wid-template-unknown-placeholder",
            "workloadidentities",
            tmpl("t2", "spiffe://{trustDomain}/{podIP}"),
            &[p(WID, "/spiffeIDTemplate/pattern")],
            &["spec.spiffeIDTemplate", "should match"],
        ),
        case(
            "wid-template-dot-segment",
            "workloadidentities",
            tmpl("t3", "spiffe://{trustDomain}/ns/../admin"),
            &[p(WID, "/spiffeIDTemplate/pattern")],
            &["spec.spiffeIDTemplate", "should match"],
        ),
        case(
            "wid-template-query",
            "workloadidentities",
            tmpl("t4", "spiffe://{trustDomain}/a?x=1"),
            &[p(WID, "/spiffeIDTemplate/pattern")],
            &["spec.spiffeIDTemplate", "should match"],
        ),
        case(
            "wid-template-too-long",
            "workloadidentities",
            tmpl("t5", &long_template),
            &[p(WID, "/spiffeIDTemplate/maxLength")],
            &["spec.spiffeIDTemplate", "2048"],
        ),
        case(
            "wid-ttl-not-a-duration",
            "workloadidentities",
            wid_with("t6", serde_json::json!({"ttl": "10 minutes"})),
            &[
                p(WID, "/ttl/pattern"),
                p(WID, "/ttl/x-kubernetes-validations/0"),
            ],
            &["spec.ttl", "should match"],
        ),
        case(
            "wid-ttl-too-short",
            "workloadidentities",
            wid_with("t7", serde_json::json!({"ttl": "1m"})),
            &[p(WID, "/ttl/x-kubernetes-validations/0")],
            &["spec.ttl", "ttl must be between 10m and 720h"],
        ),
        case(
            "wid-jwt-ttl-too-long",
            "workloadidentities",
            wid_with("t8", serde_json::json!({"jwtTTL": "48h"})),
            &[p(WID, "/jwtTTL/x-kubernetes-validations/0")],
            &["spec.jwtTTL", "jwtTTL must be between 1m and 24h"],
        ),
        case(
            "wid-federates-with-upper-case",
            "workloadidentities",
            wid_with("t9", serde_json::json!({"federatesWith": ["Partner.test"]})),
            &[p(WID, "/federatesWith/items/pattern")],
            &["spec.federatesWith[0]", "should match"],
        ),
        case(
            "wid-federates-with-duplicate",
            "workloadidentities",
            wid_with(
                "t10",
                serde_json::json!({"federatesWith": ["a.test", "a.test"]}),
            ),
            &[p(WID, "/federatesWith/x-kubernetes-list-type")],
            &["spec.federatesWith[1]", "Duplicate value"],
        ),
        case(
            "wid-federates-with-empty",
            "workloadidentities",
            wid_with("t11", serde_json::json!({"federatesWith": []})),
            &[p(WID, "/federatesWith/minItems")],
            &["spec.federatesWith", "at least 1 items"],
        ),
        case(
            "wid-hint-too-long",
            "workloadidentities",
            wid_with("t12", serde_json::json!({"hint": "h".repeat(1025)})),
            &[p(WID, "/hint/maxLength")],
            &["spec.hint", "1024"],
        ),
        case(
            "wid-dns-template-upper-case",
            "workloadidentities",
            wid_with(
                "t13",
                serde_json::json!({"dnsNameTemplates": ["Web.{namespace}.svc"]}),
            ),
            &[p(WID, "/dnsNameTemplates/items/pattern")],
            &["spec.dnsNameTemplates[0]", "should match"],
        ),
        // AuthPolicy
        case(
            "ap-port-zero",
            "authpolicies",
            ap("p1", ap_rule(serde_json::json!({"ports": [{"port": 0}]}))),
            &[p(AP_PORT, "/properties/port/minimum")],
            &["spec.rules[0].ports[0].port", "greater than or equal to 1"],
        ),
        case(
            "ap-port-70000",
            "authpolicies",
            ap(
                "p2",
                ap_rule(serde_json::json!({"ports": [{"port": 70000}]})),
            ),
            &[p(AP_PORT, "/properties/port/maximum")],
            &["spec.rules[0].ports[0].port", "less than or equal to 65535"],
        ),
        case(
            "ap-end-port-70000",
            "authpolicies",
            ap(
                "p3",
                ap_rule(serde_json::json!({"ports": [{"port": 80, "endPort": 70000}]})),
            ),
            &[p(AP_PORT, "/properties/endPort/maximum")],
            &[
                "spec.rules[0].ports[0].endPort",
                "less than or equal to 65535",
            ],
        ),
        case(
            "ap-inverted-port-range",
            "authpolicies",
            ap(
                "p4",
                ap_rule(serde_json::json!({"ports": [{"port": 9000, "endPort": 8000}]})),
            ),
            &[p(AP_PORT, "/x-kubernetes-validations/0")],
            &["spec.rules[0].ports[0]", MSG_PORT_RANGE],
        ),
        case(
            "ap-unknown-action",
            "authpolicies",
            ap("p5", serde_json::json!({"selector": {}, "action": "Maybe"})),
            &["/properties/spec/properties/action/enum".into()],
            &["spec.action", "Unsupported value: \"Maybe\""],
        ),
        case(
            "ap-unknown-protocol",
            "authpolicies",
            ap(
                "p6",
                ap_rule(serde_json::json!({"ports": [{"port": 53, "protocol": "SCTP"}]})),
            ),
            // (TCP alone passes the rule that refuses UDP, too.)
            &[
                p(AP_PORT, "/properties/protocol/enum"),
                p(AP_PORT, "/x-kubernetes-validations/1"),
            ],
            &[
                "spec.rules[0].ports[0].protocol",
                "Unsupported value: \"SCTP\"",
            ],
        ),
        case(
            "ap-unknown-authentication",
            "authpolicies",
            ap(
                "p7",
                ap_rule(serde_json::json!({"authentication": "Optional"})),
            ),
            &[p(AP_RULE, "/authentication/enum")],
            &[
                "spec.rules[0].authentication",
                "Unsupported value: \"Optional\"",
            ],
        ),
        case(
            "ap-empty-peer",
            "authpolicies",
            ap("p8", ap_rule(serde_json::json!({"from": [{}]}))),
            &[p(AP_PEER, "/x-kubernetes-validations/0")],
            &["spec.rules[0].from[0]", MSG_EMPTY_PEER],
        ),
        case(
            "ap-spiffe-id-double-slash",
            "authpolicies",
            ap(
                "p9",
                ap_rule(
                    serde_json::json!({"from": [{"spiffeIDs": ["spiffe://example.org/a//b"]}]}),
                ),
            ),
            &[p(AP_PEER, "/properties/spiffeIDs/items/pattern")],
            &["spec.rules[0].from[0].spiffeIDs[0]", "should match"],
        ),
        case(
            "ap-spiffe-id-prefix-dot-segment",
            "authpolicies",
            ap(
                "p10",
                ap_rule(
                    serde_json::json!({"from": [{"spiffeIDPrefixes": ["spiffe://example.org/ns/../admin"]}]}),
                ),
            ),
            &[p(AP_PEER, "/properties/spiffeIDPrefixes/items/pattern")],
            &["spec.rules[0].from[0].spiffeIDPrefixes[0]", "should match"],
        ),
        case(
            "ap-namespace-not-a-label",
            "authpolicies",
            ap(
                "p11",
                ap_rule(serde_json::json!({"from": [{"namespaces": ["Bad_NS"]}]})),
            ),
            &[p(AP_PEER, "/properties/namespaces/items/pattern")],
            &["spec.rules[0].from[0].namespaces[0]", "should match"],
        ),
        case(
            "ap-http-on-udp",
            "authpolicies",
            ap(
                "p12",
                ap_rule(
                    serde_json::json!({"ports": [{"port": 53, "protocol": "UDP"}], "http": [{"methods": ["GET"]}]}),
                ),
            ),
            &[
                "/properties/spec/properties/rules/items/x-kubernetes-validations/0".into(),
                p(AP_PORT, "/x-kubernetes-validations/1"),
            ],
            &["spec.rules[0]", MSG_HTTP_NEEDS_TCP, MSG_UDP_NOT_ENFORCED],
        ),
        case(
            "ap-udp",
            "authpolicies",
            ap(
                "p12e",
                ap_rule(serde_json::json!({"ports": [{"port": 53, "protocol": "UDP"}]})),
            ),
            &[p(AP_PORT, "/x-kubernetes-validations/1")],
            &["spec.rules[0].ports[0]", MSG_UDP_NOT_ENFORCED],
        ),
        case(
            "ap-terminate-without-ports",
            "authpolicies",
            ap(
                "p12b",
                serde_json::json!({"selector": {}, "rules": [{"from": [{"trustDomains": ["b.test"]}], "externalPeers": "TerminateTLS"}]}),
            ),
            &["/properties/spec/properties/rules/items/x-kubernetes-validations/1".into()],
            &["spec.rules[0]", MSG_TERMINATE_NEEDS],
        ),
        case(
            "ap-terminate-without-authentication",
            "authpolicies",
            ap(
                "p12c",
                ap_rule(
                    serde_json::json!({"authentication": "None", "externalPeers": "TerminateTLS"}),
                ),
            ),
            &["/properties/spec/properties/rules/items/x-kubernetes-validations/1".into()],
            &["spec.rules[0]", MSG_TERMINATE_NEEDS],
        ),
        case(
            "ap-terminate-in-deny",
            "authpolicies",
            ap("p12d", {
                let mut spec = ap_rule(serde_json::json!({"externalPeers": "TerminateTLS"}));
                spec["action"] = "Deny".into();
                spec
            }),
            &["/properties/spec/x-kubernetes-validations/0".into()],
            &["spec", MSG_TERMINATE_ALLOW_ONLY],
        ),
        case(
            "ap-path-without-slash",
            "authpolicies",
            ap(
                "p13",
                ap_rule(
                    serde_json::json!({"http": [{"paths": [{"type": "Prefix", "value": "invoices"}]}]}),
                ),
            ),
            &[p(AP_HTTP, "/paths/items/x-kubernetes-validations/0")],
            &["spec.rules[0].http[0].paths[0]", MSG_PATH_SLASH],
        ),
        case(
            "ap-header-exact-and-prefix",
            "authpolicies",
            ap(
                "p14",
                ap_rule(
                    serde_json::json!({"http": [{"headers": [{"name": "x-a", "exact": "1", "prefix": "1"}]}]}),
                ),
            ),
            &[p(AP_HTTP, "/headers/items/x-kubernetes-validations/0")],
            &["spec.rules[0].http[0].headers[0]", MSG_HEADER_ONE_OF],
        ),
        case(
            "ap-unknown-method",
            "authpolicies",
            ap(
                "p15",
                ap_rule(serde_json::json!({"http": [{"methods": ["FETCH"]}]})),
            ),
            &[p(AP_HTTP, "/methods/items/enum")],
            &[
                "spec.rules[0].http[0].methods[0]",
                "Unsupported value: \"FETCH\"",
            ],
        ),
        // FederatedTrustDomain
        case(
            "ftd-https-spiffe-without-endpoint-id",
            "federatedtrustdomains",
            ftd(
                "f1",
                ftd_spec(
                    "https://b.test/",
                    serde_json::json!({"type": "https_spiffe"}),
                ),
            ),
            &[p(FTD_PROFILE, "/x-kubernetes-validations/0")],
            &["spec.bundleEndpointProfile", MSG_SPIFFE_NEEDS_ID],
        ),
        case(
            "ftd-https-web-with-endpoint-id",
            "federatedtrustdomains",
            ftd(
                "f2",
                ftd_spec(
                    "https://b.test/",
                    serde_json::json!({"type": "https_web", "endpointSPIFFEID": "spiffe://b.test/spire/server"}),
                ),
            ),
            &[p(FTD_PROFILE, "/x-kubernetes-validations/1")],
            &["spec.bundleEndpointProfile", MSG_WEB_FORBIDS_ID],
        ),
        case(
            "ftd-https-spiffe-with-ca-bundle",
            "federatedtrustdomains",
            ftd(
                "f2b",
                ftd_spec(
                    "https://b.test/",
                    serde_json::json!({"type": "https_spiffe", "endpointSPIFFEID": "spiffe://b.test/spire/server", "caBundle": "-----BEGIN CERTIFICATE-----"}),
                ),
            ),
            &[p(FTD_PROFILE, "/x-kubernetes-validations/2")],
            &["spec.bundleEndpointProfile", MSG_CA_BUNDLE_WEB_ONLY],
        ),
        case(
            "ftd-http-url",
            "federatedtrustdomains",
            bad_url("f3", "http://b.test/bundle"),
            &[p(FTD, "/bundleEndpointURL/x-kubernetes-validations/0")],
            &["spec.bundleEndpointURL", MSG_HTTPS_ONLY],
        ),
        case(
            "ftd-url-with-userinfo",
            "federatedtrustdomains",
            bad_url("f4", "https://user:secret@b.test/bundle"),
            &[p(FTD, "/bundleEndpointURL/x-kubernetes-validations/1")],
            &["spec.bundleEndpointURL", MSG_NO_USERINFO],
        ),
        case(
            "ftd-url-with-fragment",
            "federatedtrustdomains",
            bad_url("f5", "https://b.test/bundle#keys"),
            &[p(FTD, "/bundleEndpointURL/x-kubernetes-validations/2")],
            &["spec.bundleEndpointURL", MSG_NO_FRAGMENT],
        ),
        case(
            "ftd-trust-domain-upper-case",
            "federatedtrustdomains",
            ftd(
                "f6",
                serde_json::json!({"trustDomain": "Partner.test", "bundleEndpointURL": "https://b.test/", "bundleEndpointProfile": web()}),
            ),
            &[p(FTD, "/trustDomain/pattern")],
            &["spec.trustDomain", "should match"],
        ),
        case(
            "ftd-unknown-profile",
            "federatedtrustdomains",
            ftd(
                "f7",
                ftd_spec("https://b.test/", serde_json::json!({"type": "https_jwks"})),
            ),
            &[p(FTD_PROFILE, "/properties/type/enum")],
            &[
                "spec.bundleEndpointProfile.type",
                "Unsupported value: \"https_jwks\"",
            ],
        ),
        case(
            "ftd-endpoint-id-not-spiffe",
            "federatedtrustdomains",
            ftd(
                "f8",
                ftd_spec(
                    "https://b.test/",
                    serde_json::json!({"type": "https_spiffe", "endpointSPIFFEID": "spiffe://B.test/server"}),
                ),
            ),
            &[p(FTD_PROFILE, "/properties/endpointSPIFFEID/pattern")],
            &[
                "spec.bundleEndpointProfile.endpointSPIFFEID",
                "should match",
            ],
        ),
        case(
            "ftd-refresh-too-short",
            "federatedtrustdomains",
            ftd(
                "f9",
                serde_json::json!({"trustDomain": "b.test", "bundleEndpointURL": "https://b.test/", "bundleEndpointProfile": web(), "refreshInterval": "5s"}),
            ),
            &[p(FTD, "/refreshInterval/x-kubernetes-validations/0")],
            &[
                "spec.refreshInterval",
                "refreshInterval must be between 30s and 24h",
            ],
        ),
        case(
            "ftd-bundle-too-large",
            "federatedtrustdomains",
            ftd(
                "f10",
                serde_json::json!({"trustDomain": "b.test", "bundleEndpointURL": "https://b.test/", "bundleEndpointProfile": web(), "trustDomainBundle": "x".repeat(300_000)}),
            ),
            &[p(FTD, "/trustDomainBundle/maxLength")],
            &["spec.trustDomainBundle", "262144"],
        ),
        immutable,
    ]
}

fn dynamic(obj: &Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(obj.clone())?)
}

/// Creates the case's object (or, for update cases, patches the stored base
/// into it); `dry_run` validates without storing.
async fn submit(client: &kube::Client, case: &Case, dry_run: bool) -> Result<(), kube::Error> {
    let obj = dynamic(&case.object).map_err(|e| kube::Error::Service(e.into()))?;
    if case.base.is_none() {
        return resources::create(client, &obj, dry_run).await.map(|_| ());
    }
    let (api, _) = resources::dynamic_api(client, &obj)
        .await
        .map_err(|e| kube::Error::Service(e.into()))?;
    let params = PatchParams {
        dry_run,
        ..Default::default()
    };
    let name = obj.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &params, &Patch::Merge(&case.object))
        .await
        .map(|_| ())
}

async fn setup() -> Result<(ControlPlane, kube::Client)> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    for case in cases() {
        if let Some(base) = &case.base {
            resources::create(&client, &dynamic(base)?, false)
                .await
                .with_context(|| format!("{}: creating the valid base object", case.name))?;
        }
    }
    Ok((cp, client))
}

#[tokio::test]
async fn invalid_objects_are_rejected() -> Result<()> {
    let cases = cases();
    assert!(
        cases.len() >= 15,
        "the issue asks for at least 15 invalid objects"
    );
    let (_cp, client) = setup().await?;
    let mut failures = Vec::new();
    for case in &cases {
        match submit(&client, case, false).await {
            Ok(()) => failures.push(format!("{}: the API server accepted it", case.name)),
            Err(e) => {
                let msg = resources::api_message(&e);
                let missing: Vec<_> = case.expect.iter().filter(|s| !msg.contains(**s)).collect();
                if !missing.is_empty() {
                    failures.push(format!(
                        "{}: rejection lacks {missing:?}; it said: {msg}",
                        case.name
                    ));
                }
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Removes the value at a JSON pointer; fails when there is nothing there.
fn remove_pointer(root: &mut Value, pointer: &str) -> Result<()> {
    let (parent, last) = pointer.rsplit_once('/').context("pointer without '/'")?;
    let parent = root
        .pointer_mut(parent)
        .with_context(|| format!("{parent} is not in the schema"))?;
    let removed = match parent {
        Value::Object(map) => map.remove(last).is_some(),
        Value::Array(items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    };
    if !removed {
        bail!("{pointer} is not in the schema");
    }
    Ok(())
}

#[tokio::test]
async fn each_case_is_rejected_by_the_rules_it_names() -> Result<()> {
    let (_cp, client) = setup().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(resources::FIELD_MANAGER).force();
    let mut failures = Vec::new();
    for case in cases() {
        let original = tessera_api::crd::all()
            .into_iter()
            .find(|c| c.spec.names.plural == case.plural)
            .context("unknown plural")?;
        let mut crd = serde_json::to_value(&original)?;
        let schema = crd
            .pointer_mut("/spec/versions/0/schema/openAPIV3Schema")
            .context("CRD without a schema")?;
        // Later pointers may index into arrays that earlier removals shift.
        for pointer in case.rules.iter().rev() {
            remove_pointer(schema, pointer).with_context(|| case.name)?;
        }
        let name = original.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("{}: applying the CRD without {:?}", case.name, case.rules))?;
        // The API server picks up the changed schema asynchronously.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match submit(&client, &case, true).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    failures.push(format!(
                        "{}: still rejected without {:?}: {}",
                        case.name,
                        case.rules,
                        resources::api_message(&e)
                    ));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} cases are not covered by the rules they name:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
