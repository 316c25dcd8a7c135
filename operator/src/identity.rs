//! The identity controller: gives every pod its SPIFFE ID and numeric
//! identity, and releases numeric identities no pod uses any more.
//!
//! Event-driven throughout. Pods are reconciled when they change; all pods are
//! re-evaluated when a WorkloadIdentity or a namespace's labels change (rare);
//! pods holding a SPIFFE ID are re-evaluated when its NumericIdentity goes
//! away. There is no periodic relist. A pod's identity reaches the agents as
//! annotations (see [`tessera_api::annotations`]), written with server-side
//! apply so that removing one is a matter of not applying it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tessera_api::annotations;
use tessera_api::crd::{NumericIdentity, WorkloadIdentity};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tracing::{info, warn};

use crate::allocator::{Allocation, Allocator, AllocatorError};
use crate::assign::{self, Assignment};
use crate::metrics::{Metrics, ResultLabel};
use crate::policy::{PendingPod, Preview};
use crate::wid_status;

/// How long a pod's identity waits for the policy compiler to write the
/// rules that name it (see [`Preview`]).
pub const PREVIEW_WAIT: Duration = Duration::from_secs(2);

/// Field manager of the annotations.
pub const FIELD_MANAGER: &str = "tessera-operator";

/// Why one pod could not be reconciled (it is retried).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// Allocation failed.
    #[error(transparent)]
    Allocator(#[from] AllocatorError),
    /// Writing the pod's annotations failed.
    #[error("cannot annotate pod {pod}: {source}; check that the operator may patch pods")]
    Annotate {
        /// `namespace/name`.
        pod: String,
        /// The API error.
        source: Arc<kube::Error>,
    },
    /// Writing a WorkloadIdentity's status failed.
    #[error(
        "cannot update status of WorkloadIdentity {name}: {source}; check that the operator may patch workloadidentities/status"
    )]
    Status {
        /// The WorkloadIdentity.
        name: String,
        /// The API error.
        source: Arc<kube::Error>,
    },
    /// A watch failed for good.
    #[error("watch on {what} failed: {source}")]
    Watch {
        /// What was watched.
        what: &'static str,
        /// The watcher's error.
        source: Arc<watcher::Error>,
    },
}

/// Shared state of the reconcilers.
pub struct Context {
    trust_domain: TrustDomain,
    allocator: Allocator,
    client: kube::Client,
    namespaces: Store<Namespace>,
    wids: Store<WorkloadIdentity>,
    recorder: Recorder,
    /// Asks the WorkloadIdentity status writer to recompute (coalesced).
    status_trigger: futures::channel::mpsc::Sender<()>,
    metrics: Arc<Metrics>,
    /// The policy compiler's preview, when one runs in this process.
    preview: Option<Arc<Preview>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The annotations a pod should carry for `assignment` and its allocation.
pub fn desired_annotations(
    assignment: &Assignment,
    allocation: Option<Allocation>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match (&assignment.result, allocation) {
        (Ok(id), Some(a)) => {
            out.insert(annotations::SPIFFE_ID.to_owned(), id.to_string());
            out.insert(
                annotations::IDENTITY.to_owned(),
                annotations::format_identity(a.id, a.generation),
            );
            out.insert(
                annotations::IDENTITY_SOURCE.to_owned(),
                assignment
                    .source
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            );
            if !assignment.federates_with.is_empty() {
                let names: Vec<&str> = assignment
                    .federates_with
                    .iter()
                    .map(TrustDomain::as_str)
                    .collect();
                out.insert(annotations::FEDERATES_WITH.to_owned(), names.join(","));
            }
        }
        (Err(e), _) => {
            out.insert(annotations::IDENTITY_ERROR.to_owned(), e.to_string());
        }
        (Ok(_), None) => {}
    }
    out
}

/// The Tessera annotations a pod carries now.
fn current_annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.annotations()
        .iter()
        .filter(|(k, _)| {
            [
                annotations::SPIFFE_ID,
                annotations::IDENTITY,
                annotations::IDENTITY_SOURCE,
                annotations::IDENTITY_ERROR,
                annotations::FEDERATES_WITH,
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn assignment_for(ctx: &Context, pod: &Pod) -> Assignment {
    let wids = ctx.wids.state();
    assign::assign_pod(
        &ctx.trust_domain,
        pod,
        &ctx.namespaces,
        wids.iter().map(AsRef::as_ref),
    )
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, IdentityError> {
    // Whatever happens to this pod may change some WorkloadIdentity's status;
    // a full channel already holds a pending recompute.
    let _ = ctx.status_trigger.clone().try_send(());
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let assignment = assignment_for(&ctx, &pod);
    let allocation = match &assignment.result {
        Ok(id) => Some(ctx.allocator.allocate(id).await?),
        Err(_) => None,
    };
    let desired = desired_annotations(&assignment, allocation);
    if desired == current_annotations(&pod) {
        ctx.metrics
            .reconciles
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
        return Ok(Action::await_change());
    }
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let current_id = pod.annotations().get(annotations::SPIFFE_ID);
    if let (Some(preview), Ok(id)) = (&ctx.preview, &assignment.result)
        && current_id.map(String::as_str) != Some(id.as_str())
    {
        let pending = PendingPod::new(
            namespace.clone(),
            name.clone(),
            pod.labels().clone(),
            id.clone(),
            pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        );
        if !preview.admit(pending, PREVIEW_WAIT).await {
            warn!(pod = %format!("{namespace}/{name}"), wait = ?PREVIEW_WAIT,
                "the policy compiler did not write this pod's rules in time; assigning its identity anyway (check the operator's policy compiler logs)");
        }
    }
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": desired},
    });
    Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(|e| IdentityError::Annotate {
            pod: format!("{namespace}/{name}"),
            source: Arc::new(e),
        })?;
    info!(pod = %format!("{namespace}/{name}"), annotations = ?desired, "identity assigned");
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "ok" })
        .inc();
    if assignment.result.is_ok() {
        ctx.metrics.identities_assigned.inc();
    } else {
        ctx.metrics.identity_failures.inc();
    }
    publish_events(&ctx, &pod, &assignment).await;
    Ok(Action::await_change())
}

/// Events on the pod for conflicts and failures (best effort: logged on error).
async fn publish_events(ctx: &Context, pod: &Pod, assignment: &Assignment) {
    let mut events = Vec::new();
    if !assignment.conflicts.is_empty() {
        events.push(Event {
            type_: EventType::Warning,
            reason: "IdentityConflict".into(),
            note: Some(format!(
                "selected by several WorkloadIdentities; used {}, ignored {}",
                assignment.source.as_deref().unwrap_or("default"),
                assignment.conflicts.join(", ")
            )),
            action: "AssignIdentity".into(),
            secondary: None,
        });
    }
    if let Err(e) = &assignment.result {
        events.push(Event {
            type_: EventType::Warning,
            reason: "IdentityFailed".into(),
            note: Some(format!("pod has no identity: {e}")),
            action: "AssignIdentity".into(),
            secondary: None,
        });
    }
    let reference = pod.object_ref(&());
    for event in events {
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "cannot publish event");
        }
    }
}

fn error_policy(_pod: Arc<Pod>, error: &IdentityError, ctx: Arc<Context>) -> Action {
    warn!(%error, "identity reconcile failed; retrying");
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "error" })
        .inc();
    Action::requeue(Duration::from_secs(2))
}

/// The SPIFFE ID and allocation a pod's annotations name, if valid.
fn annotated(pod: &Pod) -> Option<(SpiffeId, Allocation)> {
    let a = pod.annotations();
    let id = a.get(annotations::SPIFFE_ID)?.parse().ok()?;
    let (num, generation) = annotations::parse_identity(a.get(annotations::IDENTITY)?)?;
    Some((
        id,
        Allocation {
            id: num,
            generation,
        },
    ))
}

/// Releases allocations of SPIFFE IDs no pod uses: when a pod is deleted or
/// its annotations move to another SPIFFE ID, and once after every (re)list
/// for anything that changed while nobody watched. A candidate is released
/// only once it has stayed unused for `grace`: this watch may lag the
/// controller that annotates new pods (a just-allocated ID would look unused),
/// and a rolling update that replaces a Deployment's only pod keeps its
/// numeric identity instead of getting a new one.
async fn collect_garbage(
    client: kube::Client,
    allocator: Allocator,
    metrics: Arc<Metrics>,
    grace: Duration,
) -> Result<(), IdentityError> {
    let identities: Api<NumericIdentity> = Api::all(client.clone());
    // What each pod's annotations named when last seen.
    let mut last: HashMap<ObjectRef<Pod>, (SpiffeId, Allocation)> = HashMap::new();
    // Candidates for release, and when they may go.
    let mut pending: HashMap<(SpiffeId, Allocation), tokio::time::Instant> = HashMap::new();
    let mut events = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let next_due = pending.values().min().copied();
        let event = tokio::select! {
            event = events.try_next() => event.map_err(|e| IdentityError::Watch {
                what: "pods",
                source: Arc::new(e),
            })?,
            () = sleep_until_some(next_due) => {
                let now = tokio::time::Instant::now();
                let due: Vec<(SpiffeId, Allocation)> = pending
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for (id, allocation) in due {
                    pending.remove(&(id.clone(), allocation));
                    if last.values().any(|(held, _)| *held == id) {
                        continue;
                    }
                    match allocator.release(&id, allocation).await {
                        Ok(true) => {
                            metrics.identities_released.inc();
                            info!(spiffe_id = %id, ?allocation, "released numeric identity no pod uses");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            // Keep collecting; this one is tried again later.
                            warn!(spiffe_id = %id, error = %e, "cannot release numeric identity; retrying");
                            pending.insert((id, allocation), now + grace.max(Duration::from_secs(5)));
                        }
                    }
                }
                continue;
            }
        };
        let Some(event) = event else { break };
        let dropped = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let key = ObjectRef::from_obj(&pod);
                let now = annotated(&pod).filter(|_| pod.metadata.deletion_timestamp.is_none());
                let before = match now.clone() {
                    Some(held) => last.insert(key, held),
                    None => last.remove(&key),
                };
                before
                    .filter(|b| Some(b) != now.as_ref())
                    .into_iter()
                    .collect()
            }
            watcher::Event::Delete(pod) => last
                .remove(&ObjectRef::from_obj(&pod))
                .into_iter()
                .collect(),
            watcher::Event::InitDone => {
                let all = identities
                    .list(&Default::default())
                    .await
                    .map_err(|e| IdentityError::Allocator(e.into()))?;
                all.items
                    .into_iter()
                    .filter_map(|obj| {
                        let id = obj.spec.spiffe_id.parse::<SpiffeId>().ok()?;
                        Some((
                            id,
                            Allocation {
                                id: obj.spec.id,
                                generation: obj.spec.generation,
                            },
                        ))
                    })
                    .collect::<Vec<_>>()
            }
            watcher::Event::Init => {
                last.clear();
                Vec::new()
            }
        };
        let release_at = tokio::time::Instant::now() + grace;
        for candidate in dropped {
            if !last.values().any(|(held, _)| *held == candidate.0) {
                pending.entry(candidate).or_insert(release_at);
            }
        }
    }
    Ok(())
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the identity controller until `shutdown` resolves or a watch fails.
/// A numeric identity no pod uses is released after `release_grace`. With
/// `preview`, a pod's new SPIFFE ID is written only after the policy compiler
/// has written the rules that name it.
pub async fn run(
    client: kube::Client,
    trust_domain: TrustDomain,
    metrics: Arc<Metrics>,
    release_grace: Duration,
    preview: Option<Arc<Preview>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), IdentityError> {
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (wids, wid_writer) = reflector::store::<WorkloadIdentity>();
    // Any WorkloadIdentity or namespace change re-evaluates every pod.
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::channel::<()>(16);
    let ns_stream = reflector::reflector(
        ns_writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
    );
    let wid_stream = reflector::reflector(
        wid_writer,
        watcher(
            Api::<WorkloadIdentity>::all(client.clone()),
            watcher::Config::default(),
        ),
    );
    let feed = |stream: futures::stream::BoxStream<'static, Result<(), watcher::Error>>,
                what: &'static str| {
        let mut tx = trigger_tx.clone();
        async move {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(()) => {
                        // A full channel already holds a pending trigger.
                        let _ = tx.try_send(());
                    }
                    Err(e) => warn!(error = %e, what, "watch error; retrying"),
                }
            }
        }
    };
    tokio::spawn(feed(
        ns_stream.default_backoff().map_ok(|_| ()).boxed(),
        "namespaces",
    ));
    tokio::spawn(feed(
        wid_stream.default_backoff().map_ok(|_| ()).boxed(),
        "workloadidentities",
    ));
    drop(trigger_tx);
    namespaces.wait_until_ready().await.ok();
    wids.wait_until_ready().await.ok();

    // NumericIdentities: cached for the allocator; each change re-runs the
    // pods naming that SPIFFE ID (mapped below, after the cache saw it).
    let (nid_cache, nid_writer) = reflector::store::<NumericIdentity>();
    let nid_changes = reflector::reflector(
        nid_writer,
        watcher(
            Api::<NumericIdentity>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let allocator = Allocator::with_cache(client.clone(), nid_cache);
    if let Err(e) = allocator.ensure_counter().await {
        // Not fatal: the first allocation creates it (and reports the error).
        warn!(error = %e, "cannot create the IdentityCounter yet");
    }
    let gc = tokio::spawn(collect_garbage(
        client.clone(),
        Allocator::new(client.clone()),
        metrics.clone(),
        release_grace,
    ));

    let pods: Api<Pod> = Api::all(client.clone());
    let controller = Controller::new(pods.clone(), watcher::Config::default());
    let pod_store = controller.store();
    let (status_trigger, status_rx) = futures::channel::mpsc::channel::<()>(1);
    let (stop_status_tx, stop_status_rx) = futures::channel::oneshot::channel::<()>();
    let status_ctx = Arc::new(StatusContext {
        trust_domain: trust_domain.clone(),
        client: client.clone(),
        pods: pod_store.clone(),
        namespaces: namespaces.clone(),
        wids: wids.clone(),
    });
    let status_controller = tokio::spawn(
        Controller::new(
            Api::<WorkloadIdentity>::all(client.clone()),
            watcher::Config::default(),
        )
        .reconcile_all_on(status_rx)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(300)))
        .graceful_shutdown_on(async move {
            let _ = stop_status_rx.await;
        })
        .run(reconcile_status, status_error_policy, status_ctx)
        .for_each(|_| async {}),
    );
    let ctx = Arc::new(Context {
        preview,
        metrics,
        status_trigger,
        trust_domain,
        allocator,
        client: client.clone(),
        namespaces,
        wids,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
    });
    // Pods naming a SPIFFE ID whose NumericIdentity changed or went away are
    // re-evaluated (a released ID gets a new allocation).
    let nid_triggers = nid_changes
        .filter_map(|nid| async move {
            nid.map_err(|e| warn!(error = %e, "NumericIdentity watch error; retrying"))
                .ok()
        })
        .flat_map(move |nid: NumericIdentity| {
            let pods: Vec<ObjectRef<Pod>> = pod_store
                .state()
                .iter()
                .filter(|p| {
                    p.annotations().get(annotations::SPIFFE_ID) == Some(&nid.spec.spiffe_id)
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect();
            futures::stream::iter(pods)
        });
    controller
        .reconcile_on(nid_triggers)
        .reconcile_all_on(trigger_rx)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(100)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    let _ = stop_status_tx.send(());
    let _ = status_controller.await;
    gc.abort();
    Ok(())
}

/// What the WorkloadIdentity status writer reads.
struct StatusContext {
    trust_domain: TrustDomain,
    client: kube::Client,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    wids: Store<WorkloadIdentity>,
}

async fn reconcile_status(
    wid: Arc<WorkloadIdentity>,
    ctx: Arc<StatusContext>,
) -> Result<Action, IdentityError> {
    let all = ctx.wids.state();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = wid_status::compute(
        &ctx.trust_domain,
        &wid,
        &ctx.pods,
        &ctx.namespaces,
        &all,
        wid.status.as_ref(),
        now,
    );
    if wid.status.as_ref() == Some(&status) {
        return Ok(Action::await_change());
    }
    let name = wid.name_any();
    let patch = serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "WorkloadIdentity",
        "status": status,
    });
    Api::<WorkloadIdentity>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(|e| IdentityError::Status {
            name,
            source: Arc::new(e),
        })?;
    Ok(Action::await_change())
}

fn status_error_policy(
    _wid: Arc<WorkloadIdentity>,
    error: &IdentityError,
    _ctx: Arc<StatusContext>,
) -> Action {
    warn!(%error, "WorkloadIdentity status update failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_for_success_and_failure() {
        let ok = Assignment {
            source: None,
            result: Ok("spiffe://td/ns/a/sa/b".parse().unwrap()),
            conflicts: Vec::new(),
            broken_selectors: Vec::new(),
            federates_with: Vec::new(),
        };
        let got = desired_annotations(
            &ok,
            Some(Allocation {
                id: 300,
                generation: 9,
            }),
        );
        assert_eq!(
            got.get(annotations::IDENTITY).map(String::as_str),
            Some("300/9")
        );
        assert_eq!(
            got.get(annotations::IDENTITY_SOURCE).map(String::as_str),
            Some("default")
        );
        assert!(!got.contains_key(annotations::IDENTITY_ERROR));

        let failed = Assignment {
            source: Some("w".into()),
            result: Err(assign::AssignError::Template {
                wid: "w".into(),
                source: tessera_api::template::TemplateError::MissingLabel("app".into()),
            }),
            conflicts: Vec::new(),
            broken_selectors: Vec::new(),
            federates_with: Vec::new(),
        };
        let got = desired_annotations(&failed, None);
        assert_eq!(
            got.len(),
            1,
            "a failed pod keeps no stale identity: {got:?}"
        );
        assert!(got[annotations::IDENTITY_ERROR].contains("no label \"app\""));
    }
}
