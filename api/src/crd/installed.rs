//! Whether the Tessera CRDs are installed in a cluster, and current.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

/// What the cluster holds for one of Tessera's CRDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdState {
    /// Installed, Established, and serving the version this build expects.
    Ready,
    /// Not installed.
    Missing,
    /// Installed but not (yet) Established.
    NotEstablished,
    /// Installed without the `v1alpha1` version this build needs.
    WrongVersion(Vec<String>),
}

/// Why the check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InstalledError {
    /// The API server did not answer, or refused.
    #[error(
        "cannot read CustomResourceDefinitions from the API server (check the kubeconfig and that this identity may get customresourcedefinitions): {0}"
    )]
    Api(#[from] kube::Error),
}

/// Looks up each of [`super::all`] in the cluster, by name.
pub async fn check(client: &kube::Client) -> Result<Vec<(String, CrdState)>, InstalledError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    for crd in super::all() {
        let name = crd.metadata.name.unwrap_or_default();
        let state = match api.get_opt(&name).await? {
            None => CrdState::Missing,
            Some(found) => state_of(&found),
        };
        out.push((name, state));
    }
    Ok(out)
}

/// True when the CRD's `Established` condition is `True`.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// The state of one CRD object read from a cluster.
pub fn state_of(found: &CustomResourceDefinition) -> CrdState {
    let versions: Vec<String> = found
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.clone())
        .collect();
    if !versions.iter().any(|v| v == super::VERSION) {
        return CrdState::WrongVersion(versions);
    }
    if is_established(found) {
        CrdState::Ready
    } else {
        CrdState::NotEstablished
    }
}

impl std::fmt::Display for CrdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrdState::Ready => f.write_str("ready"),
            CrdState::Missing => f.write_str("missing: install it with `kubectl apply -f crds/`"),
            CrdState::NotEstablished => {
                f.write_str("installed but not Established yet: check `kubectl describe crd` for naming conflicts")
            }
            CrdState::WrongVersion(v) => write!(
                f,
                "serves {v:?} but not {}: apply the crds/ of this release",
                super::VERSION
            ),
        }
    }
}
