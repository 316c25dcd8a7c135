//! The Kubernetes client every Tessera command builds the same way: from the
//! kubeconfig given, else `$KUBECONFIG`, `~/.kube/config` or the pod's
//! service account.

use std::path::{Path, PathBuf};

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig given could not be read or used.
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig given, none found and not in a cluster.
    #[error("no kubeconfig found and not running in a cluster; pass --kubeconfig: {0}")]
    NoCluster(#[from] kube::config::InferConfigError),
    /// The configuration could not make a client (TLS settings, say).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, else from the environment or the cluster.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let failed = |source| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(failed)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(failed)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
