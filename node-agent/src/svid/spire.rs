//! SPIRE mode: this node's pods get their SVIDs from the local SPIRE agent's
//! Delegated Identity API instead of the operator's signing service. The
//! operator registers one entry per identity running on this node (see the
//! operator's `spire_entries`), parented to this node's SPIRE agent and
//! selected by `tessera:spiffe_id:<SPIFFE ID>`; this agent, an authorized
//! delegate of the SPIRE agent, subscribes with exactly that selector, one
//! subscription per identity with a pod here, and never with a selector
//! that would match more. Subscriptions end when the identity's last pod on
//! this node goes. The own trust domain's CAs come from the same SPIRE
//! agent (its X.509 bundles stream), not from the operator's bundle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tessera_api::crd::PodIdentity as PodIdentityRecord;
use tessera_api::spire_api::api::agent::delegatedidentity::v1 as delegated;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::svid::records::LocalPod;
use crate::svid::records::PodUid;
use crate::svid::store::{IdentityStore, PodSvids, X509Svid};
use crate::svid::{JwtCache, JwtSvid};
use tessera_api::jwt::JwkSet;

/// Wait before subscribing again after a stream fails or ends.
const RETRY: Duration = Duration::from_secs(2);

/// Where the SPIRE agent is.
#[derive(Debug, Clone)]
pub struct DelegatedConfig {
    /// This node's name.
    pub node_name: String,
    /// The SPIRE agent's admin socket (Delegated Identity API).
    pub admin_socket: PathBuf,
}

/// Why a subscription failed (logged, then retried).
#[derive(Debug, thiserror::Error)]
pub enum DelegatedError {
    /// Nothing listens on the admin socket.
    #[error(
        "cannot reach the SPIRE agent's admin socket {socket}: {reason}; is spire-agent running with admin_socket_path set?"
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The transport error.
        reason: String,
    },
    /// The SPIRE agent refused or failed the call.
    #[error(
        "SPIRE agent: {0}; is this agent's SPIFFE ID in the SPIRE agent's authorized_delegates, and is the identity registered for this node?"
    )]
    Call(#[from] tonic::Status),
    /// An answer could not be used.
    #[error("SPIRE agent answer: {0}")]
    Answer(String),
    /// An answer holds no SVID for the identity asked for.
    #[error("no SVID for {0} in the SPIRE agent's answer (is it registered for this node?)")]
    NotInAnswer(String),
    /// An answer's SVID lacks its certificate or key.
    #[error("the SPIRE agent's SVID for {0} has no certificate or no key")]
    Incomplete(String),
}

fn svid_of(
    answer: delegated::SubscribeToX509sviDsResponse,
    id: &str,
) -> Result<X509Svid, DelegatedError> {
    let found = answer
        .x509_svids
        .into_iter()
        .find(|s| {
            s.x509_svid
                .as_ref()
                .and_then(|v| v.id.as_ref())
                .is_some_and(|i| i.uri() == id)
        })
        .ok_or_else(|| DelegatedError::NotInAnswer(id.to_owned()))?;
    let svid = found.x509_svid.unwrap_or_default();
    if svid.cert_chain.is_empty() || found.x509_svid_key.is_empty() {
        return Err(DelegatedError::Incomplete(id.to_owned()));
    }
    Ok(X509Svid {
        spiffe_id: id.to_owned(),
        chain_der: svid.cert_chain.concat(),
        key_der: found.x509_svid_key,
        hint: svid.hint,
    })
}

type Client =
    delegated::delegated_identity_client::DelegatedIdentityClient<tonic::transport::Channel>;

/// A Delegated Identity API client on the SPIRE agent's admin socket.
async fn connect(cfg: &DelegatedConfig) -> Result<Client, DelegatedError> {
    let channel = tessera_api::spire_api::unix_channel(&cfg.admin_socket)
        .await
        .map_err(|e| DelegatedError::Connect {
            socket: cfg.admin_socket.clone(),
            reason: e.to_string(),
        })?;
    Ok(Client::new(channel))
}

/// Follows one identity's SVIDs until the task is dropped, sending each.
async fn subscribe(cfg: DelegatedConfig, id: String, tx: mpsc::Sender<(String, X509Svid)>) {
    loop {
        match subscribe_once(&cfg, &id, &tx).await {
            Ok(()) => {
                warn!(spiffe_id = %id, "the SPIRE agent ended the SVID stream; subscribing again")
            }
            Err(e) => {
                warn!(spiffe_id = %id, error = %e, "SVID subscription failed; retrying in 2s")
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn subscribe_once(
    cfg: &DelegatedConfig,
    id: &str,
    tx: &mpsc::Sender<(String, X509Svid)>,
) -> Result<(), DelegatedError> {
    let mut stream = connect(cfg)
        .await?
        .subscribe_to_x509svi_ds(delegated::SubscribeToX509sviDsRequest {
            selectors: vec![tessera_api::spire_api::tessera_selector(id)],
            pid: 0,
        })
        .await?
        .into_inner();
    while let Some(answer) = stream.message().await? {
        match svid_of(answer, id) {
            Ok(svid) => {
                if tx.send((id.to_owned(), svid)).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => warn!(spiffe_id = %id, "{e}"),
        }
    }
    Ok(())
}

/// Reads a stream of the SPIRE agent's for as long as the task runs,
/// subscribing again (after [`RETRY`]) whenever it fails or ends; `open`
/// subscribes, `each` takes every answer.
async fn follow_stream<T, F, Fut>(
    cfg: &DelegatedConfig,
    what: &str,
    open: F,
    mut each: impl FnMut(T),
) where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Streaming<T>, tonic::Status>>,
{
    loop {
        let result: Result<(), DelegatedError> = async {
            let mut stream = open(connect(cfg).await?).await?;
            while let Some(answer) = stream.message().await? {
                each(answer);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "{what} subscription failed; retrying in 2s");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Follows the SPIRE agent's X.509 bundles: the own trust domain's CAs
/// (`own_td_id`, `spiffe://<td>`) go into the store. Runs until dropped.
pub async fn follow_bundles(cfg: DelegatedConfig, own_td_id: String, store: IdentityStore) {
    let open = |mut c: Client| async move {
        c.subscribe_to_x509_bundles(delegated::SubscribeToX509BundlesRequest {})
            .await
            .map(tonic::Response::into_inner)
    };
    follow_stream(&cfg, "bundle", open, |answer: delegated::SubscribeToX509BundlesResponse| {
        let Some(der) = answer.ca_certificates.get(&own_td_id) else {
            warn!(trust_domain = %own_td_id, "the SPIRE agent sent no bundle for this trust domain; is it SPIRE's trust domain?");
            return;
        };
        let usable = crate::svid::store::split_der(der)
            .map_err(|e| e.to_string())
            .and_then(|certs| {
                crate::svid::trust::anchors_der(certs.iter().map(|c| c.as_ref()))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        match usable {
            Ok(()) => {
                if store.bundles().own_der != *der {
                    info!(trust_domain = %own_td_id, "own trust bundle updated from the SPIRE agent");
                }
                let der = der.clone();
                let td = own_td_id.clone();
                store.update_bundles(|b| {
                    b.own_der = der;
                    b.trust_domain_id = td;
                });
            }
            Err(e) => warn!(error = %e, "ignoring the SPIRE agent's bundle; the previous one stays in use"),
        }
    })
    .await
}

/// Follows the SPIRE agent's JWT bundles: the own trust domain's JWT
/// authorities (`own_td_id`) go into the store (federated trust domains
/// come from FederatedTrustDomain objects, as in the built-in CA mode).
/// Runs until dropped.
pub async fn follow_jwt_bundles(cfg: DelegatedConfig, own_td_id: String, store: IdentityStore) {
    let open = |mut c: Client| async move {
        c.subscribe_to_jwt_bundles(delegated::SubscribeToJwtBundlesRequest {})
            .await
            .map(tonic::Response::into_inner)
    };
    follow_stream(&cfg, "JWT bundle", open, |answer: delegated::SubscribeToJwtBundlesResponse| {
        let Some(doc) = answer.bundles.get(&own_td_id) else {
            warn!(trust_domain = %own_td_id, "the SPIRE agent sent no JWT bundle for this trust domain; is it SPIRE's trust domain?");
            return;
        };
        match JwkSet::from_json(doc) {
            Ok(jwt) => {
                if store.bundles().own_jwt != jwt {
                    info!(trust_domain = %own_td_id, keys = jwt.keys.len(), "own JWT authorities updated from the SPIRE agent");
                }
                store.update_bundles(|b| b.own_jwt = jwt);
            }
            Err(e) => warn!(error = %e, "ignoring the SPIRE agent's JWT bundle; the previous one stays in use"),
        }
    })
    .await
}

/// Gets JWT-SVIDs from the SPIRE agent's Delegated Identity API for the
/// Workload API: one FetchJWTSVIDs call per (identity, audiences), with the
/// identity's own selector only, through a [`JwtCache`].
#[derive(Debug, Clone)]
pub struct SpireJwt {
    cfg: DelegatedConfig,
    cache: JwtCache,
}

impl SpireJwt {
    /// JWT-SVIDs from the SPIRE agent `cfg` names.
    pub fn new(cfg: DelegatedConfig) -> SpireJwt {
        SpireJwt {
            cfg,
            cache: JwtCache::default(),
        }
    }

    /// A JWT-SVID for `spiffe_id` (an identity of pod `uid`) for `audience`.
    pub async fn jwt_svid(
        &self,
        uid: &PodUid,
        spiffe_id: &str,
        audience: &[String],
    ) -> Result<JwtSvid, DelegatedError> {
        let key = JwtCache::key(uid, spiffe_id, audience);
        if let Some(svid) = self.cache.get(&key) {
            return Ok(svid);
        }
        let answer = connect(&self.cfg)
            .await?
            .fetch_jwtsvi_ds(delegated::FetchJwtsviDsRequest {
                audience: audience.to_vec(),
                selectors: vec![tessera_api::spire_api::tessera_selector(spiffe_id)],
                pid: 0,
            })
            .await?
            .into_inner();
        let found = answer
            .svids
            .into_iter()
            .find(|s| s.id.as_ref().is_some_and(|i| i.uri() == spiffe_id))
            .filter(|s| !s.token.is_empty())
            .ok_or_else(|| {
                DelegatedError::Answer(format!(
                    "no JWT-SVID for {spiffe_id} in the answer (is it registered for this node?)"
                ))
            })?;
        let svid = JwtSvid {
            spiffe_id: spiffe_id.to_owned(),
            token: found.token,
            hint: found.hint,
        };
        self.cache.put(key, &svid, found.expires_at);
        info!(spiffe_id = %spiffe_id, audience = ?audience, "JWT-SVID received from the SPIRE agent");
        Ok(svid)
    }
}

/// Runs until the watch of this node's PodIdentity records ends: one SVID
/// subscription per identity with a pod on this node, and each pod's
/// identity in `store`.
pub async fn run(client: kube::Client, cfg: DelegatedConfig, store: IdentityStore) {
    let records: Api<PodIdentityRecord> = Api::all(client);
    let watch_cfg = LocalPod::watch_config(&cfg.node_name);
    let mut events = std::pin::pin!(watcher(records, watch_cfg).default_backoff());
    let (tx, mut rx) = mpsc::channel::<(String, X509Svid)>(64);
    let mut local: HashMap<PodUid, LocalPod> = HashMap::new();
    let mut subscriptions: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut latest: HashMap<String, X509Svid> = HashMap::new();
    let publish =
        |store: &IdentityStore, uid: &PodUid, pod: &LocalPod, svid: Option<&X509Svid>| match svid {
            Some(svid) => store.set(
                uid,
                PodSvids {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    svids: vec![svid.clone()],
                    federates_with: pod.federates_with.clone(),
                },
            ),
            None => store.remove(uid),
        };
    loop {
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
                let Some(pod) = LocalPod::of(&record, &cfg.node_name) else { continue };
                let uid = pod.uid.clone();
                let wanted = (!gone).then_some(pod);
                match wanted {
                    Some(pod) => {
                        if local.get(&uid) != Some(&pod) {
                            let id = pod.spiffe_id.clone();
                            if !subscriptions.contains_key(&id) {
                                info!(spiffe_id = %id, "subscribing to the SPIRE agent for this identity");
                                subscriptions.insert(id.clone(), tokio::spawn(subscribe(cfg.clone(), id.clone(), tx.clone())));
                            }
                            publish(&store, &uid, &pod, latest.get(&id));
                            local.insert(uid, pod);
                        }
                    }
                    None => {
                        if local.remove(&uid).is_some() {
                            store.remove(&uid);
                        }
                    }
                }
                // Identities with no pod left here: end their subscriptions.
                subscriptions.retain(|id, task| {
                    let used = local.values().any(|p| &p.spiffe_id == id);
                    if !used {
                        info!(spiffe_id = %id, "no pod of this identity left on this node; subscription ended");
                        task.abort();
                        latest.remove(id);
                    }
                    used
                });
            }
            Some((id, svid)) = rx.recv() => {
                if !subscriptions.contains_key(&id) {
                    continue;
                }
                info!(spiffe_id = %id, "X.509-SVID received from the SPIRE agent");
                for (uid, pod) in local.iter().filter(|(_, p)| p.spiffe_id == id) {
                    publish(&store, uid, pod, Some(&svid));
                }
                latest.insert(id, svid);
            }
        }
    }
    for task in subscriptions.into_values() {
        task.abort();
    }
}
