//! What Operator Lifecycle Manager creates from the bundle in `olm/bundle/`
//! when it installs Tessera in AllNamespaces mode, so tests can apply the
//! same objects to the test API server: a ServiceAccount per account the
//! CSV names, a ClusterRole and ClusterRoleBinding per `clusterPermissions`
//! entry, a Role and RoleBinding in the install namespace per `permissions`
//! entry, the CSV's Deployments, and the bundle's other manifests (CRDs,
//! Services, the PodDisruptionBudget) with the install namespace set.

pub mod catalog;

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The bundle's manifests, parsed: the CSV and the other objects.
#[derive(Debug)]
pub struct Bundle {
    /// The ClusterServiceVersion.
    pub csv: Value,
    /// Every other manifest, in file-name order.
    pub others: Vec<Value>,
}

impl Bundle {
    /// Reads `<dir>/manifests/`.
    pub fn read(dir: &Path) -> Result<Bundle> {
        let manifests = dir.join("manifests");
        let mut paths: Vec<_> = std::fs::read_dir(&manifests)
            .with_context(|| format!("cannot list {}", manifests.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        paths.sort();
        let (mut csv, mut others) = (None, Vec::new());
        for path in paths {
            let text = std::fs::read_to_string(&path)?;
            let object: Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not YAML", path.display()))?;
            if object["kind"] == "ClusterServiceVersion" {
                csv = Some(object);
            } else {
                others.push(object);
            }
        }
        let csv = csv.context("the bundle has no ClusterServiceVersion")?;
        Ok(Bundle { csv, others })
    }

    /// The objects OLM creates for this bundle in `namespace`, in an order
    /// that applies: CRDs, accounts, RBAC, then the workloads and Services.
    pub fn install_objects(&self, namespace: &str) -> Result<Vec<Value>> {
        let install = &self.csv["spec"]["install"]["spec"];
        let mut crds = Vec::new();
        let mut namespaced = Vec::new();
        for object in &self.others {
            if object["kind"] == "CustomResourceDefinition" {
                crds.push(object.clone());
            } else {
                let mut object = object.clone();
                object["metadata"]["namespace"] = json!(namespace);
                namespaced.push(object);
            }
        }
        let mut accounts = Vec::new();
        let mut rbac = Vec::new();
        let csv_name = self.csv["metadata"]["name"].as_str().unwrap_or("csv");
        for (field, cluster) in [("clusterPermissions", true), ("permissions", false)] {
            for (i, entry) in list(&install[field]).iter().enumerate() {
                let account = entry["serviceAccountName"]
                    .as_str()
                    .with_context(|| format!("{field}[{i}] names no serviceAccountName"))?;
                if !accounts.contains(&account) {
                    accounts.push(account);
                }
                let name = format!("{csv_name}-{account}-{i}");
                rbac.extend(role_and_binding(
                    &name,
                    account,
                    &entry["rules"],
                    namespace,
                    cluster,
                ));
            }
        }
        let mut objects = crds;
        objects.extend(accounts.iter().map(|a| {
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": a, "namespace": namespace}})
        }));
        objects.extend(rbac);
        for deployment in list(&install["deployments"]) {
            let Some(name) = deployment["name"].as_str() else {
                bail!("a deployment of the CSV has no name");
            };
            objects.push(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": deployment["label"].clone()},
                "spec": deployment["spec"].clone(),
            }));
        }
        objects.extend(namespaced);
        Ok(objects)
    }
}

/// The elements of a JSON array (none for anything else).
fn list(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// A (Cluster)Role with `rules` and its binding to `account`.
fn role_and_binding(
    name: &str,
    account: &str,
    rules: &Value,
    namespace: &str,
    cluster: bool,
) -> [Value; 2] {
    let (role_kind, binding_kind) = if cluster {
        ("ClusterRole", "ClusterRoleBinding")
    } else {
        ("Role", "RoleBinding")
    };
    let mut metadata = json!({"name": name});
    if !cluster {
        metadata["namespace"] = json!(namespace);
    }
    [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": role_kind,
               "metadata": metadata.clone(), "rules": rules.clone()}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding_kind,
               "metadata": metadata,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}),
    ]
}

/// `objects` as one multi-document YAML stream.
pub fn to_yaml(objects: &[Value]) -> Result<String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out)
}
