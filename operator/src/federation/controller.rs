//! The FederatedTrustDomain controller: fetches each foreign trust domain's
//! bundle from its SPIFFE bundle endpoint, on the schedule the bundle's
//! `spiffe_refresh_hint` asks for, and publishes it for the node agents.
//!
//! Bundles are published in the ConfigMap [`STORE_NAME`] in the operator's
//! namespace, one key per trust domain (the trust domain name) holding
//! that trust domain's SPIFFE bundle document: bundles of different trust
//! domains are never merged, and agents verify a peer only against the
//! bundle of the peer's own trust domain. The ConfigMap is also where the
//! last good bundle is kept across fetch failures and operator restarts.
//!
//! Rules:
//! - The bootstrap bundle (`trustDomainBundle`) is published until the
//!   first fetch succeeds; an https_spiffe endpoint is authenticated
//!   against the bundle currently published for its trust domain.
//! - A failed fetch, a malformed bundle or an empty one changes nothing
//!   published: the previous bundle stays in use, the condition turns
//!   `Stale` (or `Error` when there is no bundle at all), and the fetch is
//!   retried within [`MAX_RETRY`].
//! - This cluster's own trust domain cannot be federated, and two
//!   FederatedTrustDomains for one trust domain are refused (the older one
//!   wins), so no foreign endpoint can add anchors for a trust domain some
//!   other source already speaks for.
//! - Deleting a FederatedTrustDomain removes its bundle (a finalizer
//!   makes sure of it); agents stop trusting the trust domain at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, reflector, watcher};
use kube::{Resource, ResourceExt};
use rustls::pki_types::CertificateDer;
use tessera_api::bundle::{BundleError, SpiffeBundle};
use tessera_api::crd::CONDITION_READY;
use tessera_api::crd::federated_trust_domain::{
    BundleEndpointProfileType, FederatedTrustDomain, FederatedTrustDomainSpec,
    FederatedTrustDomainStatus,
};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use tracing::{error, info, warn};

use crate::federation::fetch::{self, Profile};
use crate::metrics::{FetchLabel, Metrics};

/// The ConfigMap (in the operator's namespace) holding the federated
/// bundles, one key per trust domain.
pub const STORE_NAME: &str = tessera_api::bundle::FEDERATED_CONFIGMAP;
/// Finalizer that removes a deleted FederatedTrustDomain's bundle.
pub const FINALIZER: &str = "tessera.dev/federated-bundle";
/// Refresh interval when neither the bundle nor the spec gives one.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Shortest refresh honoured, whatever the hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Longest refresh honoured.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Longest wait before retrying after a failed fetch.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// Condition reasons.
pub const REASON_FRESH: &str = "Fresh";
/// The last fetch failed; the previous bundle stays in use.
pub const REASON_STALE: &str = "Stale";
/// There is no bundle in use.
pub const REASON_ERROR: &str = "Error";
/// Ready reason: no successful refresh within the maximum age; the bundle
/// is withdrawn and the trust domain's peers are not trusted.
pub const REASON_EXPIRED: &str = "Expired";
/// The longest any federated bundle is trusted without a refresh.
pub const MAX_BUNDLE_AGE: Duration = Duration::from_secs(24 * 3600);
use crate::federation::FederationError;
use tessera_api::names::FIELD_MANAGER;

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> FederationError {
    let what = what.into();
    move |e| FederationError::Api {
        what,
        source: Arc::new(e),
    }
}

/// Where the controller publishes and what it refuses.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// This cluster's own trust domain (never federated).
    pub own: TrustDomain,
    /// The operator's namespace, where [`STORE_NAME`] lives.
    pub namespace: String,
}

struct Context {
    client: kube::Client,
    cfg: FederationConfig,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    store: reflector::Store<FederatedTrustDomain>,
    stale: Mutex<BTreeSet<String>>,
}

/// Reads the published bundles: trust domain name -> bundle document.
pub async fn published(
    client: &kube::Client,
    namespace: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(maps
        .get_opt(STORE_NAME)
        .await?
        .and_then(|cm| cm.data)
        .unwrap_or_default())
}

/// Sets (`Some`) or removes (`None`) one trust domain's published bundle,
/// creating the ConfigMap when needed. Other trust domains' keys are left
/// alone (JSON merge patch of one key).
async fn publish(
    client: &kube::Client,
    namespace: &str,
    td: &str,
    document: Option<&str>,
) -> Result<(), FederationError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({ "data": { td: document } });
    match maps
        .patch(STORE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let Some(document) = document else {
                return Ok(());
            };
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(STORE_NAME.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_owned(),
                        "tessera".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(td.to_owned(), document.to_owned())])),
                ..ConfigMap::default()
            };
            match maps.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(()),
                // Created meanwhile by another reconcile: patch it.
                Err(kube::Error::Api(s)) if s.code == 409 => maps
                    .patch(STORE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(api_err(format!("{td} (publishing its bundle)"))),
                Err(e) => Err(api_err(format!("{td} (publishing its bundle)"))(e)),
            }
        }
        Err(e) => Err(api_err(format!("{td} (publishing its bundle)"))(e)),
    }
}

/// How long to wait before the next fetch after a successful one: the
/// bundle's refresh hint, else the spec's refreshInterval, else
/// [`DEFAULT_REFRESH`], kept within [`MIN_REFRESH`]..=[`MAX_REFRESH`].
pub fn refresh_after(hint: Option<u64>, spec_interval: Option<&str>) -> Duration {
    let chosen = hint
        .map(Duration::from_secs)
        .or_else(|| spec_interval.and_then(|s| tessera_api::duration::parse(s).ok()));
    chosen
        .unwrap_or(DEFAULT_REFRESH)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

/// The outcome of one reconcile, turned into status.
struct Outcome {
    reason: &'static str,
    message: String,
    bundle: Option<SpiffeBundle>,
    refreshed: bool,
    next: Duration,
}

/// How long until the next fetch is due, when it is not due yet: the
/// status describes the current generation and its next refresh time is
/// ahead (by more than a second, so a timer firing early does not wait
/// again).
fn not_due(ftd: &FederatedTrustDomain, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    let status = ftd.status.as_ref()?;
    if status.observed_generation != ftd.metadata.generation {
        return None;
    }
    let next = status.next_refresh_time.as_ref()?.0;
    let ahead = next.duration_since(now);
    if ahead.as_millis() <= 1000 {
        return None;
    }
    Some(Duration::try_from(ahead).ok()?.min(MAX_REFRESH))
}

fn key_count(b: &SpiffeBundle) -> i64 {
    (b.x509_authorities.len() + b.jwt_authorities.keys.len()) as i64
}

fn status_for(
    ftd: &FederatedTrustDomain,
    outcome: &Outcome,
    now: k8s_openapi::jiff::Timestamp,
) -> FederatedTrustDomainStatus {
    let previous = ftd.status.clone().unwrap_or_default();
    let generation = ftd.metadata.generation;
    let status = if outcome.reason == REASON_FRESH {
        "True"
    } else {
        "False"
    };
    let old = previous
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY);
    let last_transition_time = match old {
        Some(c) if c.status == status && c.reason == outcome.reason => {
            c.last_transition_time.clone()
        }
        _ => Time(now),
    };
    let next = now
        .checked_add(
            k8s_openapi::jiff::SignedDuration::try_from(outcome.next)
                .unwrap_or(k8s_openapi::jiff::SignedDuration::ZERO),
        )
        .unwrap_or(now);
    FederatedTrustDomainStatus {
        conditions: vec![Condition {
            type_: CONDITION_READY.to_owned(),
            status: status.to_owned(),
            reason: outcome.reason.to_owned(),
            message: outcome.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }],
        observed_generation: generation,
        last_refresh_time: if outcome.refreshed {
            Some(Time(now))
        } else {
            previous.last_refresh_time
        },
        sequence_number: outcome
            .bundle
            .as_ref()
            .and_then(|b| b.sequence)
            .and_then(|s| i64::try_from(s).ok()),
        key_count: outcome.bundle.as_ref().map(key_count),
        next_refresh_time: Some(Time(next)),
        last_error: if outcome.reason == REASON_FRESH {
            None
        } else {
            Some(outcome.message.clone())
        },
    }
}

/// An FTD older than `ftd` (creation time, then name) for the same trust
/// domain, if any: it owns the trust domain.
fn owner_of(ftd: &FederatedTrustDomain, all: &[Arc<FederatedTrustDomain>]) -> Option<String> {
    let key = |f: &FederatedTrustDomain| (f.metadata.creation_timestamp.clone(), f.name_any());
    all.iter()
        .filter(|o| o.spec.trust_domain == ftd.spec.trust_domain && o.name_any() != ftd.name_any())
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| key(o) < key(ftd))
        .map(|o| o.name_any())
        .next()
}

/// Why an FTD's spec cannot be acted on; reported in its status.
#[derive(Debug, thiserror::Error)]
enum SpecProblem {
    #[error("trustDomain: {0}")]
    TrustDomain(tessera_api::spiffe::SpiffeIdError),
    #[error("{0} is this cluster's own trust domain; it cannot be federated")]
    Own(TrustDomain),
    #[error(
        "trust domain {td} is already federated by FederatedTrustDomain {owner}; delete one of the two"
    )]
    Duplicate { td: TrustDomain, owner: String },
    #[error("trustDomainBundle is not a SPIFFE bundle: {0}")]
    Bootstrap(BundleError),
    #[error("caBundle: {0}")]
    CaBundle(rustls::pki_types::pem::Error),
    #[error("caBundle holds no CERTIFICATE block")]
    CaBundleEmpty,
    #[error("https_spiffe needs endpointSPIFFEID")]
    NoEndpointId,
    #[error("endpointSPIFFEID: {0}")]
    EndpointId(tessera_api::spiffe::SpiffeIdError),
    #[error(
        "endpointSPIFFEID {id} is not in trust domain {td}: the endpoint must present an X509-SVID of the trust domain whose bundle authenticates it"
    )]
    EndpointOutside { id: SpiffeId, td: TrustDomain },
    #[error(
        "https_spiffe needs {0}'s bundle to authenticate the endpoint: set trustDomainBundle (for example from `spire-server bundle show -format spiffe`)"
    )]
    NoBundleForEndpoint(TrustDomain),
}

impl SpecProblem {
    /// When to look again: soon for a duplicate (its owner may go away),
    /// else at the longest refresh (the spec must change first).
    fn next(&self) -> Duration {
        match self {
            SpecProblem::Duplicate { .. } => MAX_RETRY,
            _ => MAX_REFRESH,
        }
    }
}

/// Why a fetch gave no usable bundle.
#[derive(Debug, thiserror::Error)]
enum FetchProblem {
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error("{0} served a bundle with no keys")]
    Empty(String),
}

/// What stops a reconcile before the fetch.
#[derive(Debug)]
enum Halt {
    Spec(SpecProblem),
    Api(FederationError),
}

impl From<SpecProblem> for Halt {
    fn from(p: SpecProblem) -> Halt {
        Halt::Spec(p)
    }
}

impl From<FederationError> for Halt {
    fn from(e: FederationError) -> Halt {
        Halt::Api(e)
    }
}

/// How the endpoint is authenticated, as the spec says.
#[derive(Debug)]
enum EndpointAuth {
    Web(Option<Vec<CertificateDer<'static>>>),
    Spiffe(SpiffeId),
}

/// What a reconcile fetches with: the trust domain, the bundle held for it
/// (published, else the bootstrap one), and how to authenticate its endpoint.
#[derive(Debug)]
struct Prepared {
    td: TrustDomain,
    held: Option<SpiffeBundle>,
    auth: EndpointAuth,
}

impl Outcome {
    fn error(message: String, next: Duration) -> Outcome {
        Outcome {
            reason: REASON_ERROR,
            message,
            bundle: None,
            refreshed: false,
            next,
        }
    }
}

async fn apply(
    ftd: Arc<FederatedTrustDomain>,
    ctx: Arc<Context>,
) -> Result<Action, FederationError> {
    // Every status write comes back as an event; fetch only when due (or
    // when the spec changed), else wait for the time in the status.
    if let Some(wait) = not_due(&ftd, k8s_openapi::jiff::Timestamp::now()) {
        return Ok(Action::requeue(wait));
    }
    let outcome = match prepare(&ftd, &ctx).await {
        Ok(prepared) => refresh(&ftd, &ctx, prepared).await?,
        Err(Halt::Spec(problem)) => Outcome::error(problem.to_string(), problem.next()),
        Err(Halt::Api(e)) => return Err(e),
    };
    count_stale(&ctx, &ftd.name_any(), &outcome);
    write_status(&ctx, &ftd, &outcome).await?;
    Ok(Action::requeue(outcome.next))
}

/// Checks the spec and finds the bundle held for its trust domain,
/// publishing the bootstrap bundle when none is.
async fn prepare(ftd: &FederatedTrustDomain, ctx: &Context) -> Result<Prepared, Halt> {
    let td: TrustDomain = ftd
        .spec
        .trust_domain
        .parse()
        .map_err(SpecProblem::TrustDomain)?;
    if td == ctx.cfg.own {
        return Err(SpecProblem::Own(td).into());
    }
    if let Some(owner) = owner_of(ftd, &ctx.store.state()) {
        // Checked again later in case the owner goes away.
        return Err(SpecProblem::Duplicate { td, owner }.into());
    }
    let held = held_bundle(ftd, ctx, &td).await?;
    let auth = endpoint_auth(&ftd.spec, &td, held.as_ref())?;
    Ok(Prepared { td, held, auth })
}

/// The bundle published for `td`, else the bootstrap bundle (published
/// now) unless the held one was withdrawn for its age.
async fn held_bundle(
    ftd: &FederatedTrustDomain,
    ctx: &Context,
    td: &TrustDomain,
) -> Result<Option<SpiffeBundle>, Halt> {
    let published = published(&ctx.client, &ctx.cfg.namespace)
        .await
        .map_err(api_err(format!("{td} (reading the published bundles)")))?;
    if let Some(document) = published.get(td.as_str()) {
        match SpiffeBundle::from_json(document.as_bytes()) {
            Ok(decoded) => return Ok(Some(decoded.bundle)),
            Err(e) => {
                warn!(trust_domain = %td, error = %e, "the published bundle is malformed; starting again from trustDomainBundle")
            }
        }
    }
    let Some(boot) = ftd
        .spec
        .trust_domain_bundle
        .as_ref()
        .filter(|_| !withdrawn_for_age(ftd))
    else {
        return Ok(None);
    };
    let bundle = SpiffeBundle::from_json(boot.as_bytes())
        .map_err(SpecProblem::Bootstrap)?
        .bundle;
    publish(&ctx.client, &ctx.cfg.namespace, td.as_str(), Some(boot)).await?;
    info!(ftd = %ftd.name_any(), trust_domain = %td, "bootstrap bundle published");
    Ok(Some(bundle))
}

/// How the spec says to authenticate the endpoint.
fn endpoint_auth(
    spec: &FederatedTrustDomainSpec,
    td: &TrustDomain,
    held: Option<&SpiffeBundle>,
) -> Result<EndpointAuth, SpecProblem> {
    use rustls::pki_types::pem::PemObject;
    let profile = &spec.bundle_endpoint_profile;
    match profile.profile_type {
        BundleEndpointProfileType::HttpsWeb => {
            let Some(pem) = &profile.ca_bundle else {
                return Ok(EndpointAuth::Web(None));
            };
            let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(SpecProblem::CaBundle)?;
            if roots.is_empty() {
                return Err(SpecProblem::CaBundleEmpty);
            }
            Ok(EndpointAuth::Web(Some(roots)))
        }
        BundleEndpointProfileType::HttpsSpiffe => {
            let id = profile
                .endpoint_spiffe_id
                .as_ref()
                .ok_or(SpecProblem::NoEndpointId)?;
            let id: SpiffeId = id.parse().map_err(SpecProblem::EndpointId)?;
            if !id.is_member_of(td) {
                return Err(SpecProblem::EndpointOutside { id, td: td.clone() });
            }
            if held.is_none() {
                return Err(SpecProblem::NoBundleForEndpoint(td.clone()));
            }
            Ok(EndpointAuth::Spiffe(id))
        }
    }
}

/// Fetches the bundle, counts the fetch, and publishes what it gave.
async fn refresh(
    ftd: &FederatedTrustDomain,
    ctx: &Context,
    prepared: Prepared,
) -> Result<Outcome, FederationError> {
    let Prepared { td, held, auth } = prepared;
    let url = &ftd.spec.bundle_endpoint_url;
    let profile = match (&auth, &held) {
        (EndpointAuth::Web(roots), _) => Profile::Web(roots.as_deref()),
        (EndpointAuth::Spiffe(id), Some(bundle)) => Profile::Spiffe { id, bundle },
        (EndpointAuth::Spiffe(_), None) => {
            let problem = SpecProblem::NoBundleForEndpoint(td);
            return Ok(Outcome::error(problem.to_string(), problem.next()));
        }
    };
    let fetched = match fetch::fetch(url, profile).await {
        Ok(d) if key_count(&d.bundle) == 0 => Err(FetchProblem::Empty(url.clone())),
        other => other.map_err(FetchProblem::from),
    };
    let result = if fetched.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .federation_fetches
        .get_or_create(&FetchLabel {
            trust_domain: td.to_string(),
            result,
        })
        .inc();
    match fetched {
        Ok(decoded) => fetched_bundle(ftd, ctx, &td, held.as_ref(), decoded).await,
        Err(e) => fetch_failed(ftd, ctx, &td, held, e).await,
    }
}

/// A fetch succeeded: drops expired authorities and publishes the bundle
/// when it changed.
async fn fetched_bundle(
    ftd: &FederatedTrustDomain,
    ctx: &Context,
    td: &TrustDomain,
    held: Option<&SpiffeBundle>,
    decoded: tessera_api::bundle::Decoded,
) -> Result<Outcome, FederationError> {
    let url = &ftd.spec.bundle_endpoint_url;
    for note in &decoded.ignored {
        info!(trust_domain = %td, "bundle key ignored: {note}");
    }
    let (bundle, expired) = without_expired(
        decoded.bundle,
        k8s_openapi::jiff::Timestamp::now().as_second(),
    );
    if expired > 0 {
        info!(trust_domain = %td, expired, "expired X.509 authorities dropped from the fetched bundle");
    }
    if key_count(&bundle) == 0 {
        return Ok(Outcome::error(
            format!("{url} served only expired authorities"),
            MAX_RETRY,
        ));
    }
    let sequence = bundle.sequence.map_or("none".to_owned(), |s| s.to_string());
    if held != Some(&bundle) {
        let document = match bundle.to_json() {
            Ok(d) => String::from_utf8_lossy(&d).into_owned(),
            Err(e) => return Ok(Outcome::error(e.to_string(), MAX_RETRY)),
        };
        publish(
            &ctx.client,
            &ctx.cfg.namespace,
            td.as_str(),
            Some(&document),
        )
        .await?;
        let note = format!(
            "bundle of {td} updated: sequence {sequence}, {} X.509 and {} JWT authorities",
            bundle.x509_authorities.len(),
            bundle.jwt_authorities.keys.len()
        );
        info!(ftd = %ftd.name_any(), "{note}");
        emit(ctx, ftd, EventType::Normal, "BundleUpdated", note).await;
    }
    Ok(Outcome {
        reason: REASON_FRESH,
        message: format!("fetched from {url}; sequence {sequence}"),
        next: refresh_after(bundle.refresh_hint, ftd.spec.refresh_interval.as_deref()),
        bundle: Some(bundle),
        refreshed: true,
    })
}

/// A fetch failed: the held bundle stays in use until it is older than
/// the maximum age, then it is withdrawn.
async fn fetch_failed(
    ftd: &FederatedTrustDomain,
    ctx: &Context,
    td: &TrustDomain,
    held: Option<SpiffeBundle>,
    e: FetchProblem,
) -> Result<Outcome, FederationError> {
    let name = ftd.name_any();
    // Retry at the pace the trust domain asked for, at most MAX_RETRY apart.
    let hint = held.as_ref().and_then(|b| b.refresh_hint);
    let next = refresh_after(hint, ftd.spec.refresh_interval.as_deref()).min(MAX_RETRY);
    emit(ctx, ftd, EventType::Warning, "FetchFailed", e.to_string()).await;
    let (age, max) = (age_of_held(ftd), max_age(&ftd.spec, hint));
    let Some(bundle) = held else {
        warn!(ftd = %name, trust_domain = %td, error = %e, "bundle fetch failed; no bundle for this trust domain yet");
        return Ok(Outcome::error(format!("no bundle yet: {e}"), next));
    };
    if age > max {
        publish(&ctx.client, &ctx.cfg.namespace, td.as_str(), None).await?;
        let note = format!(
            "no successful refresh for {}s, more than maxBundleAge ({}s): the bundle of {td} is withdrawn and its peers are not trusted until a fetch succeeds; last error: {e}",
            age.as_secs(),
            max.as_secs()
        );
        error!(ftd = %name, trust_domain = %td, "{note}");
        return Ok(Outcome {
            reason: REASON_EXPIRED,
            message: note,
            bundle: None,
            refreshed: false,
            next,
        });
    }
    warn!(ftd = %name, trust_domain = %td, error = %e, "bundle fetch failed; the previous bundle stays in use");
    Ok(Outcome {
        reason: REASON_STALE,
        message: format!(
            "the last fetch failed, the previous bundle (sequence {}) stays in use: {e}",
            bundle.sequence.map_or("none".to_owned(), |s| s.to_string())
        ),
        bundle: Some(bundle),
        refreshed: false,
        next,
    })
}

/// Counts the FTDs whose bundle is stale.
fn count_stale(ctx: &Context, name: &str, outcome: &Outcome) {
    let mut stale = ctx.stale.lock().unwrap_or_else(|p| p.into_inner());
    if outcome.reason == REASON_STALE {
        stale.insert(name.to_owned());
    } else {
        stale.remove(name);
    }
    ctx.metrics.federation_stale.set(stale.len() as i64);
}

/// Writes the status the outcome makes, when it differs.
async fn write_status(
    ctx: &Context,
    ftd: &FederatedTrustDomain,
    outcome: &Outcome,
) -> Result<(), FederationError> {
    let name = ftd.name_any();
    let status = status_for(ftd, outcome, k8s_openapi::jiff::Timestamp::now());
    if ftd.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "FederatedTrustDomain",
        "status": status,
    });
    Api::<FederatedTrustDomain>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(api_err(format!("{name} (writing its status)")))?;
    Ok(())
}

async fn cleanup(
    ftd: Arc<FederatedTrustDomain>,
    ctx: Arc<Context>,
) -> Result<Action, FederationError> {
    let name = ftd.name_any();
    let td = &ftd.spec.trust_domain;
    // Only the FTD that owns the trust domain removes its bundle; a
    // refused duplicate never published one.
    let owns = td.parse::<TrustDomain>().is_ok_and(|t| t != ctx.cfg.own)
        && owner_of(&ftd, &ctx.store.state()).is_none();
    if owns {
        publish(&ctx.client, &ctx.cfg.namespace, td, None).await?;
        info!(ftd = %name, trust_domain = %td, "federation removed; bundle withdrawn");
    }
    ctx.stale
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    Ok(Action::await_change())
}

async fn emit(
    ctx: &Context,
    ftd: &FederatedTrustDomain,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "FetchBundle".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ftd.object_ref(&())).await {
        warn!(error = %e, "cannot publish event");
    }
}

#[tracing::instrument(name = "reconcile", skip_all, fields(federatedtrustdomain = %ftd.name_any()))]
async fn reconcile(
    ftd: Arc<FederatedTrustDomain>,
    ctx: Arc<Context>,
) -> Result<Action, FederationError> {
    let api: Api<FederatedTrustDomain> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, ftd, |event| async {
        match event {
            Finalizer::Apply(ftd) => apply(ftd, ctx.clone()).await,
            Finalizer::Cleanup(ftd) => cleanup(ftd, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| FederationError::Finalizer(e.to_string()))
}

fn error_policy(
    ftd: Arc<FederatedTrustDomain>,
    error: &FederationError,
    _: Arc<Context>,
) -> Action {
    warn!(ftd = %ftd.name_any(), %error, "FederatedTrustDomain reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until `stop` resolves.
pub async fn run(
    client: kube::Client,
    cfg: FederationConfig,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<FederatedTrustDomain> = Api::all(client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        cfg,
        metrics,
        store: controller.store(),
        stale: Mutex::new(BTreeSet::new()),
    });
    controller
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

/// The longest `spec`'s bundle is trusted without a successful refresh:
/// its `maxBundleAge`, else three refresh intervals; never more than
/// [`MAX_BUNDLE_AGE`].
pub fn max_age(spec: &FederatedTrustDomainSpec, hint: Option<u64>) -> Duration {
    spec.max_bundle_age
        .as_deref()
        .and_then(|a| tessera_api::duration::parse(a).ok())
        .unwrap_or_else(|| 3 * refresh_after(hint, spec.refresh_interval.as_deref()))
        .min(MAX_BUNDLE_AGE)
}

/// How long ago the held bundle was last known good: the last successful
/// refresh, else (a bootstrap bundle) the object's creation.
fn age_of_held(ftd: &FederatedTrustDomain) -> Duration {
    let since = ftd
        .status
        .as_ref()
        .and_then(|s| s.last_refresh_time.as_ref())
        .or(ftd.metadata.creation_timestamp.as_ref())
        .map(|t| t.0);
    since
        .and_then(|t| {
            Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(t)).ok()
        })
        .unwrap_or(Duration::ZERO)
}

/// True when this generation's bundle was withdrawn for its age: the
/// bootstrap bundle must not bring it back (an edit of the object may).
fn withdrawn_for_age(ftd: &FederatedTrustDomain) -> bool {
    ftd.status.as_ref().is_some_and(|s| {
        s.observed_generation == ftd.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_READY && c.reason == REASON_EXPIRED)
    })
}

/// `bundle` without the X.509 authorities that expired by `now` (Unix
/// seconds), or that cannot be read; and how many went.
pub fn without_expired(mut bundle: SpiffeBundle, now: i64) -> (SpiffeBundle, usize) {
    let before = bundle.x509_authorities.len();
    bundle.x509_authorities.retain(|der| {
        x509_parser::parse_x509_certificate(der)
            .is_ok_and(|(_, cert)| cert.validity().not_after.timestamp() > now)
    });
    let dropped = before - bundle.x509_authorities.len();
    (bundle, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(not_after: time::OffsetDateTime) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = not_after - time::Duration::days(30);
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn expired_authorities_are_dropped() {
        let now = time::OffsetDateTime::now_utc();
        let live = root(now + time::Duration::days(1));
        let bundle = SpiffeBundle {
            x509_authorities: vec![
                root(now - time::Duration::days(1)),
                live.clone(),
                vec![1, 2, 3],
            ],
            jwt_authorities: Default::default(),
            sequence: Some(1),
            refresh_hint: None,
        };
        let (kept, dropped) = without_expired(bundle, now.unix_timestamp());
        assert_eq!(dropped, 2);
        assert_eq!(kept.x509_authorities, vec![live]);
    }

    #[test]
    fn the_maximum_age_defaults_to_three_refreshes_and_never_exceeds_a_day() {
        let spec = |interval: Option<&str>, max: Option<&str>| FederatedTrustDomainSpec {
            trust_domain: "b.test".into(),
            bundle_endpoint_url: "https://b.test/".into(),
            bundle_endpoint_profile: serde_json::from_value(
                serde_json::json!({"type": "https_web"}),
            )
            .unwrap(),
            trust_domain_bundle: None,
            refresh_interval: interval.map(Into::into),
            max_bundle_age: max.map(Into::into),
        };
        assert_eq!(
            max_age(&spec(None, None), Some(60)),
            Duration::from_secs(180)
        );
        assert_eq!(
            max_age(&spec(Some("10m"), None), None),
            Duration::from_secs(1800)
        );
        assert_eq!(
            max_age(&spec(Some("10m"), Some("45s")), Some(5)),
            Duration::from_secs(45)
        );
        assert_eq!(max_age(&spec(Some("24h"), None), None), MAX_BUNDLE_AGE);
    }

    #[test]
    fn refresh_follows_the_hint_within_bounds() {
        assert_eq!(
            refresh_after(Some(60), Some("10m")),
            Duration::from_secs(60)
        );
        assert_eq!(refresh_after(None, Some("10m")), Duration::from_secs(600));
        assert_eq!(refresh_after(None, None), DEFAULT_REFRESH);
        assert_eq!(refresh_after(Some(0), None), MIN_REFRESH);
        assert_eq!(refresh_after(Some(u64::MAX / 2), None), MAX_REFRESH);
        assert_eq!(refresh_after(None, Some("junk")), DEFAULT_REFRESH);
    }
}
