//! What the operator runs of Tessera's own deployment: the node agents'
//! DaemonSet ([`agents`], for installations such as OLM's that ship only the
//! operator) and the EndpointSlices that send the signer's and the bundle
//! endpoint's Services to the leader ([`endpoints`]).

pub mod agents;
pub mod endpoints;

/// Why the agents' DaemonSet or the leader's EndpointSlices could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The DaemonSet object could not be built.
    #[error("cannot build the agent DaemonSet: {0}")]
    Build(#[from] serde_json::Error),
    /// The API server refused a DaemonSet, Deployment or Event request.
    #[error(
        "cannot {what} (check the operator's permissions on daemonsets, daemonsets/status, deployments and events in {namespace}): {source}"
    )]
    Api {
        /// What was being done.
        what: &'static str,
        /// The namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
    /// An EndpointSlice could not be written.
    #[error(
        "cannot write EndpointSlice {namespace}/{name} (check that the operator may patch endpointslices named like its Services in its namespace): {source}"
    )]
    EndpointSlice {
        /// The namespace.
        namespace: String,
        /// The EndpointSlice.
        name: String,
        /// The API error.
        source: kube::Error,
    },
}
