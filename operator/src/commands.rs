//! The operator's smaller commands: `check` (are the CRDs installed and
//! current?) and `spire-plan` (the SPIRE registration plan, not applied).

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use tessera_api::crd::installed::{self, CrdState, InstalledError};
use tessera_api::crd::{PodIdentity, WorkloadIdentity};

use crate::app::{AppError, SpireArgs};
use crate::spire_entries::{self, SpireError};

/// Why a command could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No Kubernetes client, or a bad argument.
    #[error(transparent)]
    Setup(#[from] AppError),
    /// The API server could not be reached.
    #[error(
        "cannot reach the API server; check the kubeconfig's server address and credentials: {0}"
    )]
    Unreachable(kube::Error),
    /// Listing objects failed.
    #[error("cannot list {what}: {source}")]
    List {
        /// The kind listed.
        what: &'static str,
        /// The API error.
        source: kube::Error,
    },
    /// Reading the CRDs failed.
    #[error(transparent)]
    Installed(#[from] InstalledError),
    /// Talking to SPIRE failed.
    #[error(transparent)]
    Spire(#[from] SpireError),
}

async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, CommandError> {
    let client = tessera_api::client::connect(kubeconfig)
        .await
        .map_err(AppError::from)?;
    Ok(client)
}

/// Prints the API server's version and every Tessera CRD's state; true
/// when all are ready.
pub async fn check(kubeconfig: Option<&Path>) -> Result<bool, CommandError> {
    let client = client(kubeconfig).await?;
    let version = client
        .apiserver_version()
        .await
        .map_err(CommandError::Unreachable)?;
    println!("API server {}", version.git_version);
    let mut ok = true;
    for (name, state) in installed::check(&client).await? {
        ok &= state == CrdState::Ready;
        println!("{name}: {state}");
    }
    Ok(ok)
}

async fn all<K>(client: &kube::Client, what: &'static str) -> Result<Vec<K>, CommandError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let list = kube::Api::<K>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await;
    Ok(list
        .map_err(|source| CommandError::List { what, source })?
        .items)
}

/// One dry-run pass of SPIRE registration for the pods now running,
/// printed entry by entry with a summary.
pub async fn spire_plan(
    kubeconfig: Option<&Path>,
    trust_domain: &str,
    spire: &SpireArgs,
) -> Result<(), CommandError> {
    let trust_domain = crate::app::trust_domain(trust_domain)?;
    let cfg = spire.config(true)?;
    let client = client(kubeconfig).await?;
    let pods: Vec<Arc<PodIdentity>> = all(&client, "podidentities")
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let wids: Vec<Arc<WorkloadIdentity>> = all(&client, "workloadidentities")
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let parents = all::<Node>(&client, "nodes")
        .await?
        .into_iter()
        .filter_map(|n| {
            let parent = n
                .metadata
                .annotations?
                .remove(spire_entries::PARENT_ANNOTATION)?;
            Some((n.metadata.name?, parent))
        })
        .collect();
    let (plan, _) =
        spire_entries::sync_once(&cfg, &trust_domain, &pods, &wids, &parents, &mut None).await?;
    for line in plan.lines() {
        println!("{line}");
    }
    println!(
        "{} to create, {} to update, {} to delete; {} entries of other owners left alone",
        plan.create.len(),
        plan.update.len(),
        plan.delete.len(),
        plan.foreign
    );
    Ok(())
}
