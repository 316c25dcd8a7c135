//! The names Tessera's binaries and its installation manifests must agree
//! on (namespace, service accounts, Secret, ConfigMaps, Services, Lease,
//! ports), defined once.

/// The namespace Tessera runs in.
pub const NAMESPACE: &str = "tessera-system";
/// The operator's service account, Deployment and leader Lease.
pub const OPERATOR: &str = "tessera-operator";
/// The field manager of everything the operator writes with server-side
/// apply (one name, so its writes never conflict with each other).
pub const FIELD_MANAGER: &str = OPERATOR;
/// The node agents' service account and DaemonSet.
pub const AGENT: &str = "tessera-agent";
/// The Secret holding the trust domain's CA roots (kept when Tessera is
/// uninstalled, so that a reinstall keeps the trust domain's roots).
pub const CA_SECRET: &str = "tessera-ca";
/// The ConfigMap the operator publishes its trust bundle in.
pub const BUNDLE_CONFIGMAP: &str = "tessera-trust-bundle";
/// The key of [`BUNDLE_CONFIGMAP`] holding the CA certificates, PEM.
pub const BUNDLE_KEY: &str = "bundle.pem";
/// The key of [`BUNDLE_CONFIGMAP`] naming the trust domain (`cluster.test`).
pub const TRUST_DOMAIN_KEY: &str = "trustDomain";
/// The ConfigMap holding federated trust domains' bundles.
pub const FEDERATED_CONFIGMAP: &str = "tessera-federated-bundles";
/// The Service of the signing service (the leader's).
pub const SIGNER_SERVICE: &str = "tessera-signer";
/// The Service of the SPIFFE bundle endpoint (the leader's).
pub const BUNDLE_ENDPOINT_SERVICE: &str = "tessera-bundle-endpoint";
/// The signing service's port.
pub const SIGNER_PORT: u16 = 8443;
/// The bundle endpoint's port on the operator.
pub const BUNDLE_ENDPOINT_PORT: u16 = 8444;
/// The operator's /metrics, /healthz and /readyz port.
pub const OPERATOR_METRICS_PORT: u16 = 9090;
/// The agent's handshake port (on its node's address).
pub const HANDSHAKE_PORT: u16 = 4434;
/// The agent's /metrics, /healthz and /readyz port (on its node's address).
pub const AGENT_METRICS_PORT: u16 = 9091;
/// The audience of the node-bound token an agent presents to the signing
/// service (the signer accepts no other).
pub const TOKEN_AUDIENCE: &str = "tessera-signer";
