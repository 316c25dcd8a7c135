//! The `tessera.dev/v1alpha1` custom resources.
//!
//! Validation lives in the schemas (OpenAPI bounds, patterns and CEL
//! `x-kubernetes-validations`), so the API server rejects bad objects before any
//! controller sees them. Fields that carry SPIFFE IDs or trust domains stay
//! strings here; controllers parse them with [`crate::spiffe`] and report
//! failures in status, so one odd object never stops a watch.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub mod auth_policy;
pub mod federated_trust_domain;
pub mod identity;
pub mod identity_policy;
pub mod installed;
pub mod pod_identity;
pub mod schema;
pub mod workload_identity;

pub use auth_policy::{AuthPolicy, AuthPolicySpec, AuthPolicyStatus};
pub use federated_trust_domain::{
    FederatedTrustDomain, FederatedTrustDomainSpec, FederatedTrustDomainStatus,
};
pub use identity::{IdentityCounter, IdentityCounterSpec, NumericIdentity, NumericIdentitySpec};
pub use identity_policy::{IdentityPolicy, IdentityPolicySpec};
pub use pod_identity::{PodIdentity, PodIdentitySpec};
pub use workload_identity::{WorkloadIdentity, WorkloadIdentitySpec, WorkloadIdentityStatus};

/// The API group of every Tessera resource.
pub const GROUP: &str = "tessera.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Condition type that says whether a resource is in effect.
pub const CONDITION_READY: &str = "Ready";
/// Condition type on AuthPolicies with HTTP rules: whether those rules are
/// enforced as written (False until a waypoint proxy enforces them).
pub const CONDITION_HTTP_RULES: &str = "HTTPRulesEnforced";

/// Why the CRD manifests could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// Serializing a CRD to YAML failed.
    #[error("could not serialize CRD {name} to YAML: {source}")]
    Yaml {
        /// The CRD's name.
        name: String,
        /// The serializer's error.
        source: serde_yaml::Error,
    },
    /// Writing the manifests failed, or the checked-in ones drifted.
    #[error(transparent)]
    Files(#[from] crate::generated::GeneratedError),
}

/// The manifests of `crds/`: one file per CRD.
pub fn files() -> Result<crate::generated::Files, CrdError> {
    let mut files = Vec::new();
    for crd in all() {
        files.push((file_name(&crd), to_yaml(&crd)?));
    }
    Ok(crate::generated::Files {
        source_code: "the Rust types in api/src/crd",
        files,
    })
}

/// Writes every CRD manifest into `dir` (the repository's `crds/`), returning the paths.
pub fn write_dir(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, CrdError> {
    Ok(files()?.write(dir)?)
}

/// Checks that `dir` holds exactly the manifests the types generate, byte for byte.
pub fn check_dir(dir: &std::path::Path) -> Result<(), CrdError> {
    Ok(files()?.check(dir)?)
}

/// Every CRD Tessera installs, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        WorkloadIdentity::crd(),
        AuthPolicy::crd(),
        FederatedTrustDomain::crd(),
        NumericIdentity::crd(),
        IdentityCounter::crd(),
        IdentityPolicy::crd(),
        PodIdentity::crd(),
    ]
}

/// The CRDs users write; the rest are the operator's internal bookkeeping.
pub fn user_facing() -> Vec<CustomResourceDefinition> {
    all()
        .into_iter()
        .filter(|c| c.spec.names.categories.as_deref() == Some(&["tessera".to_owned()][..]))
        .collect()
}

/// The file name a CRD is stored under in `crds/`: `<group>_<plural>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// Renders a CRD as the YAML checked into `crds/`, with a header naming its source.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let body = serde_yaml::to_string(crd).map_err(|source| CrdError::Yaml { name, source })?;
    Ok(format!(
        "# Generated from the Rust types in api/src/crd by `cargo xtask generate`. Do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generated::GeneratedError;

    #[test]
    fn names_and_scopes() {
        let internal: Vec<_> = all()
            .iter()
            .filter(|c| {
                c.spec.names.categories.as_deref() == Some(&["tessera-internal".to_owned()][..])
            })
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            internal,
            [
                "numericidentities.tessera.dev",
                "identitycounters.tessera.dev",
                "identitypolicies.tessera.dev",
                "podidentities.tessera.dev"
            ]
        );
        assert_eq!(user_facing().len() + internal.len(), all().len());
        let crds = user_facing();
        let names: Vec<_> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "workloadidentities.tessera.dev",
                "authpolicies.tessera.dev",
                "federatedtrustdomains.tessera.dev"
            ]
        );
        let scopes: Vec<_> = crds.iter().map(|c| c.spec.scope.as_str()).collect();
        assert_eq!(scopes, ["Cluster", "Namespaced", "Cluster"]);
        for crd in &crds {
            assert_eq!(crd.spec.group, GROUP);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            assert!(!crd.spec.names.short_names.clone().unwrap().is_empty());
            assert!(v.additional_printer_columns.as_ref().unwrap().len() >= 3);
        }
    }

    /// The checked-in `crds/` must match the types (the same check as
    /// `cargo xtask generate --check`).
    #[test]
    fn checked_in_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        check_dir(&dir).unwrap();
    }

    #[test]
    fn check_dir_catches_edits_missing_and_stale_files() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path()).unwrap();
        check_dir(dir.path()).unwrap();

        let path = dir.path().join("tessera.dev_authpolicies.yaml");
        let original = std::fs::read_to_string(&path).unwrap();
        let edited = original.replacen("maximum: 65535", "maximum: 65536", 1);
        assert_ne!(edited, original);
        std::fs::write(&path, &edited).unwrap();
        let err = check_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, CrdError::Files(GeneratedError::Drift { line, .. }) if line > 1),
            "{err}"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            check_dir(dir.path()).unwrap_err(),
            CrdError::Files(GeneratedError::Missing { .. })
        ));

        std::fs::write(&path, &original).unwrap();
        std::fs::write(dir.path().join("old.yaml"), "x: 1").unwrap();
        assert!(matches!(
            check_dir(dir.path()).unwrap_err(),
            CrdError::Files(GeneratedError::Stale { .. })
        ));
    }

    #[test]
    fn yaml_has_header_and_round_trips() {
        for crd in all() {
            let yaml = to_yaml(&crd).unwrap();
            assert!(yaml.starts_with("# Generated"));
            let back: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
            assert_eq!(back, crd);
        }
    }
}
