//! The signing service: node agents get X.509- and JWT-SVIDs for the pods on
//! their own node, and nothing else.
//!
//! Each call carries a service-account token bound to the agent's Node. The
//! operator checks it with a TokenReview (audience [`TOKEN_AUDIENCE`]), requires
//! the agent's service account, and takes the node from the token. The pod is
//! read from the API server: its UID must match the request, it must run on
//! that node and still be running. Its SPIFFE ID is the one its
//! [`PodIdentity`] record (written by the identity controller alone) names,
//! and the signer derives it again from the pod and the WorkloadIdentity
//! objects with the controller's own function ([`assign::assign_pod`]),
//! refusing on any mismatch; nothing written on the pod itself (annotations)
//! plays a part. The CSR contributes only its public key, so the agent's key
//! never leaves the node and the CA key never leaves the operator. What any
//! caller can make it spend is bounded (see [`limits`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use tessera_api::crd::{PodIdentity, PodIdentitySpec, WorkloadIdentity};
use tessera_api::jwt::Claims as JwtClaims;
use tessera_api::signer_api::signer_server::{Signer, SignerServer};
use tessera_api::signer_api::{
    SignJwtsvidRequest, SignJwtsvidResponse, SignX509svidRequest, SignX509svidResponse,
    TOKEN_AUDIENCE,
};
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::RwLock;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ca::{CaError, TrustDomainCa};
use crate::identity::assign;

pub mod limits;
use limits::Limits;

/// The extra field in a TokenReview's user info that names the bound node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How the signer decides and signs.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// The trust domain it signs for.
    pub trust_domain: TrustDomain,
    /// The one user allowed to call: `system:serviceaccount:<ns>:<agent-sa>`.
    pub agent_username: String,
    /// Lifetime of an X.509-SVID (capped by the signing root's own NotAfter).
    pub svid_ttl: Duration,
    /// Lifetime of a JWT-SVID (capped likewise). Short: a JWT is a bearer
    /// token and cannot be revoked.
    pub jwt_svid_ttl: Duration,
}

/// Why the signer could not start.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// Issuing the server's own certificate failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Binding or serving failed.
    #[error("signing service on {addr}: {source}; is the address free?")]
    Serve {
        /// The listen address.
        addr: SocketAddr,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The gRPC service.
#[derive(Clone)]
pub struct SignerService {
    client: kube::Client,
    cfg: Arc<SignerConfig>,
    ca: Arc<RwLock<TrustDomainCa>>,
    reviews: Arc<std::sync::Mutex<ReviewCache>>,
    limits: Arc<Limits>,
    /// What the signer derives identities from again: namespaces (their
    /// labels) and WorkloadIdentities, followed by watches.
    namespaces: Store<Namespace>,
    wids: Store<WorkloadIdentity>,
}

/// How long a signing request waits for the first listing of namespaces
/// and WorkloadIdentities after the signer started.
const VIEW_READY_WAIT: Duration = Duration::from_secs(10);

/// A store of every `K`, filled by a watch that runs as long as the runtime.
fn followed<K>(client: &kube::Client) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "signer watch error; retrying");
        }
    });
    tokio::spawn(stream);
    store
}

/// Accepted tokens (by SHA-256) and the node each is bound to, so a burst
/// of signing requests costs one TokenReview per token, not one per request.
type ReviewCache = std::collections::HashMap<[u8; 32], (String, std::time::Instant)>;

/// How long an accepted token is trusted without a new TokenReview: as long
/// as the API server's own token authentication cache keeps a result.
pub const TOKEN_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
const TOKEN_REVIEW_CACHE_MAX: usize = 4096;

fn token_digest(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl std::fmt::Debug for SignerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerService")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "{what}");
    Status::internal(format!("{what}: {e}"))
}

impl SignerService {
    /// A service signing with `ca` (shared with whoever rotates it). Starts
    /// watches of namespaces and WorkloadIdentities on the current runtime.
    pub fn new(
        client: kube::Client,
        cfg: SignerConfig,
        ca: Arc<RwLock<TrustDomainCa>>,
    ) -> SignerService {
        SignerService {
            namespaces: followed(&client),
            wids: followed(&client),
            client,
            cfg: Arc::new(cfg),
            ca,
            reviews: Arc::default(),
            limits: Arc::default(),
        }
    }

    /// The node the caller's token is bound to, after a TokenReview.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("no bearer token; send the agent's service-account token")
            })?;
        let digest = token_digest(token);
        let now = std::time::Instant::now();
        {
            let cache = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((node, until)) = cache.get(&digest)
                && *until > now
            {
                return Ok(node.clone());
            }
        }
        self.limits.check_rejected(&digest)?;
        self.limits
            .review_budget(request.remote_addr().map(|a| a.ip()))?;
        let node = match self.review(token).await {
            Ok(node) => node,
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) {
                    self.limits.remember_rejected(digest);
                }
                return Err(status);
            }
        };
        let mut cache = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, (node.clone(), now + TOKEN_REVIEW_CACHE_TTL));
        Ok(node)
    }

    /// Asks the API server about `token`: the node it is bound to, if it is
    /// the agent's and valid.
    async fn review(&self, token: &str) -> Result<String, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| internal("TokenReview failed", e))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "invalid token".to_owned());
            return Err(Status::unauthenticated(format!("token rejected: {why}")));
        }
        // An API server that ignored the audience asked for would accept a
        // token minted for anything else.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE))
        {
            return Err(Status::unauthenticated(format!(
                "token rejected: the TokenReview did not confirm the audience {TOKEN_AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.cfg.agent_username {
            return Err(Status::permission_denied(format!(
                "{username} is not the node agent ({})",
                self.cfg.agent_username
            )));
        }
        user.extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .and_then(|v| v.into_iter().next())
            .ok_or_else(|| {
                Status::permission_denied(
                    "the token is not bound to a Node; request it with boundObjectRef kind Node",
                )
            })
    }
}

impl SignerService {
    /// The SVID lifetimes and hint from the WorkloadIdentity that chose the
    /// pod's ID (its `ttl`, `jwtTTL` and `hint`), else the defaults. A
    /// lifetime that cannot be parsed falls back to the default, logged.
    fn policy_for(&self, record: &PodIdentitySpec) -> Policy {
        let defaults = Policy {
            ttl: self.cfg.svid_ttl,
            jwt_ttl: self.cfg.jwt_svid_ttl,
            hint: String::new(),
        };
        let Some(source) = record.source.as_deref() else {
            return defaults;
        };
        let Some(wid) = self.wids.get(&ObjectRef::new(source)) else {
            return defaults;
        };
        let lifetime = |field: &str, value: Option<&str>, default: Duration| match value
            .map(tessera_api::duration::parse)
        {
            Some(Ok(ttl)) => ttl,
            Some(Err(e)) => {
                warn!(workload_identity = %source, field, error = %e, "ignoring it");
                default
            }
            None => default,
        };
        Policy {
            ttl: lifetime("ttl", wid.spec.ttl.as_deref(), defaults.ttl),
            jwt_ttl: lifetime("jwtTTL", wid.spec.jwt_ttl.as_deref(), defaults.jwt_ttl),
            hint: wid.spec.hint.clone().unwrap_or_default(),
        }
    }
}

/// What the choosing WorkloadIdentity sets for a pod's SVIDs.
struct Policy {
    ttl: Duration,
    jwt_ttl: Duration,
    hint: String,
}

/// Signs an X.509-SVID for `id` over the public key of the DER PKCS#10
/// `csr` with the active root; returns the DER leaf and its NotAfter. What
/// every signing request costs once authorized (and what `cargo xtask bench
/// identity` measures).
pub fn sign_x509_svid(
    ca: &TrustDomainCa,
    id: &SpiffeId,
    csr: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, OffsetDateTime), Status> {
    let csr = CertificateSigningRequestParams::from_der(&csr.to_vec().into())
        .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
    sign_leaf(ca, id, &csr, ttl, now)
}

/// Signs a leaf X.509-SVID for `id` over `public_key` with the active root.
fn sign_leaf(
    ca: &TrustDomainCa,
    id: &SpiffeId,
    csr: &CertificateSigningRequestParams,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, OffsetDateTime), Status> {
    let root = ca.active(now).map_err(|e| internal("no usable root", e))?;
    let issuer = root.issuer();
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| internal("params", e))?;
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e| internal("SPIFFE ID as URI", e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tessera");
    // What the X509-SVID specification asks of a leaf.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - time::Duration::seconds(30);
    let wanted = now + ttl;
    params.not_after = wanted.min(root.not_after);
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| Status::internal("no randomness for a serial number"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params
        .signed_by(&csr.public_key, issuer)
        .map_err(|e| internal("signing failed", e))?;
    Ok((cert.der().to_vec(), params.not_after))
}

impl SignerService {
    /// The pod the request names, if it exists with that UID, runs on
    /// `node` and is running (not terminating, not finished).
    async fn requested_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Pod, Status> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| internal("reading the pod failed", e))?
            .ok_or_else(|| Status::not_found(format!("pod {namespace}/{name} does not exist")))?;
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(Status::failed_precondition(
                "the pod was recreated: its UID differs from the request's",
            ));
        }
        let pod_node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        if pod_node != node {
            return Err(Status::permission_denied(format!(
                "pod {namespace}/{name} is not on node {node}; an agent gets SVIDs only for its own node's pods"
            )));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(Status::failed_precondition("the pod is terminating"));
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if let Some(phase @ ("Succeeded" | "Failed")) = phase {
            return Err(Status::failed_precondition(format!(
                "the pod has finished (phase {phase}); finished pods get no SVIDs"
            )));
        }
        Ok(pod)
    }

    /// The pod's identity: the one its PodIdentity record names, provided
    /// the record is the operator's for this very pod on this node and the
    /// SPIFFE ID derived again from the pod and the WorkloadIdentity objects
    /// is the same.
    async fn identity_of(
        &self,
        pod: &Pod,
        node: &str,
    ) -> Result<(PodIdentitySpec, SpiffeId), Status> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let record = Api::<PodIdentity>::all(self.client.clone())
            .get_opt(uid)
            .await
            .map_err(|e| internal("reading the pod's PodIdentity failed", e))?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "pod {name} has no identity (no PodIdentity {uid}): the operator has not assigned one yet, or cannot (see the pod's events)"
                ))
            })?;
        let spec = record
            .for_pod(uid)
            .filter(|r| format!("{}/{}", r.namespace, r.pod_name) == name && r.node_name == node)
            .cloned()
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "PodIdentity {uid} does not describe pod {name} on node {node}; the operator rewrites it"
                ))
            })?;
        let id: SpiffeId = spec
            .spiffe_id
            .parse()
            .map_err(|e| internal("the PodIdentity's SPIFFE ID is invalid", e))?;
        if !id.is_member_of(&self.cfg.trust_domain) {
            return Err(Status::failed_precondition(format!(
                "{id} is outside trust domain {}",
                self.cfg.trust_domain
            )));
        }
        self.check_derivation(pod, &name, &spec, &id).await?;
        Ok((spec, id))
    }

    /// Refuses unless [`assign::assign_pod`] gives `pod` the SPIFFE ID and
    /// source its record names.
    async fn check_derivation(
        &self,
        pod: &Pod,
        name: &str,
        record: &PodIdentitySpec,
        id: &SpiffeId,
    ) -> Result<(), Status> {
        for ready in [
            self.namespaces.wait_until_ready().boxed(),
            self.wids.wait_until_ready().boxed(),
        ] {
            if tokio::time::timeout(VIEW_READY_WAIT, ready).await.is_err() {
                return Err(Status::unavailable(
                    "the signer has not listed namespaces and WorkloadIdentities yet; check that the operator may list and watch them",
                ));
            }
        }
        let wids = self.wids.state();
        let derived = assign::assign_pod(
            &self.cfg.trust_domain,
            pod,
            &self.namespaces,
            wids.iter().map(AsRef::as_ref),
        );
        match derived.result {
            Ok(derived_id) if derived_id == *id && derived.source == record.source => Ok(()),
            Ok(derived_id) => {
                warn!(pod = %name, record = %id, derived = %derived_id, "identity mismatch: refusing to sign");
                Err(Status::permission_denied(format!(
                    "identity mismatch for pod {name}: its PodIdentity says {id} ({}), the WorkloadIdentity objects give {derived_id} ({}); the operator updates the record, retry",
                    record.source.as_deref().unwrap_or("default"),
                    derived.source.as_deref().unwrap_or("default")
                )))
            }
            Err(e) => {
                warn!(pod = %name, record = %id, error = %e, "the pod's identity cannot be derived: refusing to sign");
                Err(Status::permission_denied(format!(
                    "pod {name} has no identity by the WorkloadIdentity objects: {e}"
                )))
            }
        }
    }

    /// The pod the request names and its identity, after every check.
    async fn authorized_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(PodIdentitySpec, SpiffeId), Status> {
        let pod = self.requested_pod(node, namespace, name, uid).await?;
        self.identity_of(&pod, node).await
    }
}

/// Longest audience list, and longest audience, a JWT-SVID request may carry.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_LEN: usize = 1024;

#[tonic::async_trait]
impl Signer for SignerService {
    async fn sign_x509svid(
        &self,
        request: Request<SignX509svidRequest>,
    ) -> Result<Response<SignX509svidResponse>, Status> {
        let _slot = self.limits.slot().await?;
        let node = self.authenticate(&request).await?;
        let req = request.into_inner();
        let (record, id) = self
            .authorized_pod(&node, &req.pod_namespace, &req.pod_name, &req.pod_uid)
            .await?;
        let Policy { ttl, hint, .. } = self.policy_for(&record);
        let now = OffsetDateTime::now_utc();
        let ca = self.ca.read().await;
        let (leaf, not_after) = sign_x509_svid(&ca, &id, &req.csr, ttl, now)?;
        let bundle = ca
            .roots()
            .iter()
            .filter(|r| now < r.not_after)
            .map(|r| r.cert_der.clone())
            .collect();
        info!(spiffe_id = %id, %node, pod = %format!("{}/{}", req.pod_namespace, req.pod_name), "signed X.509-SVID");
        Ok(Response::new(SignX509svidResponse {
            spiffe_id: id.to_string(),
            chain: vec![leaf],
            bundle,
            expires_at: not_after.unix_timestamp(),
            hint,
            jwt_bundle: ca.jwt_bundle(now).to_json(),
        }))
    }

    async fn sign_jwtsvid(
        &self,
        request: Request<SignJwtsvidRequest>,
    ) -> Result<Response<SignJwtsvidResponse>, Status> {
        let _slot = self.limits.slot().await?;
        let node = self.authenticate(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "a JWT-SVID needs at least one non-empty audience",
            ));
        }
        if req.audience.len() > MAX_AUDIENCES
            || req.audience.iter().any(|a| a.len() > MAX_AUDIENCE_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_LEN} bytes each"
            )));
        }
        let (record, id) = self
            .authorized_pod(&node, &req.pod_namespace, &req.pod_name, &req.pod_uid)
            .await?;
        self.limits.audiences(&record.pod_uid, &req.audience)?;
        let Policy { jwt_ttl, hint, .. } = self.policy_for(&record);
        let now = OffsetDateTime::now_utc();
        let ca = self.ca.read().await;
        let (root, key) = ca
            .active_jwt(now)
            .map_err(|e| internal("no usable JWT signing key", e))?;
        let exp = (now + jwt_ttl).min(root.not_after);
        let token = key
            .sign(&JwtClaims {
                sub: id.clone(),
                aud: req.audience,
                exp: exp.unix_timestamp(),
                iat: now.unix_timestamp(),
            })
            .map_err(|e| internal("signing the JWT-SVID failed", e))?;
        info!(spiffe_id = %id, %node, pod = %format!("{}/{}", req.pod_namespace, req.pod_name), "signed JWT-SVID");
        Ok(Response::new(SignJwtsvidResponse {
            spiffe_id: id.to_string(),
            token,
            expires_at: exp.unix_timestamp(),
            hint,
            jwt_bundle: ca.jwt_bundle(now).to_json(),
        }))
    }
}

/// The signer's own serving certificate: issued by the active root for the
/// given DNS names (and 127.0.0.1), with the SPIFFE ID `spiffe://<td>/tessera/signer`.
pub fn server_identity(
    ca: &TrustDomainCa,
    td: &TrustDomain,
    dns_names: &[String],
) -> Result<Identity, CaError> {
    let id = td
        .member("/tessera/signer")
        .map_err(|e| CaError::Certificate(e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let (cert, key) = ca.issue_server_cert(
        ca.active(now)?,
        &id,
        dns_names,
        &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
        Duration::from_secs(24 * 3600),
        now,
    )?;
    Ok(Identity::from_pem(cert, key))
}

/// Serves the signer over TLS on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    service: SignerService,
    identity: Identity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), SignerError>>), SignerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SignerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| SignerError::Bind { addr, source })?;
    let router = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(|source| SignerError::Serve { addr, source })?
        .add_service(SignerServer::new(service));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
            .map_err(|source| SignerError::Serve {
                addr: bound,
                source,
            })
    });
    Ok((bound, task))
}
