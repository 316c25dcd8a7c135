//! The identity controller: gives every pod its SPIFFE ID and numeric
//! identity, and releases numeric identities no pod uses any more.
//!
//! Event-driven throughout. Pods are reconciled when they change; all pods are
//! re-evaluated when a WorkloadIdentity or a namespace's labels change (rare);
//! pods holding a SPIFFE ID are re-evaluated when its NumericIdentity goes
//! away. There is no periodic relist. A pod's identity reaches the signer,
//! the agents and SPIRE registration only as its [`PodIdentity`] record,
//! which only the operator may write: nothing a pod author writes on the pod
//! decides it (see [`tessera_api::crd::pod_identity`]).

use std::collections::HashMap;
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
use tessera_api::crd::{NumericIdentity, PodIdentity, PodIdentitySpec, WorkloadIdentity};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tracing::{debug, info, warn};

use crate::identity::allocator::{Allocation, Allocator};
use crate::identity::assign::{self, Assignment};
use crate::identity::status;
use crate::metrics::{Metrics, ResultLabel};
use crate::policy::{PendingPod, Preview};

/// How long a pod's identity waits for the policy compiler to write the
/// rules that name it (see [`Preview`]).
pub const PREVIEW_WAIT: Duration = Duration::from_secs(2);

use crate::identity::IdentityError;
use tessera_api::names::FIELD_MANAGER;

/// When a deleted pod's record is deleted a second time (see [`sweep_records`]).
const SWEEP_AGAIN: Duration = Duration::from_secs(5);

/// Shared state of the reconcilers.
pub struct Context {
    trust_domain: TrustDomain,
    allocator: Allocator,
    client: kube::Client,
    namespaces: Store<Namespace>,
    wids: Store<WorkloadIdentity>,
    /// Every pod's record, as last seen.
    records: Store<PodIdentity>,
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

/// The record a pod should have for `assignment` and its allocation; None
/// when it should have no identity (its assignment failed, or it has no UID).
pub fn desired_record(
    pod: &Pod,
    assignment: &Assignment,
    allocation: Option<Allocation>,
) -> Option<PodIdentitySpec> {
    let (Ok(id), Some(allocation)) = (&assignment.result, allocation) else {
        return None;
    };
    Some(PodIdentitySpec {
        pod_uid: pod.metadata.uid.clone()?,
        namespace: pod.namespace().unwrap_or_default(),
        pod_name: pod.name_any(),
        node_name: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        spiffe_id: id.to_string(),
        id: allocation.id,
        generation: allocation.generation,
        source: assignment.source.clone(),
        federates_with: assignment
            .federates_with
            .iter()
            .map(|td| td.as_str().to_owned())
            .collect(),
    })
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

/// Writes `spec` as the pod's record (server-side apply).
async fn apply_record(client: &kube::Client, spec: &PodIdentitySpec) -> Result<(), IdentityError> {
    let record = serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "PodIdentity",
        "metadata": {"name": spec.pod_uid},
        "spec": spec,
    });
    Api::<PodIdentity>::all(client.clone())
        .patch(
            &spec.pod_uid,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(record),
        )
        .await
        .map_err(|e| IdentityError::Record {
            pod: format!("{}/{}", spec.namespace, spec.pod_name),
            source: Arc::new(e),
        })?;
    Ok(())
}

/// Deletes the record named `uid`, if there is one.
async fn delete_record(client: &kube::Client, uid: &str, pod: &str) -> Result<(), IdentityError> {
    match Api::<PodIdentity>::all(client.clone())
        .delete(uid, &Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(IdentityError::Record {
            pod: pod.to_owned(),
            source: Arc::new(e),
        }),
    }
}

#[tracing::instrument(name = "reconcile", skip_all, fields(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())))]
async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, IdentityError> {
    // Whatever happens to this pod may change some WorkloadIdentity's status;
    // a full channel already holds a pending recompute.
    let _ = ctx.status_trigger.clone().try_send(());
    let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let Some(uid) = pod.metadata.uid.clone() else {
        return Ok(Action::await_change());
    };
    if pod.metadata.deletion_timestamp.is_some() {
        // A terminating pod keeps no identity (agents stop serving it too).
        delete_record(&ctx.client, &uid, &name).await?;
        return Ok(Action::await_change());
    }
    let assignment = assignment_for(&ctx, &pod);
    let allocation = match &assignment.result {
        Ok(id) => Some(ctx.allocator.allocate(id).await?),
        Err(_) => None,
    };
    let desired = desired_record(&pod, &assignment, allocation);
    let current = ctx
        .records
        .get(&ObjectRef::new(&uid))
        .and_then(|r| r.for_pod(&uid).cloned());
    match &desired {
        Some(spec) if current.as_ref() == Some(spec) => {}
        Some(spec) => {
            if current.as_ref().map(|c| &c.spiffe_id) != Some(&spec.spiffe_id) {
                wait_for_rules(&ctx, &pod, spec).await;
            }
            apply_record(&ctx.client, spec).await?;
            info!(pod = %name, spiffe_id = %spec.spiffe_id, id = spec.id, generation = spec.generation, "identity assigned");
            ctx.metrics.identities_assigned.inc();
        }
        None => {
            // Always asked of the API server, not of the (possibly lagging)
            // cache: a pod with no identity must have no record anywhere.
            delete_record(&ctx.client, &uid, &name).await?;
            if current.is_some() {
                info!(pod = %name, "identity withdrawn");
            }
            if assignment.result.is_err() {
                ctx.metrics.identity_failures.inc();
            }
        }
    }
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "ok" })
        .inc();
    if desired != current || assignment.result.is_err() {
        publish_events(&ctx, &pod, &assignment).await;
    }
    Ok(Action::await_change())
}

/// Holds a pod's new identity until the policy compiler has written the
/// rules that name it (see [`Preview`]), when one runs in this process.
async fn wait_for_rules(ctx: &Context, pod: &Pod, spec: &PodIdentitySpec) {
    let Some(preview) = &ctx.preview else {
        return;
    };
    let Ok(id) = spec.spiffe_id.parse() else {
        return;
    };
    let pending = PendingPod::new(
        spec.namespace.clone(),
        spec.pod_name.clone(),
        pod.labels().clone(),
        id,
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    );
    if !preview.admit(pending, PREVIEW_WAIT).await {
        warn!(pod = %format!("{}/{}", spec.namespace, spec.pod_name), wait = ?PREVIEW_WAIT,
            "the policy compiler did not write this pod's rules in time; assigning its identity anyway (check the operator's policy compiler logs)");
    }
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

/// The SPIFFE ID and allocation a record names, if well formed.
fn held(record: &PodIdentity) -> Option<(SpiffeId, Allocation)> {
    let spec = record.checked()?;
    Some((
        spec.spiffe_id.parse().ok()?,
        Allocation {
            id: spec.id,
            generation: spec.generation,
        },
    ))
}

/// Releases allocations of SPIFFE IDs no pod uses: when a record is deleted
/// or moves to another SPIFFE ID, and once after every (re)list for anything
/// that changed while nobody watched. A candidate is released only once it
/// has stayed unused for `grace`: this watch may lag the controller that
/// writes new records (a just-allocated ID would look unused), and a rolling
/// update that replaces a Deployment's only pod keeps its numeric identity
/// instead of getting a new one.
async fn collect_garbage(
    client: kube::Client,
    allocator: Allocator,
    metrics: Arc<Metrics>,
    grace: Duration,
) -> Result<(), IdentityError> {
    let identities: Api<NumericIdentity> = Api::all(client.clone());
    // What each record named when last seen, by record name (pod UID).
    let mut last: HashMap<String, (SpiffeId, Allocation)> = HashMap::new();
    // Candidates for release, and when they may go.
    let mut pending: HashMap<(SpiffeId, Allocation), tokio::time::Instant> = HashMap::new();
    let mut events = watcher(Api::<PodIdentity>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let next_due = pending.values().min().copied();
        let event = tokio::select! {
            event = events.try_next() => event.map_err(|e| IdentityError::Watch {
                what: "podidentities",
                source: Arc::new(e),
            })?,
            () = sleep_until_some(next_due) => {
                release_due(&allocator, &metrics, &last, &mut pending, grace).await;
                continue;
            }
        };
        let Some(event) = event else { break };
        let dropped = match event {
            watcher::Event::Apply(record) | watcher::Event::InitApply(record) => {
                let key = record.name_any();
                let now = held(&record);
                let before = match now.clone() {
                    Some(h) => last.insert(key, h),
                    None => last.remove(&key),
                };
                before
                    .filter(|b| Some(b) != now.as_ref())
                    .into_iter()
                    .collect()
            }
            watcher::Event::Delete(record) => last.remove(&record.name_any()).into_iter().collect(),
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

/// Releases the candidates whose grace is over and that no record holds.
async fn release_due(
    allocator: &Allocator,
    metrics: &Metrics,
    last: &HashMap<String, (SpiffeId, Allocation)>,
    pending: &mut HashMap<(SpiffeId, Allocation), tokio::time::Instant>,
    grace: Duration,
) {
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
}

/// Deletes the records of pods that no longer exist: each pod's as it is
/// deleted, and after every (re)list of pods every record whose pod was not
/// listed (pods deleted while nobody watched). Terminating pods lose theirs
/// in [`reconcile`].
async fn sweep_records(client: kube::Client) -> Result<(), IdentityError> {
    let records: Api<PodIdentity> = Api::all(client.clone());
    let mut listed: Option<std::collections::HashSet<String>> = None;
    let mut events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.try_next().await.map_err(|e| IdentityError::Watch {
        what: "pods",
        source: Arc::new(e),
    })? {
        match event {
            watcher::Event::Init => listed = Some(Default::default()),
            watcher::Event::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.metadata.uid) {
                    seen.insert(uid);
                }
            }
            watcher::Event::InitDone => {
                let Some(seen) = listed.take() else { continue };
                let all = match records.list(&Default::default()).await {
                    Ok(all) => all,
                    Err(e) => {
                        warn!(error = %e, "cannot list PodIdentities to remove those of deleted pods; next relist retries");
                        continue;
                    }
                };
                for record in all.items {
                    let uid = record.name_any();
                    // A pod made after the listing is not in `seen`: ask
                    // for the record's pod before calling it gone.
                    if !seen.contains(&uid) && !pod_exists(&client, &record).await {
                        sweep_one(
                            &client,
                            &uid,
                            "pod gone while the operator was not watching",
                        )
                        .await;
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid {
                    sweep_one(&client, &uid, "pod deleted").await;
                    // A reconcile that was under way as the pod went may
                    // write its record after this delete: delete again.
                    let client = client.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(SWEEP_AGAIN).await;
                        sweep_one(&client, &uid, "pod deleted").await;
                    });
                }
            }
            watcher::Event::Apply(_) => {}
        }
    }
    Ok(())
}

/// Whether the pod `record` was written for exists (same UID); true when
/// that cannot be told, so nothing is deleted on a failed read.
async fn pod_exists(client: &kube::Client, record: &PodIdentity) -> bool {
    let spec = &record.spec;
    match Api::<Pod>::namespaced(client.clone(), &spec.namespace)
        .get_opt(&spec.pod_name)
        .await
    {
        Ok(Some(pod)) => pod.metadata.uid.as_deref() == Some(record.name_any().as_str()),
        Ok(None) => false,
        Err(e) => {
            warn!(error = %e, pod = %format!("{}/{}", spec.namespace, spec.pod_name), "cannot read the pod of a PodIdentity; keeping the record");
            true
        }
    }
}

async fn sweep_one(client: &kube::Client, uid: &str, why: &str) {
    match delete_record(client, uid, uid).await {
        Ok(()) => debug!(pod_uid = %uid, why, "identity record removed"),
        Err(e) => {
            warn!(error = %e, pod_uid = %uid, "cannot remove the identity record of a deleted pod; the next relist retries")
        }
    }
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
    let (namespaces, wids, selectors_changed) = follow_selectors(&client).await;
    let (allocator, nid_changes) = follow_numeric_identities(&client).await;
    let gc = tokio::spawn(collect_garbage(
        client.clone(),
        Allocator::new(client.clone()),
        metrics.clone(),
        release_grace,
    ));
    let sweeper = tokio::spawn(sweep_records(client.clone()));
    let (records, record_changes) = follow_records(&client);
    let controller = Controller::new(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let status_ctx = StatusContext {
        trust_domain: trust_domain.clone(),
        client: client.clone(),
        pods: controller.store(),
        namespaces: namespaces.clone(),
        wids: wids.clone(),
    };
    let status = StatusWriter::spawn(status_ctx);
    let ctx = Arc::new(Context {
        preview,
        metrics,
        status_trigger: status.trigger.clone(),
        trust_domain,
        allocator,
        client: client.clone(),
        namespaces,
        wids,
        records: records.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: tessera_api::names::OPERATOR.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
    });
    controller
        .reconcile_on(pods_naming(nid_changes, records))
        .reconcile_on(record_changes)
        .reconcile_all_on(selectors_changed)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(100)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    status.stop().await;
    gc.abort();
    sweeper.abort();
    Ok(())
}

/// Namespaces and WorkloadIdentities, followed; the receiver gets a
/// message on every change of either (any of them re-evaluates every pod).
/// Returns once both are listed.
async fn follow_selectors(
    client: &kube::Client,
) -> (
    Store<Namespace>,
    Store<WorkloadIdentity>,
    futures::channel::mpsc::Receiver<()>,
) {
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (wids, wid_writer) = reflector::store::<WorkloadIdentity>();
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::channel::<()>(16);
    let feed = |stream: futures::stream::BoxStream<'static, Result<(), watcher::Error>>,
                what: &'static str| {
        let mut tx = trigger_tx.clone();
        async move {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                match item {
                    // A full channel already holds a pending trigger.
                    Ok(()) => drop(tx.try_send(())),
                    Err(e) => warn!(error = %e, what, "watch error; retrying"),
                }
            }
        }
    };
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
    tokio::spawn(feed(
        ns_stream.default_backoff().map_ok(|_| ()).boxed(),
        "namespaces",
    ));
    tokio::spawn(feed(
        wid_stream.default_backoff().map_ok(|_| ()).boxed(),
        "workloadidentities",
    ));
    namespaces.wait_until_ready().await.ok();
    wids.wait_until_ready().await.ok();
    (namespaces, wids, trigger_rx)
}

/// The allocator, over a cache of the NumericIdentities, and the stream of
/// their changes.
async fn follow_numeric_identities(
    client: &kube::Client,
) -> (
    Allocator,
    futures::stream::BoxStream<'static, Result<NumericIdentity, watcher::Error>>,
) {
    let (nid_cache, nid_writer) = reflector::store::<NumericIdentity>();
    let changes = reflector::reflector(
        nid_writer,
        watcher(
            Api::<NumericIdentity>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .boxed();
    let allocator = Allocator::with_cache(client.clone(), nid_cache);
    if let Err(e) = allocator.ensure_counter().await {
        // Not fatal: the first allocation creates it (and reports the error).
        warn!(error = %e, "cannot create the IdentityCounter yet");
    }
    (allocator, changes)
}

/// The records, cached to skip writes that change nothing, and the pods
/// whose record changed (a hand edit or deletion included), to re-run.
fn follow_records(
    client: &kube::Client,
) -> (
    Store<PodIdentity>,
    futures::stream::BoxStream<'static, ObjectRef<Pod>>,
) {
    let (records, writer) = reflector::store::<PodIdentity>();
    let changes = reflector::reflector(
        writer,
        watcher(
            Api::<PodIdentity>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|r| async move {
        r.map_err(|e| warn!(error = %e, "PodIdentity watch error; retrying"))
            .ok()
    })
    .map(|r: PodIdentity| ObjectRef::<Pod>::new(&r.spec.pod_name).within(&r.spec.namespace))
    .boxed();
    (records, changes)
}

/// The pods naming a SPIFFE ID whose NumericIdentity changed or went away,
/// to re-evaluate (a released ID gets a new allocation).
fn pods_naming(
    nid_changes: futures::stream::BoxStream<'static, Result<NumericIdentity, watcher::Error>>,
    records: Store<PodIdentity>,
) -> impl futures::Stream<Item = ObjectRef<Pod>> + Send + 'static {
    nid_changes
        .filter_map(|nid| async move {
            nid.map_err(|e| warn!(error = %e, "NumericIdentity watch error; retrying"))
                .ok()
        })
        .flat_map(move |nid: NumericIdentity| {
            let pods: Vec<ObjectRef<Pod>> = records
                .state()
                .iter()
                .filter(|r| r.spec.spiffe_id == nid.spec.spiffe_id)
                .map(|r| ObjectRef::new(&r.spec.pod_name).within(&r.spec.namespace))
                .collect();
            futures::stream::iter(pods)
        })
}

/// The WorkloadIdentity status writer, running.
struct StatusWriter {
    /// Asks it to recompute (coalesced).
    trigger: futures::channel::mpsc::Sender<()>,
    stop: futures::channel::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusWriter {
    fn spawn(ctx: StatusContext) -> StatusWriter {
        let (trigger, status_rx) = futures::channel::mpsc::channel::<()>(1);
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        let task = tokio::spawn(
            Controller::new(
                Api::<WorkloadIdentity>::all(ctx.client.clone()),
                watcher::Config::default(),
            )
            .reconcile_all_on(status_rx)
            .with_config(ControllerConfig::default().debounce(Duration::from_millis(300)))
            .graceful_shutdown_on(async move {
                let _ = stopped.await;
            })
            .run(reconcile_status, status_error_policy, Arc::new(ctx))
            .for_each(|_| async {}),
        );
        StatusWriter {
            trigger,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What the WorkloadIdentity status writer reads.
struct StatusContext {
    trust_domain: TrustDomain,
    client: kube::Client,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    wids: Store<WorkloadIdentity>,
}

#[tracing::instrument(name = "reconcile", skip_all, fields(workloadidentity = %wid.name_any()))]
async fn reconcile_status(
    wid: Arc<WorkloadIdentity>,
    ctx: Arc<StatusContext>,
) -> Result<Action, IdentityError> {
    let all = ctx.wids.state();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status::compute(
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

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                "annotations": {"tessera.dev/spiffe-id": "spiffe://td/forged"}},
            "spec": {"nodeName": "node-a", "containers": []}
        }))
        .unwrap()
    }

    #[test]
    fn records_for_success_and_failure() {
        let ok = Assignment {
            source: None,
            result: Ok("spiffe://td/ns/shop/sa/default".parse().unwrap()),
            conflicts: Vec::new(),
            broken_selectors: Vec::new(),
            federates_with: vec!["b.test".parse().unwrap()],
        };
        let allocation = Allocation {
            id: 300,
            generation: 9,
        };
        let got = desired_record(&pod(), &ok, Some(allocation)).unwrap();
        assert_eq!(
            got,
            PodIdentitySpec {
                pod_uid: "u-1".into(),
                namespace: "shop".into(),
                pod_name: "web-1".into(),
                node_name: "node-a".into(),
                spiffe_id: "spiffe://td/ns/shop/sa/default".into(),
                id: 300,
                generation: 9,
                source: None,
                federates_with: vec!["b.test".into()],
            },
            "the pod's own annotations play no part"
        );

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
        assert_eq!(desired_record(&pod(), &failed, None), None);
        assert_eq!(desired_record(&pod(), &ok, None), None);
    }
}
