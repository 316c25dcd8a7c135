//! What the waypoint asks the enforcer (see [`crate::mesh::waypoint`]): the
//! rules of a local pod's ports with HTTP rules, compiled once per policy
//! change, and who the peer at an address is, by the view and the auth
//! cache at the moment it is asked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tessera_api::crd::IdentityPolicySpec;
use tessera_waypoint::policy::{Rules, Source};
use tessera_waypoint::proxy::{Peer, Policy};
use tracing::warn;

use super::Inner;
use crate::mesh::waypoint;
use crate::sync::lock;

/// A workload's rules for the waypoint: compiled, or why not; and the
/// AuthPolicies they come from.
type Entry = (Result<Arc<Rules>, Arc<str>>, Arc<str>);

/// The compiled rules of every workload with HTTP rules, and the policies
/// they were compiled from.
#[derive(Default)]
pub(super) struct Compiled {
    from: Option<Arc<Vec<IdentityPolicySpec>>>,
    by_id: HashMap<String, Entry>,
}

impl Compiled {
    fn build(policies: &Arc<Vec<IdentityPolicySpec>>) -> Compiled {
        let by_id = policies
            .iter()
            .filter(|p| !p.http_ports().is_empty())
            .map(|p| {
                let rules = Rules::compile(p).map(Arc::new).map_err(|e| {
                    warn!(spiffe_id = %p.spiffe_id, error = %e, "HTTP rules cannot be compiled: the waypoint refuses every request to the workload");
                    Arc::<str>::from(e.to_string())
                });
                (p.spiffe_id.clone(), (rules, p.sources.join(", ").into()))
            })
            .collect();
        Compiled {
            from: Some(policies.clone()),
            by_id,
        }
    }
}

impl Inner {
    /// Hands each waypoint the rules of this pass (its connections name
    /// their peers again): right after the pass, not after the
    /// housekeeping that follows it.
    pub(super) fn publish_waypoints(self: &Arc<Self>) {
        self.external.publish(&self.external_context());
    }

    /// What the waypoint asks this enforcer.
    pub(super) fn waypoint_context(self: &Arc<Self>) -> waypoint::Context {
        let weak = Arc::downgrade(self);
        let policy: waypoint::Policies =
            Arc::new(move |uid: &str| weak.upgrade()?.waypoint_policy(uid));
        let weak = Arc::downgrade(self);
        let identify: waypoint::Identify =
            Arc::new(move |uid: &str, ip: IpAddr| match weak.upgrade() {
                Some(inner) => inner.identify(uid, ip),
                None => Peer::unnamed(),
            });
        waypoint::Context {
            policy,
            identify,
            stats: self.plane.stats.waypoint.clone(),
            limits: self.waypoint_limits.clone(),
        }
    }

    /// The rules of local pod `uid`'s ports with HTTP rules now; a new
    /// version on every call, so connections name their peers again.
    fn waypoint_policy(&self, uid: &str) -> Option<Arc<Policy>> {
        let workload = self.view().local_pod(uid)?.spiffe_id.clone();
        let policies = lock(&self.policies).clone();
        let (rules, sources) = {
            let mut compiled = lock(&self.waypoint_rules);
            if !compiled
                .from
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(f, &policies))
            {
                *compiled = Compiled::build(&policies);
            }
            compiled.by_id.get(&*workload).cloned().unwrap_or_else(|| {
                (
                    Err("the workload has no HTTP rules any more".into()),
                    "".into(),
                )
            })
        };
        Some(Arc::new(Policy {
            workload,
            rules,
            policies: sources,
            version: self.waypoint_version.fetch_add(1, Ordering::Relaxed) + 1,
        }))
    }

    /// The peer at `ip` for the workload of local pod `uid`: the pod the
    /// endpoint map gives the address to, and whether the auth cache holds
    /// an authentication of the pair that counts now.
    fn identify(&self, uid: &str, ip: IpAddr) -> Peer {
        let view = self.view();
        let Some(source) = view.pod_at(ip) else {
            return Peer::unnamed();
        };
        let authenticated = view
            .local_pod(uid)
            .and_then(|dst| view.pair_key(&dst.spiffe_id, &source.spiffe_id, &source.node))
            .is_some_and(|(key, _, _)| self.plane.authenticates(&view, &key));
        Peer {
            source: Source {
                id: source.spiffe_id.parse().ok(),
                authenticated,
            },
            generation: source.generation,
        }
    }
}
