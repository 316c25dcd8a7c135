//! The policy controller: follows AuthPolicies, pods, PodIdentity records,
//! namespaces and IdentityPolicies; after every change (coalesced) it
//! recompiles everything ([`super::compiler`]) and writes the
//! IdentityPolicies and AuthPolicy statuses that differ.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tessera_api::crd::{AuthPolicy, IdentityPolicy, IdentityPolicySpec, PodIdentity};
use tessera_api::names::FIELD_MANAGER;
use tracing::{info, warn};

use super::PolicyError;
use super::compiler::{PodFacts, PolicyOutcome, compile, object_name, pod_facts, status};
use super::preview::{PendingPod, Preview};
use crate::metrics::{Metrics, ResultLabel};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Runs the policy compiler until `shutdown` resolves: watches AuthPolicies,
/// pods, namespaces and IdentityPolicies, and after every change (coalesced)
/// recompiles everything and writes what differs.
pub async fn run(
    client: kube::Client,
    metrics: Arc<Metrics>,
    preview: Arc<Preview>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PolicyError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let (views, tasks) = Views::follow(&client, &tx);
    drop(tx);
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        _ = views.wait_until_ready() => {}
        _ = &mut shutdown => {
            tasks.iter().for_each(|t| t.abort());
            return Ok(());
        }
    }
    info!("policy compiler started");
    let mut retry = Retry::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            got = rx.recv() => if got.is_none() { break },
            () = preview.wake.notified() => {}
            _ = tokio::time::sleep(retry.delay), if retry.pending => {}
        }
        // No fixed delay: a new identity's rules go out at once (a new pod's
        // first connection waits for them). Changes that arrive while a
        // compile runs, or during the pause after it, coalesce into the
        // next one.
        while rx.try_recv().is_ok() {}
        let started = std::time::Instant::now();
        let result = sync(&client, &views, &metrics, &preview).await;
        let label = ResultLabel {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        metrics.policy_syncs.get_or_create(&label).inc();
        let took = started.elapsed();
        retry.after(result, took);
        // Under steady churn, compiles (each over every pod) would run back
        // to back and take a whole core from the rest of the operator (the
        // identity controller and the signer among them): rest as long as
        // the compile took, so the compiler uses at most about half a core.
        // A single change on a quiet cluster still compiles at once.
        tokio::time::sleep(took.min(MAX_PAUSE)).await;
    }
    tasks.iter().for_each(|t| t.abort());
    Ok(())
}

/// After a failed sync, the compiler tries again after `delay` even if
/// nothing changes; the delay doubles up to 30 s while syncs keep failing.
#[derive(Debug)]
struct Retry {
    pending: bool,
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            pending: false,
            delay: Duration::from_secs(1),
        }
    }
}

impl Retry {
    fn after(&mut self, result: Result<(), PolicyError>, took: Duration) {
        match result {
            Ok(()) => {
                *self = Retry::default();
                tracing::debug!(?took, "policies compiled and written");
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?self.delay, "policy sync failed; the data path keeps the last rules written");
                if self.pending {
                    self.delay = (self.delay * 2).min(Duration::from_secs(30));
                }
                self.pending = true;
            }
        }
    }
}

/// The longest rest after a compile (see [`run`]).
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// What the compiler follows.
struct Views {
    policies: Store<AuthPolicy>,
    pods: Store<Pod>,
    records: Store<PodIdentity>,
    namespaces: Store<Namespace>,
    compiled: Store<IdentityPolicy>,
}

/// Keeps `writer` in line with every object of `api`; every change sends
/// on `tx`.
fn follow<K>(
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    tx: &tokio::sync::mpsc::Sender<()>,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let tx = tx.clone();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map_ok(|_| ());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(()) => drop(tx.try_send(())),
                Err(e) => warn!(error = %e, what, "watch error; retrying"),
            }
        }
    })
}

impl Views {
    fn follow(
        client: &kube::Client,
        tx: &tokio::sync::mpsc::Sender<()>,
    ) -> (Views, Vec<tokio::task::JoinHandle<()>>) {
        let (policies, policy_writer) = reflector::store::<AuthPolicy>();
        let (pods, pod_writer) = reflector::store::<Pod>();
        let (records, records_writer) = reflector::store::<PodIdentity>();
        let (namespaces, ns_writer) = reflector::store::<Namespace>();
        let (compiled, compiled_writer) = reflector::store::<IdentityPolicy>();
        let tasks = vec![
            follow(policy_writer, Api::all(client.clone()), tx, "authpolicies"),
            follow(pod_writer, Api::all(client.clone()), tx, "pods"),
            follow(
                records_writer,
                Api::all(client.clone()),
                tx,
                "podidentities",
            ),
            follow(ns_writer, Api::all(client.clone()), tx, "namespaces"),
            follow(
                compiled_writer,
                Api::all(client.clone()),
                tx,
                "identitypolicies",
            ),
        ];
        (
            Views {
                policies,
                pods,
                records,
                namespaces,
                compiled,
            },
            tasks,
        )
    }

    async fn wait_until_ready(&self) {
        let _ = self.policies.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.records.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.compiled.wait_until_ready().await;
    }
}

fn write_failed(what: String) -> impl FnOnce(kube::Error) -> PolicyError {
    move |e| PolicyError::Write {
        what,
        source: Arc::new(e),
    }
}

/// Compiles the current state and writes what differs from the cluster.
#[tracing::instrument(name = "compile", skip_all)]
async fn sync(
    client: &kube::Client,
    views: &Views,
    metrics: &Metrics,
    preview: &Preview,
) -> Result<(), PolicyError> {
    let Views {
        policies,
        pods,
        records,
        namespaces,
        ..
    } = views;
    let (round, pending) = preview.begin(|p| {
        pods.get(&reflector::ObjectRef::new(&p.name).within(&p.namespace))
            .and_then(|pod| pod_facts(&pod, records).map(|f| f.spiffe_id))
            .is_some_and(|id| id == p.spiffe_id)
    });
    let all_pods = pods.state();
    let mut facts: Vec<PodFacts> = all_pods
        .iter()
        .filter_map(|p| pod_facts(p, records))
        .collect();
    facts.extend(pending.iter().map(PendingPod::facts));
    let ns_labels = |name: &str| {
        namespaces
            .get(&reflector::ObjectRef::new(name))
            .map(|ns| ns.labels().clone())
    };
    let all_policies = policies.state();
    let result = compile(&all_policies, &facts, &ns_labels);
    write_identity_policies(client, &views.compiled, &result.identities, metrics).await?;
    // The rules are out: pods waiting for them may get their identity.
    preview.finished(round);
    write_statuses(client, &all_policies, &result.outcomes).await?;
    metrics
        .identity_policies
        .set(result.identities.len() as i64);
    Ok(())
}

/// Writes the IdentityPolicies that differ, then deletes those no longer
/// wanted: a rule moving between objects is never missing in between.
async fn write_identity_policies(
    client: &kube::Client,
    compiled: &Store<IdentityPolicy>,
    identities: &BTreeMap<String, IdentityPolicySpec>,
    metrics: &Metrics,
) -> Result<(), PolicyError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let api = Api::<IdentityPolicy>::all(client.clone());
    let mut wanted = BTreeSet::new();
    for (id, spec) in identities {
        let Some(name) = object_name(id) else {
            continue;
        };
        wanted.insert(name.clone());
        let current = compiled.get(&reflector::ObjectRef::new(&name));
        if current.as_ref().is_some_and(|c| &c.spec == spec) {
            continue;
        }
        let object = serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1",
            "kind": "IdentityPolicy",
            "metadata": {"name": name},
            "spec": spec,
        });
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .map_err(write_failed(format!("IdentityPolicy {name} ({id})")))?;
        metrics.identity_policy_writes.inc();
    }
    for stale in compiled.state() {
        let name = stale.name_any();
        if wanted.contains(&name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => drop(metrics.identity_policy_writes.inc()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(write_failed(format!("IdentityPolicy {name} (delete)"))(e)),
        }
    }
    Ok(())
}

/// Writes each AuthPolicy's status when it changed.
async fn write_statuses(
    client: &kube::Client,
    policies: &[Arc<AuthPolicy>],
    outcomes: &BTreeMap<String, PolicyOutcome>,
) -> Result<(), PolicyError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for policy in policies {
        let namespace = policy.namespace().unwrap_or_default();
        let name = policy.name_any();
        let Some(outcome) = outcomes.get(&format!("{namespace}/{name}")) else {
            continue;
        };
        let status = status(policy, outcome, policy.status.as_ref(), now.clone());
        if policy.status.as_ref() == Some(&status) {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1",
            "kind": "AuthPolicy",
            "status": status,
        });
        Api::<AuthPolicy>::namespaced(client.clone(), &namespace)
            .patch_status(&name, &params, &Patch::Apply(patch))
            .await
            .map_err(write_failed(format!(
                "AuthPolicy {namespace}/{name} status"
            )))?;
    }
    Ok(())
}
