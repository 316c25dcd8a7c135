//! Fetching a SPIFFE bundle from a bundle endpoint (SPIFFE Federation
//! specification), with either profile:
//!
//! - `https_web`: the server's certificate is checked the Web PKI way
//!   (chain to a trusted root, the URL's host name in the certificate),
//!   against the system's roots or the roots configured for the endpoint.
//! - `https_spiffe`: the server presents an X509-SVID, which must carry
//!   exactly the configured endpoint SPIFFE ID and chain to the X.509
//!   authorities of the endpoint's trust domain as currently held. The host
//!   name plays no part.
//!
//! One GET over HTTP/1.1, a whole-request timeout, a size limit, and the
//! body decoded with the bundle codec; every failure says what to check.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tessera_api::bundle::{Decoded, MAX_BUNDLE_LEN, SpiffeBundle};
use tessera_api::spiffe::SpiffeId;

/// How long one fetch may take, connection to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The URL is not an https URL with a host.
    #[error("bundle endpoint URL {url:?}: {reason}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The host name did not resolve or nothing accepted the connection.
    #[error(
        "cannot connect to {authority}: {reason}; is the endpoint up and reachable from the operator?"
    )]
    Connect {
        /// host:port.
        authority: String,
        /// The error.
        reason: String,
    },
    /// The TLS handshake failed: for https_spiffe usually the wrong endpoint
    /// SPIFFE ID or a bundle that does not hold the endpoint's CA.
    #[error("TLS with {authority} failed: {reason}")]
    Tls {
        /// host:port.
        authority: String,
        /// The error.
        reason: String,
    },
    /// The HTTP exchange failed or answered other than 200.
    #[error("{url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The whole fetch took longer than [`FETCH_TIMEOUT`].
    #[error("{url}: no complete answer within {FETCH_TIMEOUT:?}")]
    Timeout {
        /// The URL.
        url: String,
    },
    /// The body is not a SPIFFE bundle.
    #[error("{url} served a malformed bundle: {reason}")]
    Bundle {
        /// The URL.
        url: String,
        /// The decoding error.
        reason: String,
    },
    /// The configured roots or current bundle cannot authenticate anything.
    #[error("cannot authenticate the endpoint: {0}")]
    Trust(String),
}

/// How the endpoint's certificate is checked.
#[derive(Debug, Clone, Copy)]
pub enum Profile<'a> {
    /// Web PKI, against these roots (DER), or the system's when `None`.
    Web(Option<&'a [CertificateDer<'static>]>),
    /// An X509-SVID for `id`, chaining to `bundle`'s X.509 authorities.
    Spiffe {
        /// The endpoint's SPIFFE ID.
        id: &'a SpiffeId,
        /// The endpoint trust domain's bundle as held now.
        bundle: &'a SpiffeBundle,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trust roots, loaded once. Unreadable ones are skipped.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "cannot read some system trust roots");
        }
        found.certs
    })
}

/// The https_spiffe check of the server: its SPIFFE ID and chain.
#[derive(Debug)]
struct SpiffeVerifier {
    id: SpiffeId,
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |why: String| rustls::Error::General(why);
        let anchors = |_: &tessera_api::svid::Leaf| Some(self.anchors.as_slice());
        let leaf = tessera_api::svid::verify(
            end_entity,
            intermediates,
            anchors,
            self.algorithms.all,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map_err(|e| bad(format!("the endpoint's certificate: {e}")))?;
        if leaf.id != self.id {
            return Err(bad(format!(
                "the endpoint presented {}, not the configured endpoint SPIFFE ID {}",
                leaf.id, self.id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn client_config(profile: Profile<'_>) -> Result<rustls::ClientConfig, FetchError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Trust(e.to_string()))?;
    let mut config = match profile {
        Profile::Web(roots) => {
            let mut store = RootCertStore::empty();
            let roots = match roots {
                Some(roots) => roots,
                None => system_roots(),
            };
            let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
            if added == 0 {
                return Err(FetchError::Trust(
                    "no usable trust roots for https_web (none configured and none found on the system)"
                        .to_owned(),
                ));
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider,
            )
            .build()
            .map_err(|e| FetchError::Trust(e.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        Profile::Spiffe { id, bundle } => {
            let anchors = bundle
                .x509_authorities
                .iter()
                .map(|der| {
                    webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                        .map(|a| a.to_owned())
                        .map_err(|e| {
                            FetchError::Trust(format!(
                                "an X.509 authority of {} is unusable: {e}",
                                id.trust_domain()
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if anchors.is_empty() {
                return Err(FetchError::Trust(format!(
                    "the bundle held for {} has no X.509 authorities; set trustDomainBundle to the trust domain's bundle",
                    id.trust_domain()
                )));
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                    id: id.clone(),
                    anchors,
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Parsed pieces of an https URL.
struct Target {
    host: String,
    port: u16,
    path: String,
    authority: String,
}

fn target(url: &str) -> Result<Target, FetchError> {
    let bad = |reason: &str| FetchError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("bundle endpoints are https only"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    Ok(Target {
        host,
        port,
        path,
        authority,
    })
}

/// Fetches and decodes the bundle at `url`, authenticating the endpoint
/// as `profile` says.
pub async fn fetch(url: &str, profile: Profile<'_>) -> Result<Decoded, FetchError> {
    let config = client_config(profile)?;
    let target = target(url)?;
    tokio::time::timeout(FETCH_TIMEOUT, fetch_from(url, target, config))
        .await
        .map_err(|_| FetchError::Timeout {
            url: url.to_owned(),
        })?
}

async fn fetch_from(
    url: &str,
    target: Target,
    config: rustls::ClientConfig,
) -> Result<Decoded, FetchError> {
    let connect_err = |reason: String| FetchError::Connect {
        authority: target.authority.clone(),
        reason,
    };
    let http_err = |reason: String| FetchError::Http {
        url: url.to_owned(),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let name = ServerName::try_from(target.host.clone()).map_err(|e| FetchError::Url {
        url: url.to_owned(),
        reason: format!("host {:?}: {e}", target.host),
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            // The details (names and addresses in the endpoint's
            // certificate) go to the log only; status gets the kind.
            tracing::warn!(authority = %target.authority, error = %e, "TLS with a bundle endpoint failed");
            FetchError::Tls {
                authority: target.authority.clone(),
                reason: tls_failure(&e),
            }
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| http_err(e.to_string()))?;
    let driving = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::USER_AGENT, "tessera-operator")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_err(e.to_string()))?;
    let answer = sender.send_request(request).await;
    let result = async {
        let response = answer.map_err(|e| http_err(e.to_string()))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(http_err(format!(
                "answered {} instead of 200 with the bundle",
                response.status()
            )));
        }
        let body = Limited::new(response.into_body(), MAX_BUNDLE_LEN)
            .collect()
            .await
            .map_err(|e| http_err(format!("reading the bundle: {e}")))?
            .to_bytes();
        SpiffeBundle::from_json(&body).map_err(|e| FetchError::Bundle {
            url: url.to_owned(),
            reason: e.to_string(),
        })
    }
    .await;
    driving.abort();
    result
}

/// What went wrong in a TLS handshake, without the names and addresses a
/// certificate carries (status is readable more widely than the logs).
fn tls_failure(e: &std::io::Error) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return e.kind().to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => {
            let kind = format!("{c:?}");
            let kind = kind.split(['(', '{', ' ']).next().unwrap_or_default();
            format!("the endpoint's certificate was refused ({kind})")
        }
        rustls::Error::General(why) => why.clone(),
        other => {
            let kind = format!("{other:?}");
            let kind = kind.split(['(', '{', ' ']).next().unwrap_or_default();
            format!("handshake failed ({kind})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_name_the_kind_not_the_certificate() {
        let wrong_name =
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("bundle.b.test").unwrap().to_owned(),
                presented: vec!["internal-db.corp.example".into(), "10.1.2.3".into()],
            });
        let text = tls_failure(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            wrong_name,
        ));
        assert_eq!(
            text,
            "the endpoint's certificate was refused (NotValidForNameContext)"
        );
        let closed = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof");
        assert_eq!(tls_failure(&closed), "unexpected end of file");
    }

    #[test]
    fn urls() {
        let t = target("https://b.test:8443/bundle?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("b.test", 8443));
        assert_eq!(t.path, "/bundle?x=1");
        let t = target("https://[::1]/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 443, "/")
        );
        let t = target("https://127.0.0.1:9").unwrap();
        assert_eq!(t.path, "/");
        for bad in ["http://b.test/", "b.test", "https:///x", "not a url"] {
            assert!(matches!(target(bad), Err(FetchError::Url { .. })), "{bad}");
        }
    }
}
