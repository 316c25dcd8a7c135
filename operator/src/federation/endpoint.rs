//! Tessera's SPIFFE bundle endpoint: the trust domain's bundle in SPIFFE
//! bundle format (a JWK set with the X.509 and JWT authorities,
//! `spiffe_sequence` and `spiffe_refresh_hint`), served over HTTPS so other
//! trust domains (SPIRE servers, other Tessera clusters) can federate with
//! this one. Both profiles of the SPIFFE Federation specification:
//!
//! - `https_spiffe`: the endpoint presents an X509-SVID for
//!   [`endpoint_id`], reissued after every root change and well before it
//!   expires. A relying party checks it against the bundle it already
//!   holds, which may predate the last rotation, so the SVID comes from the
//!   oldest root that outlives it ([`TrustDomainCa::longest_trusted`]).
//! - `https_web`: the endpoint presents a Web PKI certificate read from
//!   files (a cert-manager Secret mounted into the pod, say), reloaded when
//!   the files change; a certificate that cannot be read keeps the previous
//!   one in use.
//!
//! The document is built from the roots held at the time of each request,
//! so a rotation or a root removed by hand is served at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tessera_api::spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{Notify, RwLock};
use tracing::{debug, info, warn};

use crate::ca::{CaError, TrustDomainCa};
use crate::metrics::{EndpointLabel, Metrics};

/// The path the bundle is served at.
pub const ENDPOINT_PATH: &str = "/";
/// Lifetime of the endpoint's own X509-SVID.
pub const ENDPOINT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the https_web certificate files are checked for changes.
pub const WEB_CERT_CHECK: Duration = Duration::from_secs(10);
/// How long a client gets to finish the TLS handshake and send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 256;

/// Why the endpoint could not start or renew its certificate.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Binding the listener failed.
    #[error("cannot listen for the bundle endpoint on {addr}: {source}; is the address free?")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The endpoint's X509-SVID could not be issued.
    #[error("cannot issue the bundle endpoint's X509-SVID: {0}")]
    Ca(#[from] CaError),
    /// The https_web certificate or key files are unusable.
    #[error(
        "the bundle endpoint's Web PKI certificate ({cert}, key {key}) is unusable: {reason}; check that both files hold PEM, the key matches the certificate and the operator may read them"
    )]
    WebCertificate {
        /// Certificate chain file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint's SPIFFE ID cannot be formed from the trust domain.
    #[error("the bundle endpoint's SPIFFE ID: {0}")]
    EndpointId(#[from] tessera_api::spiffe::SpiffeIdError),
    /// The certificate chain is not PEM.
    #[error("certificate PEM: {0}")]
    CertificatePem(rustls::pki_types::pem::Error),
    /// The certificate file holds no certificate.
    #[error("no CERTIFICATE block in the certificate file")]
    NoCertificate,
    /// The key is not PEM.
    #[error("key PEM: {0}")]
    KeyPem(rustls::pki_types::pem::Error),
    /// rustls cannot sign with the key.
    #[error("key: {0}")]
    Key(rustls::Error),
    /// The key is not the certificate's.
    #[error("the key does not match the certificate: {0}")]
    KeyMismatch(rustls::Error),
    /// The bundle cannot be encoded.
    #[error("cannot encode the trust bundle: {0}")]
    Encode(#[from] tessera_api::bundle::BundleError),
}

/// The SPIFFE ID the https_spiffe endpoint presents:
/// `spiffe://<trust domain>/tessera/bundle-endpoint`. Relying parties
/// configure it as the endpoint's SPIFFE ID.
pub fn endpoint_id(td: &TrustDomain) -> Result<SpiffeId, EndpointError> {
    Ok(td.member("/tessera/bundle-endpoint")?)
}

/// A server certificate that can be replaced while serving.
#[derive(Debug)]
pub struct SwapCert(std::sync::RwLock<Arc<CertifiedKey>>);

impl SwapCert {
    /// Starts with `key`.
    pub fn new(key: CertifiedKey) -> SwapCert {
        SwapCert(std::sync::RwLock::new(Arc::new(key)))
    }

    /// Presents `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for SwapCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A TLS identity from a PEM certificate chain (leaf first) and PEM key.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, EndpointError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(EndpointError::CertificatePem)?;
    if chain.is_empty() {
        return Err(EndpointError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(EndpointError::KeyPem)?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(EndpointError::Key)?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(EndpointError::KeyMismatch)?;
    Ok(certified)
}

fn svid_key(ca: &TrustDomainCa, td: &TrustDomain) -> Result<CertifiedKey, EndpointError> {
    let now = OffsetDateTime::now_utc();
    // From the oldest root still good for the whole lifetime: relying
    // parties hold the bundle they fetched last, which may predate a
    // rotation.
    let root = ca.longest_trusted(now, ENDPOINT_SVID_TTL)?;
    let (cert, key) =
        ca.issue_server_cert(root, &endpoint_id(td)?, &[], &[], ENDPOINT_SVID_TTL, now)?;
    certified_key(cert.as_bytes(), key.as_bytes())
}

fn web_key(cert: &Path, key: &Path) -> Result<CertifiedKey, EndpointError> {
    let err = |reason: String| EndpointError::WebCertificate {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let chain = std::fs::read(cert).map_err(|e| err(format!("reading {}: {e}", cert.display())))?;
    let pem = std::fs::read(key).map_err(|e| err(format!("reading {}: {e}", key.display())))?;
    certified_key(&chain, &pem).map_err(|e| err(e.to_string()))
}

/// What the endpoint serves and how it reports.
#[derive(Debug, Clone)]
pub struct Source {
    /// The roots, shared with whoever rotates and reloads them.
    pub ca: Arc<RwLock<TrustDomainCa>>,
    /// `spiffe_refresh_hint` of the served bundle.
    pub refresh_hint: Duration,
    /// Request counters.
    pub metrics: Arc<Metrics>,
}

impl Source {
    async fn document(&self) -> Result<Vec<u8>, EndpointError> {
        let ca = self.ca.read().await;
        Ok(ca
            .spiffe_bundle(OffsetDateTime::now_utc(), self.refresh_hint)
            .to_json()?)
    }

    async fn respond(
        &self,
        profile: &'static str,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Full<Bytes>> {
        let plain = |code: StatusCode, text: &str| {
            let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
            *r.status_mut() = code;
            r
        };
        let response = if req.uri().path() != ENDPOINT_PATH {
            plain(StatusCode::NOT_FOUND, "the bundle is served at /\n")
        } else if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            r
        } else {
            match self.document().await {
                Ok(doc) => {
                    let mut r = Response::new(Full::new(Bytes::from(doc)));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    r.headers_mut().insert(
                        hyper::header::CACHE_CONTROL,
                        hyper::header::HeaderValue::from_static("no-store"),
                    );
                    r
                }
                Err(e) => {
                    warn!(error = %e, "cannot encode the trust bundle for the bundle endpoint");
                    plain(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the bundle cannot be encoded; see the operator's log\n",
                    )
                }
            }
        };
        self.metrics
            .bundle_endpoint_requests
            .get_or_create(&EndpointLabel {
                profile,
                code: response.status().as_u16(),
            })
            .inc();
        response
    }
}

/// Binds `addr` for the bundle endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EndpointError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError::Bind { addr, source })
}

/// Serves the bundle on `listener` with the certificate `cert` presents,
/// until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    cert: Arc<SwapCert>,
    source: Source,
    profile: &'static str,
) {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_no_client_auth().with_cert_resolver(cert));
    let config = match config.as_mut() {
        Ok(config) => {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config.clone())
        }
        Err(e) => {
            warn!(error = %e, "cannot set up TLS for the bundle endpoint");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "bundle endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, source) = (acceptor.clone(), source.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "bundle endpoint: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(source.respond(profile, req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(e) = served.await {
                debug!(%peer, error = %e, "bundle endpoint: connection failed");
            }
        });
    }
}

/// Runs the https_spiffe endpoint on `listener`: issues its X509-SVID,
/// reissues it after every root change (`rotated`) and when half its
/// lifetime has passed, and serves until the task is dropped.
pub async fn run_spiffe(
    listener: TcpListener,
    td: TrustDomain,
    source: Source,
    rotated: Arc<Notify>,
) -> Result<(), EndpointError> {
    let first = svid_key(&*source.ca.read().await, &td)?;
    let cert = Arc::new(SwapCert::new(first));
    let renewing = {
        let (cert, ca) = (cert.clone(), source.ca.clone());
        async move {
            loop {
                tokio::select! {
                    _ = rotated.notified() => {}
                    _ = tokio::time::sleep(ENDPOINT_SVID_TTL / 2) => {}
                }
                match svid_key(&*ca.read().await, &td) {
                    Ok(key) => {
                        cert.set(key);
                        info!("bundle endpoint: X509-SVID reissued");
                    }
                    Err(e) => {
                        warn!(error = %e, "bundle endpoint: cannot reissue the X509-SVID; the current one stays in use")
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = renewing => {}
        _ = serve(listener, cert, source, "https_spiffe") => {}
    }
    Ok(())
}

/// Runs the https_web endpoint on `listener` with the certificate chain
/// and key in `cert_path` and `key_path`, reloading them when they change
/// (a change that cannot be read keeps the previous certificate, with a
/// warning); serves until the task is dropped.
pub async fn run_web(
    listener: TcpListener,
    cert_path: PathBuf,
    key_path: PathBuf,
    source: Source,
) -> Result<(), EndpointError> {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = (stamp(&cert_path), stamp(&key_path));
    let cert = Arc::new(SwapCert::new(web_key(&cert_path, &key_path)?));
    let reloading = {
        let cert = cert.clone();
        async move {
            loop {
                tokio::time::sleep(WEB_CERT_CHECK).await;
                let now = (stamp(&cert_path), stamp(&key_path));
                if now == seen {
                    continue;
                }
                seen = now;
                match web_key(&cert_path, &key_path) {
                    Ok(key) => {
                        cert.set(key);
                        info!(cert = %cert_path.display(), "bundle endpoint: Web PKI certificate reloaded");
                    }
                    Err(e) => {
                        warn!(error = %e, "bundle endpoint: the previous certificate stays in use")
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = reloading => {}
        _ = serve(listener, cert, source, "https_web") => {}
    }
    Ok(())
}
