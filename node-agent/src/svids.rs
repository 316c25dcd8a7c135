//! Keeps the SVIDs of this node's pods: watches the PodIdentity records of
//! the pods scheduled here (see [`crate::records`]),
//! asks the operator's signing service for an X.509-SVID (a fresh key each
//! time, kept on this node) whenever a pod gains or changes identity, renews at
//! half-life, and drops a pod's material when it goes away. A still-valid SVID
//! stays in use until its replacement arrives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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

use crate::attestation::PodUid;
use crate::identities::{Bundles, IdentityStore, PodIdentity, X509Svid};
use crate::records::LocalPod;

/// Why an SVID could not be obtained (retried).
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The token file could not be read.
    #[error(
        "cannot read the service-account token {path}: {source}; is the projected token volume mounted?"
    )]
    Token {
        /// The token path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Making the key or CSR failed.
    #[error("cannot make a key and CSR: {0}")]
    Key(#[from] rcgen::Error),
    /// The signer refused or failed.
    #[error("the signing service answered {}: {}", .0.code(), .0.message())]
    Signer(#[from] tonic::Status),
    /// The signer's answer was unusable.
    #[error("the signing service's answer is unusable: {0}")]
    Answer(String),
}

/// Where and how to ask for SVIDs.
#[derive(Debug, Clone)]
pub struct SvidConfig {
    /// This node's name.
    pub node_name: String,
    /// File holding the agent's node-bound service-account token (re-read per call).
    pub token_file: PathBuf,
}

struct Held {
    spiffe_id: String,
    renew_at: Instant,
    namespace: String,
    name: String,
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

/// The wall clock in Unix seconds, the unit of SVID expiry times.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When to renew an SVID that expires at `expires_at` (Unix seconds): half-way.
fn renew_at(expires_at: i64) -> Instant {
    let remaining = (expires_at - unix_now()).max(0) as u64;
    Instant::now() + Duration::from_secs(remaining / 2)
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

/// Runs until the watch of this node's PodIdentity records ends; fills
/// `store` for this node's pods.
pub async fn run(client: kube::Client, channel: Channel, cfg: SvidConfig, store: IdentityStore) {
    let mut events = watcher(
        Api::<PodIdentityRecord>::all(client),
        LocalPod::watch_config(&cfg.node_name),
    )
    .default_backoff()
    .boxed();
    let signer = SignerClient::new(channel);
    let mut held: HashMap<PodUid, Held> = HashMap::new();
    // Pods whose identity is known but whose SVID must be (re)issued, and when.
    let mut due: HashMap<PodUid, (Wanted, Instant)> = HashMap::new();
    // Requests in flight, and what each was for.
    let mut in_flight: HashMap<PodUid, Wanted> = HashMap::new();
    let mut running: FuturesUnordered<BoxFuture<'static, Issued>> = FuturesUnordered::new();
    // Each pod's federated trust domains (its record's federatesWith):
    // which federated bundles its Workload API answers carry.
    let mut federates: HashMap<PodUid, Vec<String>> = HashMap::new();
    loop {
        // Start what is due, up to the limit.
        let now = Instant::now();
        let ready: Vec<PodUid> = due
            .iter()
            .filter(|(uid, d)| d.1 <= now && !in_flight.contains_key(*uid))
            .map(|(u, _)| u.clone())
            .take(MAX_IN_FLIGHT.saturating_sub(running.len()))
            .collect();
        for uid in ready {
            let Some((wanted, _)) = due.remove(&uid) else {
                continue;
            };
            in_flight.insert(uid.clone(), wanted.clone());
            let (mut signer, cfg) = (signer.clone(), cfg.clone());
            running.push(Box::pin(async move {
                let result = issue(&mut signer, &cfg, &wanted.namespace, &wanted.name, &uid).await;
                (uid, wanted, result)
            }));
        }
        // Due entries that cannot start now (at the limit, or the pod's
        // request still running) wait for a request to finish, not the clock.
        let can_start = running.len() < MAX_IN_FLIGHT;
        let next = due
            .iter()
            .filter(|(uid, _)| can_start && !in_flight.contains_key(*uid))
            .map(|(_, d)| d.1)
            .chain(held.values().map(|h| h.renew_at))
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let (record, gone) = match event {
                    Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => (r, false),
                    Ok(watcher::Event::Delete(r)) => (r, true),
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(error = %e, "PodIdentity watch error; retrying");
                        continue;
                    }
                };
                let Some(local) = LocalPod::of(&record, &cfg.node_name) else { continue };
                let uid = local.uid.clone();
                if gone {
                    held.remove(&uid);
                    due.remove(&uid);
                    in_flight.remove(&uid);
                    federates.remove(&uid);
                    store.remove(&uid);
                    continue;
                }
                if federates.get(&uid) != Some(&local.federates_with) {
                    if let Some(current) = store.current(&uid)
                        && current.federates_with != local.federates_with
                    {
                        store.set(&uid, PodIdentity { federates_with: local.federates_with.clone(), ..PodIdentity::clone(&current) });
                    }
                    federates.insert(uid.clone(), local.federates_with.clone());
                }
                let current = in_flight.get(&uid).map(|w| &w.spiffe_id).or(held.get(&uid).map(|h| &h.spiffe_id));
                if current != Some(&local.spiffe_id) {
                    let wanted = Wanted {
                        spiffe_id: local.spiffe_id,
                        namespace: local.namespace,
                        name: local.name,
                    };
                    due.insert(uid, (wanted, Instant::now()));
                }
            }
            Some((uid, wanted, result)) = running.next(), if !running.is_empty() => {
                // A pod deleted or re-identified meanwhile: drop the answer.
                if in_flight.get(&uid) != Some(&wanted) {
                    continue;
                }
                in_flight.remove(&uid);
                let Wanted { spiffe_id, namespace, name } = wanted;
                match result {
                    Ok((svid, bundles, expires_at)) => {
                        info!(pod = %format!("{namespace}/{name}"), spiffe_id = %svid.spiffe_id, "X.509-SVID issued");
                        // The own CAs come from the published bundle
                        // (crate::trust), never from the signer's copy.
                        store.update_bundles(|b| {
                            b.trust_domain_id = bundles.trust_domain_id;
                            b.own_jwt = bundles.own_jwt;
                        });
                        store.set(&uid, PodIdentity { namespace: namespace.clone(), name: name.clone(), svids: vec![svid], federates_with: federates.get(&uid).cloned().unwrap_or_default() });
                        held.insert(uid, Held { spiffe_id, renew_at: renew_at(expires_at), namespace, name });
                    }
                    Err(e) => {
                        warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot get an SVID; retrying in 2s");
                        due.entry(uid).or_insert((Wanted { spiffe_id, namespace, name }, Instant::now() + Duration::from_secs(2)));
                    }
                }
            }
            _ = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                for (uid, h) in held.iter_mut().filter(|(_, h)| h.renew_at <= now) {
                    // Renewal moves to `due`; success sets a new renewal time.
                    h.renew_at = now + Duration::from_secs(3600);
                    let wanted = Wanted { spiffe_id: h.spiffe_id.clone(), namespace: h.namespace.clone(), name: h.name.clone() };
                    due.entry(uid.clone()).or_insert((wanted, now));
                }
            }
        }
    }
}

/// A JWT-SVID as the Workload API hands it out.
#[derive(Clone)]
pub struct JwtSvid {
    /// The subject.
    pub spiffe_id: String,
    /// The compact JWS.
    pub token: String,
    /// The WorkloadIdentity's hint, or empty.
    pub hint: String,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A JWT is a bearer credential: never print it.
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// Cache key: pod, SPIFFE ID, sorted audiences.
type JwtKey = (PodUid, String, Vec<String>);

/// Most JWT-SVIDs kept in the cache; past it, expired entries go, then all.
const JWT_CACHE_MAX: usize = 4096;

/// JWT-SVIDs already obtained, each kept until half its lifetime has
/// passed, so a workload asking often costs one signature per audience per
/// half-lifetime, whichever the source.
#[derive(Clone, Default)]
pub struct JwtCache {
    map: Arc<Mutex<HashMap<JwtKey, (JwtSvid, Instant)>>>,
}

impl JwtCache {
    /// The key of pod `uid`'s `spiffe_id` for `audience` (in any order).
    pub fn key(uid: &PodUid, spiffe_id: &str, audience: &[String]) -> JwtKey {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        (uid.clone(), spiffe_id.to_owned(), aud)
    }

    /// A cached JWT-SVID still worth handing out.
    pub fn get(&self, key: &JwtKey) -> Option<JwtSvid> {
        let cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, renew_at)| *renew_at > Instant::now())
            .map(|(svid, _)| svid.clone())
    }

    /// Keeps `svid`, which expires at `expires_at` (Unix seconds).
    pub fn put(&self, key: JwtKey, svid: &JwtSvid, expires_at: i64) {
        let now = Instant::now();
        let mut cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= JWT_CACHE_MAX {
            cache.retain(|_, (_, renew_at)| *renew_at > now);
            if cache.len() >= JWT_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (svid.clone(), renew_at(expires_at)));
    }
}

impl std::fmt::Debug for JwtCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are bearer credentials: never print them.
        f.debug_struct("JwtCache").finish_non_exhaustive()
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
        pod: &PodIdentity,
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

/// Where the Workload API gets JWT-SVIDs.
#[derive(Debug, Clone)]
pub enum JwtSource {
    /// The operator's signing service.
    Signer(JwtIssuer),
    /// The local SPIRE agent's Delegated Identity API.
    Spire(crate::delegated::SpireJwt),
}

impl JwtSource {
    /// A JWT-SVID for `spiffe_id`, one of pod `uid`'s identities, for
    /// `audience`; the error is the Workload API's answer.
    pub async fn jwt_svid(
        &self,
        uid: &PodUid,
        pod: &PodIdentity,
        spiffe_id: &str,
        audience: &[String],
    ) -> Result<JwtSvid, tonic::Status> {
        let unavailable = |e: &dyn std::fmt::Display| {
            warn!(pod_uid = %uid, spiffe_id, error = %e, "cannot get a JWT-SVID");
            tonic::Status::unavailable(format!("cannot get a JWT-SVID now: {e}"))
        };
        match self {
            JwtSource::Signer(issuer) => issuer
                .jwt_svid(uid, pod, spiffe_id, audience)
                .await
                .map_err(|e| match e {
                    SvidError::Signer(s) if s.code() == tonic::Code::InvalidArgument => s,
                    e => unavailable(&e),
                }),
            JwtSource::Spire(spire) => spire
                .jwt_svid(uid, spiffe_id, audience)
                .await
                .map_err(|e| unavailable(&e)),
        }
    }
}
