//! The SPIFFE Workload API server on a Unix socket.
//!
//! Every request must carry the `workload.spiffe.io: true` header
//! (InvalidArgument otherwise). The caller is identified by the kernel: each
//! connection is pinned to the process that opened it (a pidfd, see
//! [`attestation::Peer`]), each call reads that process's pod cgroup while
//! it lives, then the pod's identity in the [`IdentityStore`]; a caller in
//! no known pod, or whose process has exited, gets PermissionDenied.
//! A caller in a pod whose identity is not issued yet (a container that asks
//! as it starts, before this agent has its pod's SVID) is answered once the
//! identity is there, waiting up to [`ISSUANCE_WAIT`] and never past the
//! caller's own deadline (`grpc-timeout`, less a margin so that it hears
//! PermissionDenied rather than times out).
//! Streams send the full state first and again on every change, and end with
//! PermissionDenied when the pod loses its identity.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_api::jwt;
use tessera_api::workload_api::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tessera_api::workload_api::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    SECURITY_HEADER, ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest,
    X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse, claims_struct,
};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::clock::unix_now;
use crate::svid::JwtSource;
use crate::svid::PodUid;
use crate::svid::store::{Bundles, IdentityStore, PodSvids};
use crate::workload_api::{ServeError, attestation};

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    store: IdentityStore,
    jwt: Option<JwtSource>,
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The longest a caller in a pod waits for its identity to be issued.
pub const ISSUANCE_WAIT: Duration = Duration::from_secs(10);
/// Kept from the caller's deadline, so the answer reaches it in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

fn no_identity() -> Status {
    Status::permission_denied("this workload has no identity (yet); retry later")
}

/// How long a call may wait for the caller's identity: [`ISSUANCE_WAIT`],
/// or less when the caller's deadline is nearer.
fn issuance_wait<T>(request: &Request<T>) -> Duration {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout)
        .map_or(ISSUANCE_WAIT, |d| {
            d.saturating_sub(DEADLINE_MARGIN).min(ISSUANCE_WAIT)
        })
}

/// A `grpc-timeout` value (digits, then a unit of H M S m u n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..unit_at)?, value.get(unit_at..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header workload.spiffe.io: true is missing",
        )),
    }
}

/// An accepted connection with the process that opened it.
struct PinnedConnection {
    stream: UnixStream,
    peer: PeerInfo,
}

/// The connection's pinned peer, as each request sees it.
#[derive(Debug, Clone)]
struct PeerInfo(Arc<attestation::Peer>);

impl Connected for PinnedConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl tokio::io::AsyncRead for PinnedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PinnedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn caller<T>(request: &Request<T>) -> Result<PodUid, Status> {
    let peer = request.extensions().get::<PeerInfo>().ok_or_else(|| {
        Status::permission_denied(attestation::AttestationError::NoPeerPid.to_string())
    })?;
    peer.0.pod().map_err(|e| {
        debug!(error = %e, "caller attestation failed");
        match e {
            attestation::AttestationError::Exited | attestation::AttestationError::Moved { .. } => {
                Status::permission_denied(e.to_string())
            }
            _ => Status::permission_denied("caller is not a workload known to this node agent"),
        }
    })
}

fn x509_response(identity: &PodSvids, bundles: &Bundles) -> X509svidResponse {
    X509svidResponse {
        svids: identity
            .svids
            .iter()
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: s.chain_der.clone(),
                x509_svid_key: s.key_der.clone(),
                bundle: bundles.own_der.clone(),
                hint: s.hint.clone(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: identity
            .federates_with
            .iter()
            .filter_map(|td| {
                bundles
                    .federated_der
                    .get(td)
                    .map(|b| (td.clone(), b.clone()))
            })
            .collect(),
    }
}

fn bundles_response(identity: &PodSvids, bundles: &Bundles) -> X509BundlesResponse {
    let mut all = x509_response(identity, bundles).federated_bundles;
    all.insert(bundles.trust_domain_id.clone(), bundles.own_der.clone());
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: all,
    }
}

impl WorkloadApi {
    /// A service answering from `store`, getting JWT-SVIDs through `jwt`
    /// (without one, FetchJWTSVID answers Unavailable).
    pub fn new(store: IdentityStore, jwt: Option<JwtSource>) -> WorkloadApi {
        WorkloadApi { store, jwt }
    }

    /// The pod's identity once it holds SVIDs, waiting up to `wait` for the
    /// agent to issue them; PermissionDenied after that.
    async fn issued(
        &self,
        uid: &PodUid,
        wait: Duration,
    ) -> Result<tokio::sync::watch::Receiver<Option<Arc<PodSvids>>>, Status> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.store.watch_changes();
        loop {
            changes.borrow_and_update();
            if let Some(pod) = self.store.watch_pod(uid)
                && pod.borrow().as_ref().is_some_and(|i| !i.svids.is_empty())
            {
                return Ok(pod);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(no_identity()),
            }
        }
    }

    /// A stream of `render(identity, bundles)`, re-sent on every change of
    /// either, ending with PermissionDenied when the pod loses its identity.
    async fn follow<T, F>(
        &self,
        uid: PodUid,
        wait: Duration,
        render: F,
    ) -> Result<Streamed<T>, Status>
    where
        T: Send + 'static,
        F: Fn(&PodSvids, &Bundles) -> T + Send + 'static,
    {
        let mut pod = self.issued(&uid, wait).await?;
        let mut bundles = self.store.watch_bundles();
        let stream = async_stream::stream! {
            loop {
                let current = pod.borrow_and_update().clone();
                let Some(identity) = current.filter(|i| !i.svids.is_empty()) else {
                    yield Err(no_identity());
                    break;
                };
                let b = bundles.borrow_and_update().clone();
                yield Ok(render(&identity, &b));
                tokio::select! {
                    changed = pod.changed() => if changed.is_err() { yield Err(no_identity()); break; },
                    changed = bundles.changed() => if changed.is_err() { break; },
                }
            }
        };
        Ok(Box::pin(stream))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Streamed<X509svidResponse>;
    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let uid = caller(&request)?;
        info!(pod_uid = %uid, "FetchX509SVID");
        let wait = issuance_wait(&request);
        Ok(Response::new(self.follow(uid, wait, x509_response).await?))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let uid = caller(&request)?;
        let wait = issuance_wait(&request);
        Ok(Response::new(
            self.follow(uid, wait, bundles_response).await?,
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let uid = caller(&request)?;
        let wait = issuance_wait(&request);
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let identity = self
            .issued(&uid, wait)
            .await?
            .borrow()
            .clone()
            .ok_or_else(no_identity)?;
        let ids: Vec<&str> = identity
            .svids
            .iter()
            .map(|s| s.spiffe_id.as_str())
            .filter(|id| req.spiffe_id.is_empty() || *id == req.spiffe_id)
            .collect();
        if ids.is_empty() {
            return Err(Status::permission_denied(format!(
                "this workload has no identity {}",
                req.spiffe_id
            )));
        }
        let issuer = self.jwt.as_ref().ok_or_else(|| {
            Status::unavailable("this agent has no signing service for JWT-SVIDs")
        })?;
        let mut svids = Vec::with_capacity(ids.len());
        for id in ids {
            let svid = issuer.jwt_svid(&uid, &identity, id, &req.audience).await?;
            svids.push(Jwtsvid {
                spiffe_id: svid.spiffe_id,
                svid: svid.token,
                hint: svid.hint,
            });
        }
        info!(pod_uid = %uid, audience = ?req.audience, "FetchJWTSVID");
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let uid = caller(&request)?;
        let wait = issuance_wait(&request);
        Ok(Response::new(
            self.follow(uid, wait, jwt_bundles_response).await?,
        ))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let uid = caller(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundles = self.store.bundles();
        // The caller's federated trust domains count only while its identity
        // lists them, as for the bundles it is handed.
        let federates_with = self
            .store
            .current(&uid)
            .map(|i| i.federates_with.clone())
            .unwrap_or_default();
        let verified = jwt::verify(&req.svid, &req.audience, unix_now(), |td| {
            let id = td.id().to_string();
            if id == bundles.trust_domain_id {
                Some(&bundles.own_jwt)
            } else if federates_with.contains(&id) {
                bundles.federated_jwt.get(&id)
            } else {
                None
            }
        })
        .map_err(|e| {
            debug!(pod_uid = %uid, error = %e, "JWT-SVID refused");
            Status::invalid_argument(e.to_string())
        })?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: verified.spiffe_id.to_string(),
            claims: Some(claims_struct(&verified.claims)),
        }))
    }
}

/// The own trust domain's JWT authorities and those of the federated trust
/// domains the workload's identity federates with.
fn jwt_bundles_response(identity: &PodSvids, bundles: &Bundles) -> JwtBundlesResponse {
    let mut all: std::collections::HashMap<String, Vec<u8>> = identity
        .federates_with
        .iter()
        .filter_map(|td| {
            bundles
                .federated_jwt
                .get(td)
                .map(|b| (td.clone(), b.to_json()))
        })
        .collect();
    all.insert(bundles.trust_domain_id.clone(), bundles.own_jwt.to_json());
    JwtBundlesResponse { bundles: all }
}

/// Listens on `path` (replacing a stale socket) and serves until `shutdown`.
pub async fn serve(
    path: &Path,
    store: IdentityStore,
    jwt: Option<JwtSource>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    attestation::check_kernel()?;
    let listener = UnixListener::bind(path).map_err(err)?;
    // Any local process may connect (workloads run as any user); who it is
    // decides what it gets. Connecting needs write permission only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    let service = SpiffeWorkloadApiServer::new(WorkloadApi::new(store, jwt));
    let incoming = UnixListenerStream::new(listener).map(|accepted| {
        accepted.map(|stream| {
            let peer = PeerInfo(Arc::new(attestation::Peer::of(&stream)));
            PinnedConnection { stream, peer }
        })
    });
    Ok(tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_do_not() {
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("999m"), Some(Duration::from_millis(999)));
        assert_eq!(grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S", "५S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_wait_ends_before_the_callers_deadline() {
        let mut request = Request::new(());
        assert_eq!(issuance_wait(&request), ISSUANCE_WAIT);
        request.metadata_mut().insert(
            "grpc-timeout",
            tonic::metadata::MetadataValue::from_static("1S"),
        );
        assert_eq!(issuance_wait(&request), Duration::from_millis(800));
        request.metadata_mut().insert(
            "grpc-timeout",
            tonic::metadata::MetadataValue::from_static("100m"),
        );
        assert_eq!(issuance_wait(&request), Duration::ZERO);
    }
}
