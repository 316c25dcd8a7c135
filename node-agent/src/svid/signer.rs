//! Keeps the SVIDs of this node's pods: watches the PodIdentity records of
//! the pods scheduled here (see [`crate::svid::records`]),
//! asks the operator's signing service for an X.509-SVID (a fresh key each
//! time, kept on this node) whenever a pod gains or changes identity, renews at
//! half-life, and drops a pod's material when it goes away. A still-valid SVID
//! stays in use until its replacement arrives.

use std::collections::HashMap;
use std::path::PathBuf;

use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use rcgen::{CertificateParams, KeyPair};
use tessera_api::crd::PodIdentity as PodIdentityRecord;
use tessera_api::jwt::JwkSet;
use tessera_api::signer_api::signer_client::SignerClient;
use tessera_api::signer_api::{SignJwtsvidRequest, SignX509svidRequest};
use tessera_api::spiffe::SpiffeId;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::clock::renew_at;
use crate::svid::records::LocalPod;
use crate::svid::records::PodUid;
use crate::svid::store::{Bundles, IdentityStore, PodSvids, X509Svid};
use crate::svid::{JwtCache, JwtSvid, SvidError};

/// Where and how to ask for SVIDs.
#[derive(Debug, Clone)]
pub struct SvidConfig {
    /// This node's name.
    pub node_name: String,
    /// File holding the agent's node-bound service-account token (re-read per call).
    pub token_file: PathBuf,
}

/// `message` as a request carrying the agent's token (re-read each time, as
/// the kubelet rotates it).
fn authorized<T>(cfg: &SvidConfig, message: T) -> Result<tonic::Request<T>, SvidError> {
    let token = std::fs::read_to_string(&cfg.token_file).map_err(|source| SvidError::Token {
        path: cfg.token_file.clone(),
        source,
    })?;
    let header = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| SvidError::Answer("the token is not a valid header value".into()))?;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", header);
    Ok(request)
}

fn jwk_set(json: &[u8]) -> Result<JwkSet, SvidError> {
    JwkSet::from_json(json).map_err(|e| SvidError::Answer(e.to_string()))
}

/// Asks the signer for one pod's SVID, with a new key.
async fn issue(
    signer: &mut SignerClient<Channel>,
    cfg: &SvidConfig,
    namespace: &str,
    name: &str,
    uid: &PodUid,
) -> Result<(X509Svid, Bundles, i64), SvidError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let request = authorized(
        cfg,
        SignX509svidRequest {
            pod_namespace: namespace.to_owned(),
            pod_name: name.to_owned(),
            pod_uid: uid.to_string(),
            csr: csr.der().to_vec(),
        },
    )?;
    let answer = signer.sign_x509svid(request).await?.into_inner();
    let id: SpiffeId = answer
        .spiffe_id
        .parse()
        .map_err(|e| SvidError::Answer(format!("SPIFFE ID: {e}")))?;
    if answer.chain.is_empty() || answer.bundle.is_empty() {
        return Err(SvidError::Answer("empty chain or bundle".into()));
    }
    let svid = X509Svid {
        spiffe_id: id.to_string(),
        chain_der: answer.chain.concat(),
        key_der: key.serialize_der(),
        hint: answer.hint,
    };
    let bundles = Bundles {
        trust_domain_id: id.trust_domain().id().to_string(),
        own_der: answer.bundle.concat(),
        own_jwt: jwk_set(&answer.jwt_bundle)?,
        ..Bundles::default()
    };
    Ok((svid, bundles, answer.expires_at))
}

/// Most signing requests in flight at once; a burst of new pods is signed
/// in parallel rather than one after the other.
const MAX_IN_FLIGHT: usize = 32;

/// A pod whose SVID is wanted: its SPIFFE ID, namespace and name.
#[derive(Clone, PartialEq)]
struct Wanted {
    spiffe_id: String,
    namespace: String,
    name: String,
}

type Issued = (PodUid, Wanted, Result<(X509Svid, Bundles, i64), SvidError>);

/// What the scheduler knows of one pod of this node.
struct PodState {
    /// The identity its record names now.
    wanted: Wanted,
    /// Its federated trust domains (its record's federatesWith): which
    /// federated bundles its Workload API answers carry.
    federates: Vec<String>,
    /// The SPIFFE ID of the SVID held, and when to renew it.
    held: Option<(String, Instant)>,
    /// When a request is due, if one is.
    due: Option<Instant>,
    /// The request in flight, for the identity it asks for.
    in_flight: Option<Wanted>,
}

/// Decides when each pod of this node gets its SVID: at once when its
/// identity appears or changes, at half-life for renewal, 2 s after a
/// failure; at most [`MAX_IN_FLIGHT`] requests at a time.
struct Scheduler {
    cfg: SvidConfig,
    signer: SignerClient<Channel>,
    store: IdentityStore,
    pods: HashMap<PodUid, PodState>,
    running: FuturesUnordered<BoxFuture<'static, Issued>>,
}

impl Scheduler {
    /// Starts the requests that are due, up to the limit.
    fn start_due(&mut self) {
        let now = Instant::now();
        let room = MAX_IN_FLIGHT.saturating_sub(self.running.len());
        let ready = self
            .pods
            .iter_mut()
            .filter(|(_, p)| p.in_flight.is_none() && p.due.is_some_and(|d| d <= now));
        for (uid, pod) in ready.take(room) {
            pod.due = None;
            pod.in_flight = Some(pod.wanted.clone());
            let (mut signer, cfg, uid, wanted) = (
                self.signer.clone(),
                self.cfg.clone(),
                uid.clone(),
                pod.wanted.clone(),
            );
            self.running.push(Box::pin(async move {
                let result = issue(&mut signer, &cfg, &wanted.namespace, &wanted.name, &uid).await;
                (uid, wanted, result)
            }));
        }
    }

    /// When something is next due: a request that can start, or a renewal.
    /// Due requests that cannot start now (at the limit, or the pod's
    /// request still running) wait for a request to finish, not the clock.
    fn next_wakeup(&self) -> Instant {
        let can_start = self.running.len() < MAX_IN_FLIGHT;
        let due = self
            .pods
            .values()
            .filter(|p| can_start && p.in_flight.is_none())
            .filter_map(|p| p.due);
        let renewals = self
            .pods
            .values()
            .filter_map(|p| p.held.as_ref().map(|h| h.1));
        due.chain(renewals)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// A pod's record appeared, changed or went away.
    fn on_record(&mut self, local: LocalPod, gone: bool) {
        let uid = local.uid.clone();
        if gone {
            self.pods.remove(&uid);
            self.store.remove(&uid);
            return;
        }
        let wanted = Wanted {
            spiffe_id: local.spiffe_id,
            namespace: local.namespace,
            name: local.name,
        };
        let pod = self.pods.entry(uid.clone()).or_insert_with(|| PodState {
            wanted: wanted.clone(),
            federates: Vec::new(),
            held: None,
            due: None,
            in_flight: None,
        });
        if pod.federates != local.federates_with {
            if let Some(current) = self.store.current(&uid)
                && current.federates_with != local.federates_with
            {
                let updated = PodSvids {
                    federates_with: local.federates_with.clone(),
                    ..PodSvids::clone(&current)
                };
                self.store.set(&uid, updated);
            }
            pod.federates = local.federates_with;
        }
        let current = pod
            .in_flight
            .as_ref()
            .map(|w| &w.spiffe_id)
            .or(pod.held.as_ref().map(|h| &h.0));
        if current != Some(&wanted.spiffe_id) {
            pod.due = Some(Instant::now());
        }
        pod.wanted = wanted;
    }

    /// A request finished.
    fn on_issued(
        &mut self,
        uid: PodUid,
        wanted: Wanted,
        result: Result<(X509Svid, Bundles, i64), SvidError>,
    ) {
        // A pod deleted meanwhile: drop the answer.
        let Some(pod) = self
            .pods
            .get_mut(&uid)
            .filter(|p| p.in_flight.as_ref() == Some(&wanted))
        else {
            return;
        };
        pod.in_flight = None;
        let Wanted {
            spiffe_id,
            namespace,
            name,
        } = wanted;
        match result {
            Ok((svid, bundles, expires_at)) => {
                info!(pod = %format!("{namespace}/{name}"), spiffe_id = %svid.spiffe_id, "X.509-SVID issued");
                // The own CAs come from the published bundle
                // (crate::svid::trust), never from the signer's copy.
                self.store.update_bundles(|b| {
                    b.trust_domain_id = bundles.trust_domain_id;
                    b.own_jwt = bundles.own_jwt;
                });
                let federates_with = pod.federates.clone();
                self.store.set(
                    &uid,
                    PodSvids {
                        namespace,
                        name,
                        svids: vec![svid],
                        federates_with,
                    },
                );
                pod.held = Some((spiffe_id, renew_at(expires_at)));
            }
            Err(e) => {
                warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot get an SVID; retrying in 2s");
                pod.due
                    .get_or_insert(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    /// Moves the renewals that are due to the requests (success sets a new
    /// renewal time).
    fn on_timer(&mut self) {
        let now = Instant::now();
        for pod in self.pods.values_mut() {
            if let Some((_, renew)) = pod.held.as_mut().filter(|h| h.1 <= now) {
                *renew = now + Duration::from_secs(3600);
                pod.due.get_or_insert(now);
            }
        }
    }
}

/// Runs until the watch of this node's PodIdentity records ends; fills
/// `store` for this node's pods.
pub async fn run(client: kube::Client, channel: Channel, cfg: SvidConfig, store: IdentityStore) {
    let mut events = watcher(
        Api::<PodIdentityRecord>::all(client),
        LocalPod::watch_config(&cfg.node_name),
    )
    .default_backoff()
    .boxed();
    let node = cfg.node_name.clone();
    let mut scheduler = Scheduler {
        cfg,
        signer: SignerClient::new(channel),
        store,
        pods: HashMap::new(),
        running: FuturesUnordered::new(),
    };
    loop {
        scheduler.start_due();
        let next = scheduler.next_wakeup();
        tokio::select! {
            event = events.next() => {
                let (record, gone) = match event {
                    None => break,
                    Some(Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r))) => (r, false),
                    Some(Ok(watcher::Event::Delete(r))) => (r, true),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        warn!(error = %e, "PodIdentity watch error; retrying");
                        continue;
                    }
                };
                if let Some(local) = LocalPod::of(&record, &node) {
                    scheduler.on_record(local, gone);
                }
            }
            Some((uid, wanted, result)) = scheduler.running.next(), if !scheduler.running.is_empty() => {
                scheduler.on_issued(uid, wanted, result);
            }
            _ = tokio::time::sleep_until(next) => scheduler.on_timer(),
        }
    }
}

/// Gets JWT-SVIDs from the signer for the Workload API, through a
/// [`JwtCache`].
#[derive(Clone)]
pub struct JwtIssuer {
    signer: SignerClient<Channel>,
    cfg: SvidConfig,
    store: IdentityStore,
    cache: JwtCache,
}

impl std::fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtIssuer")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl JwtIssuer {
    /// An issuer asking the signer on `channel`; new JWT bundles go to `store`.
    pub fn new(channel: Channel, cfg: SvidConfig, store: IdentityStore) -> JwtIssuer {
        JwtIssuer {
            signer: SignerClient::new(channel),
            cfg,
            store,
            cache: JwtCache::default(),
        }
    }

    /// A JWT-SVID for `spiffe_id`, one of pod `uid`'s identities, for `audience`.
    pub async fn jwt_svid(
        &self,
        uid: &PodUid,
        pod: &PodSvids,
        spiffe_id: &str,
        audience: &[String],
    ) -> Result<JwtSvid, SvidError> {
        let key = JwtCache::key(uid, spiffe_id, audience);
        if let Some(svid) = self.cache.get(&key) {
            return Ok(svid);
        }
        let request = authorized(
            &self.cfg,
            SignJwtsvidRequest {
                pod_namespace: pod.namespace.clone(),
                pod_name: pod.name.clone(),
                pod_uid: uid.to_string(),
                audience: audience.to_vec(),
            },
        )?;
        let answer = self
            .signer
            .clone()
            .sign_jwtsvid(request)
            .await?
            .into_inner();
        if answer.spiffe_id != spiffe_id {
            // The pod's identity changed meanwhile; the caller retries.
            return Err(SvidError::Answer(format!(
                "the signer issued {} while {spiffe_id} was asked for; the identity changed",
                answer.spiffe_id
            )));
        }
        let jwt = jwk_set(&answer.jwt_bundle)?;
        self.store.update_bundles(|b| b.own_jwt = jwt);
        let svid = JwtSvid {
            spiffe_id: answer.spiffe_id,
            token: answer.token,
            hint: answer.hint,
        };
        self.cache.put(key, &svid, answer.expires_at);
        Ok(svid)
    }
}
