//! The OLM bundle (`olm/bundle/`, generated and drift-checked like
//! `deploy/`): a ClusterServiceVersion describing the operator's
//! Deployment, the permissions of both service accounts (OLM creates the
//! accounts) and the CRDs, the CRDs themselves, the leader-only Services
//! and the PodDisruptionBudget, `metadata/annotations.yaml` and
//! `bundle.Dockerfile`.
//!
//! The manifests hold only kinds operator-registry accepts in a bundle: no
//! ServiceAccount, no DaemonSet. The agent's DaemonSet is the operator's to
//! create from the `RELATED_IMAGE_AGENT` image the CSV gives it.

use base64::Engine as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use super::{InstallError, NAMESPACE, OPERATOR, Settings, rbac, workloads, yaml_stream};

/// The package's name in a catalog.
pub const PACKAGE: &str = "tessera";
/// The channel the bundle is published in: `candidate` for releases before
/// 1.0, by OLM's channel naming convention (`candidate`, `fast`, `stable`,
/// each with an optional version suffix).
pub const CHANNEL: &str = "candidate-v0";
/// The CSV's `maturity`: the API is still `v1alpha1`.
pub const MATURITY: &str = "alpha";
/// The oldest Kubernetes the bundle installs on: CRD validation rules
/// with messages and field paths, bound service account tokens with node
/// claims, and the kernels of its nodes' distributions.
pub const MIN_KUBE_VERSION: &str = "1.30.0";
/// The environment variable the CSV gives the operator the agent's image in
/// (OLM rewrites `RELATED_IMAGE_*` values when it mirrors images).
pub const RELATED_IMAGE_AGENT: &str = "RELATED_IMAGE_AGENT";

/// Tessera's icon: a tessellation of four tiles, one authenticated.
const ICON_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><rect width="64" height="64" rx="10" fill="#12355b"/><rect x="8" y="8" width="22" height="22" rx="3" fill="#8ecae6"/><rect x="34" y="8" width="22" height="22" rx="3" fill="#8ecae6"/><rect x="8" y="34" width="22" height="22" rx="3" fill="#8ecae6"/><rect x="34" y="34" width="22" height="22" rx="3" fill="#ffb703"/></svg>"##;

/// The examples shown in OperatorHub, one per kind users write.
const EXAMPLES: [&str; 3] = [
    include_str!("../../../crds/examples/workloadidentity-default.yaml"),
    include_str!("../../../crds/examples/authpolicy-mutual.yaml"),
    include_str!("../../../crds/examples/federatedtrustdomain-spiffe.yaml"),
];

/// The CSV's name: `<package>.v<version>`.
pub fn csv_name(settings: &Settings) -> String {
    format!("{PACKAGE}.v{}", settings.version)
}

/// The files of `olm/bundle/`.
pub fn files(settings: &Settings) -> Result<crate::generated::Files, InstallError> {
    let mut files = vec![(
        "manifests/tessera.clusterserviceversion.yaml".to_owned(),
        yaml_stream("the CSV", &[csv(settings)?])?,
    )];
    for crd in crate::crd::all() {
        files.push((
            format!("manifests/{}", crate::crd::file_name(&crd)),
            crate::crd::to_yaml(&crd)?,
        ));
    }
    // The Services and the PodDisruptionBudget, as `deploy/` has them,
    // without a namespace: OLM puts them in the operator's.
    for mut object in workloads::operator(settings).into_iter().skip(1) {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        files.push((
            format!("manifests/{name}_{kind}.yaml"),
            yaml_stream(&name, &[object])?,
        ));
    }
    files.push((
        "metadata/annotations.yaml".to_owned(),
        yaml_stream(
            "annotations.yaml",
            &[json!({"annotations": annotations()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::from(v)))
                .collect::<serde_json::Map<String, Value>>()})],
        )?,
    ));
    files.push(("bundle.Dockerfile".to_owned(), dockerfile()));
    Ok(crate::generated::Files {
        source_code: "api/src/install/olm.rs",
        files,
    })
}

/// The bundle's annotations (`metadata/annotations.yaml`), which the
/// Dockerfile repeats as labels.
pub fn annotations() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "operators.operatorframework.io.bundle.mediatype.v1",
            "registry+v1",
        ),
        (
            "operators.operatorframework.io.bundle.manifests.v1",
            "manifests/",
        ),
        (
            "operators.operatorframework.io.bundle.metadata.v1",
            "metadata/",
        ),
        ("operators.operatorframework.io.bundle.package.v1", PACKAGE),
        ("operators.operatorframework.io.bundle.channels.v1", CHANNEL),
        (
            "operators.operatorframework.io.bundle.channel.default.v1",
            CHANNEL,
        ),
    ]
}

fn dockerfile() -> String {
    let mut out = String::from(
        "# Generated from api/src/install/olm.rs by `cargo xtask generate`. Do not edit.\nFROM scratch\n\n",
    );
    for (key, value) in annotations() {
        out.push_str(&format!("LABEL {key}={value}\n"));
    }
    out.push_str("\nCOPY manifests /manifests/\nCOPY metadata /metadata/\n");
    out
}

/// The ClusterServiceVersion.
fn csv(settings: &Settings) -> Result<Value, InstallError> {
    let mut examples = Vec::new();
    for text in EXAMPLES {
        let example: Value = serde_yaml::from_str(text).map_err(|source| InstallError::Yaml {
            what: "an example in crds/examples".into(),
            source,
        })?;
        examples.push(example);
    }
    let internal: Vec<String> = crate::crd::all()
        .iter()
        .filter(|c| !is_user_facing(c))
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    let json_text = |what: &str, v: &Value| {
        serde_json::to_string(v).map_err(|source| InstallError::Json {
            what: what.to_owned(),
            source,
        })
    };
    let icon = base64::engine::general_purpose::STANDARD.encode(ICON_SVG);
    Ok(json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": csv_name(settings),
            "namespace": "placeholder",
            "annotations": {
                "alm-examples": json_text("alm-examples", &Value::Array(examples))?,
                "capabilities": "Basic Install",
                "categories": "Security, Networking",
                "containerImage": settings.image(OPERATOR),
                "description": "SPIFFE identities for every workload and mutual authentication between workloads, enforced in the kernel without sidecars.",
                "support": "Tessera",
                "operators.operatorframework.io/internal-objects": json_text("internal objects", &json!(internal))?,
                "operatorframework.io/suggested-namespace": NAMESPACE,
            },
        },
        "spec": {
            "displayName": "Tessera",
            "description": DESCRIPTION,
            "version": settings.version,
            "minKubeVersion": MIN_KUBE_VERSION,
            "maturity": MATURITY,
            "keywords": ["spiffe", "mtls", "identity", "ebpf", "zero trust"],
            "maintainers": [{"name": "Tessera", "email": "security@tessera.dev"}],
            "provider": {"name": "Tessera"},
            "links": [{"name": "Security", "url": "https://tessera.dev/security"}],
            "icon": [{"base64data": icon, "mediatype": "image/svg+xml"}],
            "installModes": [
                {"type": "OwnNamespace", "supported": false},
                {"type": "SingleNamespace", "supported": false},
                {"type": "MultiNamespace", "supported": false},
                {"type": "AllNamespaces", "supported": true},
            ],
            "customresourcedefinitions": {"owned": crate::crd::all().iter().map(owned).collect::<Vec<_>>()},
            "install": {"strategy": "deployment", "spec": install(settings)},
            "relatedImages": [
                {"name": "tessera-operator", "image": settings.image(OPERATOR)},
                {"name": "tessera-agent", "image": settings.image(super::AGENT)},
            ],
        },
    }))
}

const DESCRIPTION: &str = "Tessera gives every pod a SPIFFE identity and enforces mutual \
authentication between workloads in the kernel, without sidecars.\n\n\
* **WorkloadIdentity** chooses the SPIFFE ID of the pods it selects.\n\
* **AuthPolicy** says which identities may reach which ports of the pods it selects, \
and whether both sides must be authenticated first.\n\
* **FederatedTrustDomain** trusts another SPIFFE trust domain through its bundle endpoint.\n\n\
A node agent on every node issues SVIDs over the SPIFFE Workload API, authenticates \
workload pairs with the other agents (mutual TLS 1.3) and enforces the result with eBPF.";

fn is_user_facing(crd: &CustomResourceDefinition) -> bool {
    crd.spec.names.categories.as_deref() == Some(&["tessera".to_owned()][..])
}

/// A CRD as the CSV owns it: its top-level spec fields as spec descriptors
/// and its status conditions as a status descriptor.
fn owned(crd: &CustomResourceDefinition) -> Value {
    let version = crd.spec.versions.iter().find(|v| v.storage);
    let schema = version
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref());
    let field = |name: &str| schema.and_then(|s| s.properties.as_ref()?.get(name).cloned());
    let describe = |s: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps| {
        s.description.clone().unwrap_or_default()
    };
    let mut spec_descriptors = Vec::new();
    if let Some(props) = field("spec").and_then(|s| s.properties) {
        for (path, prop) in props {
            spec_descriptors.push(json!({
                "path": path,
                "displayName": display_name(&path),
                "description": first_sentence(&describe(&prop)),
            }));
        }
    }
    let mut status_descriptors = Vec::new();
    if field("status")
        .and_then(|s| s.properties)
        .is_some_and(|p| p.contains_key("conditions"))
    {
        status_descriptors.push(json!({
            "path": "conditions",
            "displayName": "Conditions",
            "description": "What the operator found, one condition per aspect.",
            "x-descriptors": ["urn:alm:descriptor:io.kubernetes.conditions"],
        }));
    }
    let kind = &crd.spec.names.kind;
    json!({
        "name": crd.metadata.name,
        "version": version.map(|v| v.name.clone()).unwrap_or_default(),
        "kind": kind,
        "displayName": display_name(kind),
        "description": kind_description(kind),
        "specDescriptors": spec_descriptors,
        "statusDescriptors": status_descriptors,
    })
}

/// `spiffeIDTemplate` -> `SPIFFE ID Template`, `AuthPolicy` -> `Auth Policy`.
fn display_name(name: &str) -> String {
    let name = name
        .replace("spiffeID", "SPIFFEID")
        .replace("SPIFFEID", "SPIFFE ID ");
    let mut out = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = c.is_lowercase();
        if out.is_empty() {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
    }
    out.split_whitespace()
        .map(|w| match w {
            "Dns" => "DNS",
            "Jwt" => "JWT",
            "Ttl" => "TTL",
            "Url" => "URL",
            "Id" => "ID",
            w => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What each kind is, as OperatorHub shows it.
fn kind_description(kind: &str) -> &'static str {
    match kind {
        "WorkloadIdentity" => {
            "Chooses the SPIFFE ID (and SVID lifetimes, DNS names, federation) of the pods it selects."
        }
        "AuthPolicy" => {
            "Which identities may reach which ports of the pods it selects, and whether both sides must be authenticated first."
        }
        "FederatedTrustDomain" => {
            "Another SPIFFE trust domain whose bundle is fetched from its bundle endpoint and trusted for its own identities."
        }
        "NumericIdentity" => {
            "Internal: the numeric identity and generation the data path knows a SPIFFE ID by."
        }
        "IdentityCounter" => "Internal: the allocator of numeric identities.",
        "IdentityPolicy" => {
            "Internal: the AuthPolicies that select an identity, compiled for the node agents."
        }
        "PodIdentity" => {
            "Internal: the identity the operator assigned to one pod; only the operator writes it."
        }
        _ => "",
    }
}

fn first_sentence(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.find(". ") {
        Some(end) => flat[..=end].to_owned(),
        None => flat,
    }
}

/// The install strategy: both accounts' permissions, split cluster-wide
/// and namespaced as the roles of `deploy/` are, and the operator's
/// Deployment, told the agent's image.
fn install(settings: &Settings) -> Value {
    let rules = |account: &rbac::Account, namespaced: bool| -> Value {
        json!({
            "serviceAccountName": account.name,
            "rules": account.grants.iter().filter(|g| g.namespaced == namespaced).map(rbac::rule).collect::<Vec<_>>(),
        })
    };
    let mut accounts = rbac::accounts();
    for account in &mut accounts {
        if account.name == OPERATOR {
            account.grants.extend(rbac::operator_runs_agents());
        }
    }
    let mut deployment = workloads::operator(settings)
        .into_iter()
        .next()
        .unwrap_or_default();
    if let Some(env) = deployment
        .pointer_mut("/spec/template/spec/containers/0/env")
        .and_then(Value::as_array_mut)
    {
        env.push(json!({"name": RELATED_IMAGE_AGENT, "value": settings.image(super::AGENT)}));
    }
    json!({
        "clusterPermissions": accounts.iter().map(|a| rules(a, false)).collect::<Vec<_>>(),
        "permissions": accounts.iter().map(|a| rules(a, true)).collect::<Vec<_>>(),
        "deployments": [{
            "name": OPERATOR,
            "label": deployment["metadata"]["labels"],
            "spec": deployment["spec"],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `olm/bundle/` must match this code.
    #[test]
    fn checked_in_bundle_matches_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../olm/bundle");
        files(&Settings::default()).unwrap().check(&dir).unwrap();
    }

    /// operator-registry accepts only some kinds in a bundle's manifests:
    /// never a ServiceAccount (OLM makes them from the CSV) or a workload
    /// other than the CSV's Deployment.
    #[test]
    fn manifests_hold_only_kinds_a_bundle_may() {
        const ALLOWED: &[&str] = &[
            "ClusterServiceVersion",
            "CustomResourceDefinition",
            "Service",
            "PodDisruptionBudget",
            "ConfigMap",
            "Secret",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "PrometheusRule",
            "ServiceMonitor",
            "PriorityClass",
            "VerticalPodAutoscaler",
        ];
        for (name, text) in files(&Settings::default()).unwrap().files {
            if !name.starts_with("manifests/") {
                continue;
            }
            let object: Value = serde_yaml::from_str(&text).unwrap();
            let kind = object["kind"].as_str().unwrap();
            assert!(ALLOWED.contains(&kind), "{name}: {kind}");
        }
    }

    #[test]
    fn the_dockerfile_labels_are_the_annotations() {
        let files = files(&Settings::default()).unwrap().files;
        let text = |n: &str| files.iter().find(|(f, _)| f == n).unwrap().1.clone();
        let annotations: Value = serde_yaml::from_str(&text("metadata/annotations.yaml")).unwrap();
        let labels: Vec<(String, String)> = text("bundle.Dockerfile")
            .lines()
            .filter_map(|l| l.strip_prefix("LABEL "))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let held = annotations["annotations"].as_object().unwrap();
        assert_eq!(labels.len(), held.len());
        for (k, v) in labels {
            assert_eq!(held[&k], json!(v), "{k}");
        }
    }

    #[test]
    fn the_csv_hides_internal_kinds_and_gives_the_agent_image() {
        let csv = csv(&Settings::default()).unwrap();
        let internal: Vec<String> = serde_json::from_str(
            csv["metadata"]["annotations"]["operators.operatorframework.io/internal-objects"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(internal.len(), 4);
        assert!(internal.iter().all(|n| !n.starts_with("authpolicies.")));
        let env = &csv["spec"]["install"]["spec"]["deployments"][0]["spec"]["template"]["spec"]["containers"]
            [0]["env"];
        assert!(
            env.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == RELATED_IMAGE_AGENT)
        );
        let examples: Vec<Value> = serde_json::from_str(
            csv["metadata"]["annotations"]["alm-examples"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let kinds: Vec<&str> = examples
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["WorkloadIdentity", "AuthPolicy", "FederatedTrustDomain"]
        );
    }

    #[test]
    fn display_names_read_as_words() {
        assert_eq!(display_name("AuthPolicy"), "Auth Policy");
        assert_eq!(display_name("spiffeIDTemplate"), "SPIFFE ID Template");
        assert_eq!(display_name("selector"), "Selector");
        assert_eq!(display_name("jwtTTL"), "JWT TTL");
        assert_eq!(display_name("dnsNameTemplates"), "DNS Name Templates");
    }
}
