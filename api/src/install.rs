//! What installs Tessera in a cluster, generated from this code into
//! `deploy/` (and drift-checked like `crds/`): the namespace, the CRDs, one
//! service account and least-privilege role per binary, the operator's
//! Deployment and leader-only Services, the agent's DaemonSet and a
//! kustomization.
//!
//! The names the binaries and the manifests must agree on are in
//! [`crate::names`].

use std::collections::BTreeMap;

pub mod olm;
pub mod rbac;
pub mod workloads;

pub use crate::names::*;

/// Label every object of the installation carries.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "tessera");

/// Why the installation manifests could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Serializing an object to YAML failed.
    #[error("could not serialize {what} to YAML: {source}")]
    Yaml {
        /// Which object or file.
        what: String,
        /// The serializer's error.
        source: serde_yaml::Error,
    },
    /// Converting an object to JSON failed.
    #[error("could not convert {what} to JSON: {source}")]
    Json {
        /// Which object.
        what: String,
        /// The serializer's error.
        source: serde_json::Error,
    },
    /// The CRDs could not be rendered.
    #[error(transparent)]
    Crd(#[from] crate::crd::CrdError),
}

/// What varies between installations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Repository prefix of the images: `<registry>/<binary>:<version>`
    /// (what `cargo xtask images` names them).
    pub registry: String,
    /// The images' tag.
    pub version: String,
    /// The trust domain of the cluster's identities.
    pub trust_domain: String,
    /// The cgroup (v2) the agent attaches its programs to: the parent of
    /// the node's pod cgroups, as the kubelet's cgroup driver names it.
    pub cgroup_root: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            registry: "localhost/tessera".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cgroup_root: "/sys/fs/cgroup/kubepods.slice".to_owned(),
        }
    }
}

impl Settings {
    /// The image of `binary` (`tessera-operator`, `tessera-agent`, ...).
    pub fn image(&self, binary: &str) -> String {
        format!("{}/{binary}:{}", self.registry, self.version)
    }
}

/// The labels of every object of the installation, plus `extra`.
pub fn labels(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    std::iter::once(PART_OF)
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The files of `deploy/`.
pub fn files(settings: &Settings) -> Result<crate::generated::Files, InstallError> {
    let mut crds = Vec::new();
    for crd in crate::crd::all() {
        crds.push(
            serde_json::to_value(&crd).map_err(|source| InstallError::Json {
                what: format!("CRD {}", crd.metadata.name.clone().unwrap_or_default()),
                source,
            })?,
        );
    }
    let documents: [(&str, Vec<serde_json::Value>); 6] = [
        ("namespace.yaml", vec![workloads::namespace()]),
        ("crds.yaml", crds),
        ("rbac-operator.yaml", rbac::objects(&rbac::operator())),
        ("rbac-agent.yaml", rbac::objects(&rbac::agent())),
        ("operator.yaml", workloads::operator(settings)),
        ("agent.yaml", vec![workloads::agent_daemonset(settings)]),
    ];
    let mut files = Vec::new();
    let mut resources = Vec::new();
    for (name, objects) in documents {
        files.push((name.to_owned(), yaml_stream(name, &objects)?));
        // The namespace is applied on its own, first, and left by
        // `kubectl delete -k` (it holds the CA Secret).
        if name != "namespace.yaml" {
            resources.push(name);
        }
    }
    let kustomization = serde_json::json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    files.push((
        "kustomization.yaml".to_owned(),
        yaml_stream("kustomization.yaml", &[kustomization])?,
    ));
    files.push(("RBAC.md".to_owned(), rbac::markdown()));
    Ok(crate::generated::Files {
        source_code: "api/src/install",
        files,
    })
}

/// `objects` as one YAML stream with a header naming the generator.
fn yaml_stream(name: &str, objects: &[serde_json::Value]) -> Result<String, InstallError> {
    let mut out =
        String::from("# Generated from api/src/install by `cargo xtask generate`. Do not edit.\n");
    for (i, object) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(object).map_err(|source| InstallError::Yaml {
                what: name.to_owned(),
                source,
            })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `deploy/` must match this code (the same check as
    /// `cargo xtask generate --check`).
    #[test]
    fn checked_in_deploy_matches_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        files(&Settings::default()).unwrap().check(&dir).unwrap();
    }

    #[test]
    fn the_kustomization_lists_every_manifest_but_the_namespace() {
        let files = files(&Settings::default()).unwrap().files;
        let (_, kustomization) = files
            .iter()
            .find(|(n, _)| n == "kustomization.yaml")
            .unwrap();
        for (name, _) in &files {
            let listed = kustomization.contains(&format!("- {name}\n"));
            let manifest = name.ends_with(".yaml") && name != "kustomization.yaml";
            assert_eq!(listed, manifest && name != "namespace.yaml", "{name}");
        }
    }

    #[test]
    fn images_are_named_as_cargo_xtask_images_names_them() {
        let s = Settings::default();
        assert_eq!(
            s.image("tessera-agent"),
            format!(
                "localhost/tessera/tessera-agent:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
