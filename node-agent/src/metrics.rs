//! The agent's Prometheus metrics, read at scrape time from the data path's
//! [`Stats`] and the identity store (names under `tessera_agent_`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tessera_bpf::abi::Reason;

use crate::datapath::maps::Stats;
use crate::svid::store::IdentityStore;

#[derive(Debug)]
struct Agent {
    stats: Arc<Stats>,
    store: IdentityStore,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One counter without labels.
fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Agent {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let mut family = encoder.encode_descriptor(
            "handshakes",
            "Agent-to-agent mutual-TLS handshakes, by role (initiator or responder) and result",
            None,
            MetricType::Counter,
        )?;
        for (role, result, n) in [
            ("initiator", "ok", &s.initiated_ok),
            ("initiator", "error", &s.initiated_failed),
            ("responder", "ok", &s.responded_ok),
            ("responder", "error", &s.responded_failed),
        ] {
            ConstCounter::new(get(n))
                .encode(family.encode_family(&[("role", role), ("result", result)])?)?;
        }
        counter(
            &mut encoder,
            "auth_restored",
            "Authentications restored from the auth cache at start, without a handshake",
            get(&s.restored),
        )?;
        counter(
            &mut encoder,
            "auth_invalidated",
            "Authentications removed because a generation, the epoch or the expiry no longer held",
            get(&s.invalidated),
        )?;
        counter(
            &mut encoder,
            "auth_missing_events",
            "Connections the data path reported as needing an authentication it did not have",
            get(&s.events),
        )?;
        counter(
            &mut encoder,
            "external_admitted",
            "Connections of peers outside the mesh whose TLS this agent terminated and admitted (externalPeers: TerminateTLS)",
            get(&s.external_admitted),
        )?;
        counter(
            &mut encoder,
            "external_refused",
            "Connections of peers outside the mesh a terminator refused: TLS, SVID verification, policy, or the workload not accepting",
            get(&s.external_refused),
        )?;
        counter(
            &mut encoder,
            "external_revoked",
            "Admitted connections of peers outside the mesh this agent ended because the peer was no longer admitted: its rule, its policy or its trust bundle changed",
            get(&s.external_revoked),
        )?;
        counter(
            &mut encoder,
            "connections_capped",
            "Connections to the handshake port or a terminator closed at once because their address, or the agent, had as many open as allowed",
            get(&s.connections_capped),
        )?;
        counter(
            &mut encoder,
            "vouched_local",
            "This node's pods whose sandbox addresses the agent mapped and vouched for before their status gave them",
            get(&s.vouched_local),
        )?;
        counter(
            &mut encoder,
            "vouched_remote",
            "Pods whose addresses another node's agent vouched for in a handshake before their status gave them",
            get(&s.vouched_remote),
        )?;
        let mut family = encoder.encode_descriptor(
            "datapath_decisions",
            "Decisions of this node's eBPF programs, by reason (deny_* were refused)",
            None,
            MetricType::Counter,
        )?;
        for reason in Reason::ALL {
            ConstCounter::new(get(&s.decisions[reason as usize]))
                .encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        self.waypoint(&mut encoder)?;
        self.gauges(&mut encoder)
    }
}

impl Agent {
    /// The waypoint's counters.
    fn waypoint(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let w = &self.stats.waypoint;
        counter(
            encoder,
            "waypoint_connections",
            "Connections the waypoint served (to ports with HTTP rules)",
            get(&w.connections),
        )?;
        counter(
            encoder,
            "waypoint_requests_allowed",
            "Requests (HTTP/2 streams) the waypoint forwarded to the workload",
            get(&w.allowed),
        )?;
        let mut family = encoder.encode_descriptor(
            "waypoint_requests_refused",
            "Requests the waypoint refused, by reason: deny_rule and no_allow_rule (403), bad_path (400), no_rules (the rules could not be compiled), peer_changed, upstream_failed (502)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in w.refusals() {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        counter(
            encoder,
            "waypoint_connections_revoked",
            "Waypoint connections closed because their peer's identity, generation or authentication changed",
            get(&w.revoked),
        )
    }

    /// The gauges: local identities, queued handshakes, data path in sync.
    fn gauges(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let pods =
            ConstGauge::new(i64::try_from(self.store.pods_with_identity()).unwrap_or(i64::MAX));
        pods.encode(encoder.encode_descriptor(
            "local_identities",
            "Pods on this node holding an identity (their SVIDs issued)",
            None,
            pods.metric_type(),
        )?)?;
        let waiting =
            ConstGauge::new(i64::try_from(get(&s.handshakes_waiting)).unwrap_or(i64::MAX));
        waiting.encode(encoder.encode_descriptor(
            "handshakes_waiting",
            "Pair handshakes queued and not started yet (a restart's burst drains at the handshake rate)",
            None,
            waiting.metric_type(),
        )?)?;
        let in_sync = ConstGauge::new(i64::from(s.in_sync.load(Ordering::Relaxed)));
        in_sync.encode(encoder.encode_descriptor(
            "datapath_in_sync",
            "1 once the eBPF maps were first brought in sync with the cluster",
            None,
            in_sync.metric_type(),
        )?)
    }
}

/// A registry exposing the agent's metrics under the `tessera_agent` prefix.
pub fn registry(stats: Arc<Stats>, store: IdentityStore) -> Registry {
    let mut registry = Registry::with_prefix("tessera_agent");
    registry.register_collector(Box::new(Agent { stats, store }));
    registry
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_configuration_reference() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &registry(
                std::sync::Arc::new(crate::datapath::maps::Stats::default()),
                crate::svid::store::IdentityStore::default(),
            ),
        )
        .unwrap();
        let names = tessera_tests::docs::metric_names(&text);
        assert!(names.len() > 5, "{text}");
        tessera_tests::docs::check_documented("configuration.md", &names).unwrap();
    }
}
