//! Prometheus metrics and the HTTP endpoints that serve them with the health
//! and readiness probes: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set for per-result counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Label set for bundle endpoint requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// `https_spiffe` or `https_web`.
    pub profile: &'static str,
    /// HTTP status code answered.
    pub code: u16,
}

/// Label set for federated bundle fetches.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabel {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Every metric the operator exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Pod reconciles, by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// PodIdentity record writes (an identity assigned or changed).
    pub identities_assigned: Counter,
    /// Pods left without identity because their template failed.
    pub identity_failures: Counter,
    /// Numeric identities released because no pod used them.
    pub identities_released: Counter,
    /// Roots in the trust-domain CA.
    pub ca_roots: Gauge,
    /// Policy compilations (each writes what changed), by result.
    pub policy_syncs: Family<ResultLabel, Counter>,
    /// IdentityPolicy objects written or deleted.
    pub identity_policy_writes: Counter,
    /// SPIFFE IDs that have compiled policy.
    pub identity_policies: Gauge,
    /// Requests to the bundle endpoint, by profile and status code.
    pub bundle_endpoint_requests: Family<EndpointLabel, Counter>,
    /// Bundle fetches from federated trust domains, by trust domain and result.
    pub federation_fetches: Family<FetchLabel, Counter>,
    /// Federated trust domains whose bundle in use is stale (the last
    /// fetches failed).
    pub federation_stale: Gauge,
    /// Set once the replica has initialized (CA loaded or standing by).
    pub ready: AtomicBool,
}

impl Metrics {
    /// A registry exposing these metrics under the `tessera_operator` prefix.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("tessera_operator");
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
        r.register(
            "pod_reconciles",
            "Pod reconciles by result",
            self.reconciles.clone(),
        );
        r.register(
            "identities_assigned",
            "PodIdentity records written (an identity assigned or changed)",
            self.identities_assigned.clone(),
        );
        r.register(
            "identity_failures",
            "Pods left without identity because their WorkloadIdentity template failed",
            self.identity_failures.clone(),
        );
        r.register(
            "identities_released",
            "Numeric identities released because no pod used them",
            self.identities_released.clone(),
        );
        r.register(
            "ca_roots",
            "Roots in the trust-domain CA",
            self.ca_roots.clone(),
        );
        r.register(
            "policy_syncs",
            "Policy compilations by result",
            self.policy_syncs.clone(),
        );
        r.register(
            "identity_policy_writes",
            "IdentityPolicy objects written or deleted",
            self.identity_policy_writes.clone(),
        );
        r.register(
            "identity_policies",
            "SPIFFE IDs with compiled policy",
            self.identity_policies.clone(),
        );
        r.register(
            "bundle_endpoint_requests",
            "Requests to the SPIFFE bundle endpoint by profile and status code",
            self.bundle_endpoint_requests.clone(),
        );
        r.register(
            "federation_fetches",
            "Bundle fetches from federated trust domains by trust domain and result",
            self.federation_fetches.clone(),
        );
        r.register(
            "federation_stale",
            "Federated trust domains whose bundle in use is stale",
            self.federation_stale.clone(),
        );
        r
    }

    /// Marks the replica ready for `/readyz`.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until the
/// task is dropped; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let registry = metrics.registry();
    let ready = move || metrics.ready.load(Ordering::Relaxed);
    tessera_api::probes::serve(addr, registry, Arc::new(ready)).await
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_configuration_reference() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &std::sync::Arc::new(Metrics::default()).registry(),
        )
        .unwrap();
        let names = tessera_tests::docs::metric_names(&text);
        assert!(names.len() > 5, "{text}");
        tessera_tests::docs::check_documented("configuration.md", &names).unwrap();
    }
}
