//! Agent-to-agent mutual authentication of two workload identities.
//!
//! The initiator (the agent on the client pod's node) opens TCP to the
//! responder (the agent on the server pod's node), and the two run TLS 1.3
//! with both certificates required:
//!
//! - the initiator presents the SVID of its local workload and names the
//!   identity it expects in SNI ([`server_name`]: a hash of the SPIFFE ID, as
//!   SNI only carries DNS names);
//! - the responder picks the SVID of that local workload by SNI, and refuses
//!   when it holds none (it holds keys only for its own node's workloads);
//! - each side checks the other's chain against the bundle of the peer's
//!   trust domain (own or federated, never mixed) and the initiator checks
//!   that the responder's SPIFFE ID is the one it named.
//!
//! Inside the tunnel the initiator says which node it speaks for and, for
//! its workload's pods whose status has no address yet, the addresses it
//! vouches for ([`Vouched`], see [`crate::datapath::sandbox`]); the responder admits
//! or refuses it (the agent checks the node against the connection's
//! source address), and both sides return an [`Authenticated`] result to
//! record: one handshake, both directions. Expiry is the earlier of the
//! two certificates' NotAfter.
//!
//! [`Credentials`] holds the rustls configurations; they are built once per
//! SVID rotation, never per handshake. Session resumption is off: every
//! handshake checks both certificates afresh.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tessera_api::spiffe::SpiffeId;
use tessera_api::svid::Leaf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use webpki::KeyUsage;

use crate::datapath::Authenticated;
use crate::svid::store::{BadCertificate, Bundles, X509Svid, split_der};

/// ALPN protocol of the handshake port.
pub const ALPN: &[u8] = b"tessera-auth/1";

/// The longest a handshake may take, TCP connect included.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Version byte of the message the initiator sends inside the tunnel: the
/// node name alone.
const HELLO_VERSION: u8 = 1;
/// The hello with addresses vouched for: a count of [`VOUCH_FRAME`]s to
/// follow, then the node name. (Sent only with something to vouch for, so
/// an agent that knows only version 1 is asked in version 1 otherwise.)
const HELLO_VOUCHING: u8 = 2;
/// Head byte of a frame vouching for one pod's addresses.
const VOUCH_FRAME: u8 = 4;
/// The most pods one hello may vouch for.
pub const MAX_VOUCHED: usize = 16;
/// The longest pod UID accepted.
const MAX_UID: usize = 64;

/// Why a handshake or building the credentials failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// An SVID, key or bundle could not be used.
    #[error("unusable identity material: {0}; check the SVIDs the signer issued to this node")]
    Material(String),
    /// This agent holds no SVID for the identity the handshake needs.
    #[error(
        "this agent holds no SVID for {0}; only identities of pods on this node can be authenticated here"
    )]
    NoCredential(String),
    /// The connection or the TLS handshake failed (certificate errors included).
    #[error("{what} with {peer}: {source}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The other agent's address.
        peer: String,
        /// The error; rustls' verdict for TLS failures.
        source: std::io::Error,
    },
    /// The responder refused the initiator's node.
    #[error("the agent at {peer} refused: {reason}")]
    Refused {
        /// The other agent's address.
        peer: String,
        /// What it said.
        reason: String,
    },
    /// The other side broke the protocol.
    #[error("the agent at {peer} broke the handshake protocol: {reason}")]
    Protocol {
        /// The other agent's address.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// Too slow.
    #[error(
        "no handshake with {peer} within {HANDSHAKE_TIMEOUT:?}; is its handshake port reachable?"
    )]
    Timeout {
        /// The other agent's address.
        peer: String,
    },
}

/// What is wrong with a frame an initiator sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A vouching frame without a body.
    #[error("an empty vouching frame")]
    EmptyVouch,
    /// A UID length of 0, over the limit or past the frame.
    #[error("a vouching frame with a bad UID length")]
    UidLength,
    /// A UID with other characters.
    #[error("a pod UID that is not letters, digits and dashes")]
    Uid,
    /// An address of an unknown family or cut short.
    #[error("a vouched address of unknown family or cut short")]
    Address,
    /// More addresses than a pod has.
    #[error("too many vouched addresses for one pod")]
    TooManyAddresses,
    /// No address at all.
    #[error("a vouching frame without addresses")]
    NoAddresses,
    /// A hello without a body.
    #[error("an empty hello")]
    EmptyHello,
    /// A hello of an unknown version.
    #[error("unsupported handshake version {0}")]
    Version(u8),
    /// A hello vouching for too many pods.
    #[error("vouches for {0} pods, more than {MAX_VOUCHED}")]
    TooManyVouched(usize),
    /// A node name that is not UTF-8.
    #[error("the node name is not UTF-8")]
    NodeName,
    /// Another frame where a vouching frame belongs.
    #[error("expected a vouching frame, got frame {0}")]
    NotVouch(u8),
}

/// Why a responder refuses an initiator, or a terminator a peer outside
/// the mesh; the other side is told in these words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The initiator's frames are malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The initiator connects from an address of another node.
    #[error("{from} is not an address of node {node}")]
    NotNodeAddress {
        /// Where the connection came from.
        from: IpAddr,
        /// The node it claims to speak for.
        node: String,
    },
    /// This side cannot record the result yet.
    #[error(
        "the responder cannot record {remote} on {node} (not in its view of the cluster after {RECORD_WAIT:?})"
    )]
    Unrecorded {
        /// The initiator's SPIFFE ID.
        remote: String,
        /// Its node.
        node: String,
    },
    /// No policy selects the workload any more.
    #[error("no AuthPolicy selects the workload any more")]
    NoPolicy,
    /// A Deny rule matches.
    #[error("a Deny rule of {sources} matches {peer} on port {port}")]
    Denied {
        /// The policies the rules come from.
        sources: String,
        /// The peer.
        peer: SpiffeId,
        /// The port.
        port: u16,
    },
    /// No TerminateTLS rule admits the peer.
    #[error("no TerminateTLS rule of {sources} admits {peer} on port {port}")]
    NotAllowed {
        /// The policies the rules come from.
        sources: String,
        /// The peer.
        peer: SpiffeId,
        /// The port.
        port: u16,
    },
}

impl From<BadCertificate> for HandshakeError {
    fn from(e: BadCertificate) -> HandshakeError {
        HandshakeError::Material(e.to_string())
    }
}

/// Addresses an initiator vouches for: those of one of its workload's
/// pods, on its node, whose status gives none yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vouched {
    /// The pod's UID.
    pub uid: String,
    /// Its addresses (at most [`crate::datapath::sandbox::MAX_ADDRESSES`]).
    pub ips: Vec<IpAddr>,
}

impl Vouched {
    /// The frame body: the UID's length and bytes, then each address as a
    /// family byte (4 or 6) and its octets.
    pub fn encode(uid: &str, ips: &[IpAddr]) -> Vec<u8> {
        let uid = &uid.as_bytes()[..uid.len().min(MAX_UID)];
        let mut out = Vec::with_capacity(1 + uid.len() + 17 * ips.len());
        out.push(uid.len() as u8);
        out.extend_from_slice(uid);
        for ip in ips.iter().take(crate::datapath::sandbox::MAX_ADDRESSES) {
            match ip {
                IpAddr::V4(v4) => {
                    out.push(4);
                    out.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    out.push(6);
                    out.extend_from_slice(&v6.octets());
                }
            }
        }
        out
    }

    /// Reads a frame body made by [`Vouched::encode`], or says why not.
    pub fn decode(body: &[u8]) -> Result<Vouched, FrameError> {
        let (&len, rest) = body.split_first().ok_or(FrameError::EmptyVouch)?;
        let len = usize::from(len);
        if len == 0 || len > MAX_UID || rest.len() < len {
            return Err(FrameError::UidLength);
        }
        let uid = std::str::from_utf8(&rest[..len])
            .ok()
            .filter(|u| u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            .ok_or(FrameError::Uid)?;
        let mut rest = &rest[len..];
        let mut ips = Vec::new();
        while let Some((&family, tail)) = rest.split_first() {
            let (ip, tail) = match family {
                4 if tail.len() >= 4 => {
                    let (a, t) = tail.split_at(4);
                    (
                        IpAddr::from(<[u8; 4]>::try_from(a).map_err(|_| FrameError::Address)?),
                        t,
                    )
                }
                6 if tail.len() >= 16 => {
                    let (a, t) = tail.split_at(16);
                    (
                        IpAddr::from(<[u8; 16]>::try_from(a).map_err(|_| FrameError::Address)?),
                        t,
                    )
                }
                _ => return Err(FrameError::Address),
            };
            if ips.len() == crate::datapath::sandbox::MAX_ADDRESSES {
                return Err(FrameError::TooManyAddresses);
            }
            ips.push(ip);
            rest = tail;
        }
        if ips.is_empty() {
            return Err(FrameError::NoAddresses);
        }
        Ok(Vouched {
            uid: uid.to_owned(),
            ips,
        })
    }
}

/// The SNI name that asks a responder for `spiffe_id`'s SVID: the first 20
/// bytes of its SHA-256 in hex, under `.tessera.invalid`.
pub fn server_name(spiffe_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spiffe_id.as_bytes());
    let hex: String = digest.as_ref()[..20]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}.tessera.invalid")
}

/// Whether some CA certificate of `old` (own or federated, per trust
/// domain) is missing from `new`: authentications made with SVIDs it signed
/// must not outlive it. Unreadable bundles count as removed (fail closed).
/// CAs held before the own trust domain was known count for nothing: no
/// handshake could use them.
pub fn authorities_removed(old: &Bundles, new: &Bundles) -> bool {
    let set = |b: &Bundles| -> Option<std::collections::BTreeSet<(String, Vec<u8>)>> {
        let mut out = std::collections::BTreeSet::new();
        let all = std::iter::once((&b.trust_domain_id, &b.own_der)).chain(&b.federated_der);
        for (domain, der) in all.filter(|(domain, _)| !domain.is_empty()) {
            for cert in split_der(der).ok()? {
                out.insert((domain.clone(), cert.to_vec()));
            }
        }
        Some(out)
    };
    match (set(old), set(new)) {
        (Some(old), Some(new)) => !old.is_subset(&new),
        _ => true,
    }
}

/// Reads a leaf: exactly one URI SAN, which must parse as a SPIFFE ID.
fn leaf_identity(der: &[u8]) -> Result<Leaf, tessera_api::svid::SvidError> {
    tessera_api::svid::leaf(der)
}

/// Trust anchors by trust domain ID (`spiffe://td`).
#[derive(Debug)]
struct Anchors {
    by_domain: HashMap<String, Vec<TrustAnchor<'static>>>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Chains already verified against these anchors: digest of (usage,
    /// leaf, intermediates) -> (SPIFFE ID, NotBefore, NotAfter). Peers
    /// present the same SVID for many handshakes; the validity period is
    /// still checked on every use, and a bundle change builds new anchors
    /// (and so an empty cache). The handshake signature is always verified.
    verified: std::sync::Mutex<HashMap<[u8; 32], (SpiffeId, i64, i64)>>,
    /// Whether `verified` is used (off only to measure the work of a TLS
    /// stack without such a cache).
    cache_chains: std::sync::atomic::AtomicBool,
}

/// Most verified chains remembered per set of anchors.
const VERIFIED_CACHE: usize = 4096;

fn chain_digest(usage: u8, leaf: &[u8], intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[usage]);
    for cert in std::iter::once(leaf).chain(intermediates.iter().map(|c| c.as_ref())) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Anchors {
    fn new(
        bundles: &Bundles,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<Anchors, HandshakeError> {
        let mut by_domain = HashMap::new();
        let all = std::iter::once((&bundles.trust_domain_id, &bundles.own_der))
            .chain(&bundles.federated_der);
        for (domain, der) in all {
            let anchors = split_der(der)?
                .iter()
                .map(|c| {
                    webpki::anchor_from_trusted_cert(c)
                        .map(|a| a.to_owned())
                        .map_err(|e| {
                            HandshakeError::Material(format!("a CA of {domain} is unusable: {e}"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            by_domain.insert(domain.clone(), anchors);
        }
        Ok(Anchors {
            by_domain,
            algorithms,
            verified: Default::default(),
            cache_chains: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The SPIFFE ID and NotAfter of a chain verified for `usage_tag` and
    /// still in the cache.
    fn verified_identity(
        &self,
        usage_tag: u8,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<(SpiffeId, i64)> {
        if !self.cache_chains.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let digest = chain_digest(usage_tag, leaf, intermediates);
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified
            .get(&digest)
            .map(|(id, _, not_after)| (id.clone(), *not_after))
    }

    /// Verifies `leaf` against the bundle of its own trust domain; the
    /// SPIFFE ID on success.
    fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        usage_tag: u8,
    ) -> Result<(SpiffeId, i64), rustls::Error> {
        let bad = |why: String| rustls::Error::General(why);
        let digest = chain_digest(usage_tag, leaf, intermediates);
        let now_secs = now.as_secs() as i64;
        let caching = self.cache_chains.load(std::sync::atomic::Ordering::Relaxed);
        let cached = caching
            .then(|| {
                self.verified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&digest)
                    .cloned()
            })
            .flatten();
        if let Some((id, not_before, not_after)) = cached
            && not_before <= now_secs
            && now_secs < not_after
        {
            return Ok((id, not_after));
        }
        // Only the bundle of the peer's own trust domain.
        let anchors = |leaf: &Leaf| {
            let domain = leaf.id.trust_domain().id().to_string();
            self.by_domain
                .get(&domain)
                .filter(|a| !a.is_empty())
                .map(Vec::as_slice)
        };
        let Leaf {
            id,
            not_before,
            not_after,
        } = tessera_api::svid::verify(
            leaf,
            intermediates,
            anchors,
            self.algorithms.all,
            now,
            usage,
        )
        .map_err(|e| bad(e.to_string()))?;
        if !caching {
            return Ok((id, not_after));
        }
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(digest, (id.clone(), not_before, not_after));
        Ok((id, not_after))
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// The signature checks both verifiers share: TLS 1.3 handshake signatures
/// against the provider's algorithms; TLS 1.2 is never negotiated.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.algorithms.supported_schemes()
        }
    };
}

/// The initiator's check of the responder: chain, and the SPIFFE ID named by SNI.
#[derive(Debug)]
struct ResponderVerifier(Arc<Anchors>);

impl ServerCertVerifier for ResponderVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (id, _) = self
            .0
            .verify(end_entity, intermediates, now, KeyUsage::server_auth(), 1)?;
        if ServerName::try_from(self::server_name(id.as_str()).as_str())
            .ok()
            .as_ref()
            != Some(server_name)
        {
            return Err(rustls::Error::General(format!(
                "the responder presented {id}, not the identity this handshake asked for"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Decides whether a peer outside the mesh, its X509-SVID verified, may
/// reach a local workload (the reason when not).
pub type Admit = Arc<dyn Fn(&SpiffeId) -> Result<(), Refusal> + Send + Sync>;

/// The responder's check of the initiator, and the terminator's check of a
/// peer outside the mesh: a valid X509-SVID of a trust domain this agent
/// holds a bundle for (the own or a federated one; each peer against its
/// own trust domain's only). With an [`Admit`], also a SPIFFE ID it
/// accepts; without, which identities may talk is the data path's business.
struct ClientVerifier(Arc<Anchors>, Option<Admit>);

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("admit", &self.1.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (id, _) = self
            .0
            .verify(end_entity, intermediates, now, KeyUsage::client_auth(), 2)?;
        if let Some(admit) = &self.1 {
            // Refused by policy: the reason travels in the error.
            admit(&id).map_err(|why| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(why)),
                ))
            })?;
        }
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// The certificate of one local workload, whatever the client asks for.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// One local workload's key and chain, ready for rustls.
#[derive(Debug, Clone)]
struct Local {
    client: Arc<rustls::ClientConfig>,
    key: Arc<CertifiedKey>,
    chain_der: Vec<u8>,
    not_after: i64,
}

/// The X.509 part of the bundles a [`Credentials`] was built for.
type Trust = (String, Vec<u8>, std::collections::BTreeMap<String, Vec<u8>>);

fn trust_of(bundles: &Bundles) -> Trust {
    (
        bundles.trust_domain_id.clone(),
        bundles.own_der.clone(),
        bundles.federated_der.clone(),
    )
}

/// The responder's certificate choice: the local SVID SNI names.
#[derive(Debug)]
struct BySni(HashMap<String, Arc<CertifiedKey>>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello.server_name().and_then(|n| self.0.get(n)).cloned()
    }
}

/// rustls configurations for this node's workloads, built once per rotation.
#[derive(Debug, Clone)]
pub struct Credentials {
    trust: Arc<Trust>,
    anchors: Arc<Anchors>,
    locals: Arc<HashMap<String, Local>>,
    by_sni: Arc<HashMap<String, String>>,
    server: Arc<rustls::ServerConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    use rustls::crypto::ring::kx_group::{SECP256R1, X25519};
    // TLS 1.3 suites only, AES-128-GCM/SHA-256 first (as Go and BoringSSL
    // prefer on CPUs with AES and SHA instructions: the transcript hash and
    // key schedule then run on SHA-256 in hardware).
    //
    // Key exchange on P-256 first, the curve of the SVIDs' keys: one
    // NIST-approved curve for the whole handshake (FIPS deployments need
    // that), and ring's fixed-base P-256 multiplication makes an ephemeral
    // key several times cheaper than an X25519 one (11% more handshakes per
    // second here). Initiators send a key share for the first group only;
    // X25519 stays accepted.
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![SECP256R1, X25519],
        ..rustls::crypto::ring::default_provider()
    })
}

impl Credentials {
    /// Builds the configurations for `svids` (one per SPIFFE ID is used: the
    /// latest-expiring) verified against `bundles`.
    pub fn build<'a>(
        svids: impl IntoIterator<Item = &'a X509Svid>,
        bundles: &Bundles,
    ) -> Result<Credentials, HandshakeError> {
        Self::rebuild(None, svids, bundles)
    }

    /// As [`Credentials::build`], reusing from `prev` (when its bundles are
    /// the same) the anchors, with their verified-chain cache, and every
    /// workload's configuration whose chain did not change: one new SVID
    /// costs one new configuration, not one per local workload.
    pub fn rebuild<'a>(
        prev: Option<&Credentials>,
        svids: impl IntoIterator<Item = &'a X509Svid>,
        bundles: &Bundles,
    ) -> Result<Credentials, HandshakeError> {
        let provider = provider();
        let trust = trust_of(bundles);
        let prev = prev.filter(|p| *p.trust == trust);
        let anchors = match prev {
            Some(p) => p.anchors.clone(),
            None => Arc::new(Anchors::new(
                bundles,
                provider.signature_verification_algorithms,
            )?),
        };
        let tls = |e: rustls::Error| HandshakeError::Material(e.to_string());
        let mut newest: HashMap<String, (&X509Svid, Vec<CertificateDer<'static>>, i64)> =
            HashMap::new();
        for svid in svids {
            let chain = split_der(&svid.chain_der)?;
            let leaf = chain.first().ok_or_else(|| {
                HandshakeError::Material(format!("{}: empty chain", svid.spiffe_id))
            })?;
            let Leaf { id, not_after, .. } =
                leaf_identity(leaf).map_err(|e| HandshakeError::Material(e.to_string()))?;
            if id.as_str() != svid.spiffe_id {
                return Err(HandshakeError::Material(format!(
                    "the SVID stored for {} names {id}",
                    svid.spiffe_id
                )));
            }
            if newest
                .get(&svid.spiffe_id)
                .is_none_or(|(_, _, t)| *t < not_after)
            {
                newest.insert(svid.spiffe_id.clone(), (svid, chain, not_after));
            }
        }
        let mut locals = HashMap::new();
        let mut by_sni = HashMap::new();
        let mut keys = HashMap::new();
        for (id, (svid, chain, not_after)) in newest {
            let sni = server_name(&id);
            if let Some(old) = prev
                .and_then(|p| p.locals.get(&id))
                .filter(|l| l.chain_der == svid.chain_der)
            {
                keys.insert(sni.clone(), old.key.clone());
                by_sni.insert(sni, id.clone());
                locals.insert(id, old.clone());
                continue;
            }
            let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_der.clone()));
            let signing = provider
                .key_provider
                .load_private_key(key_der.clone_key())
                .map_err(|e| HandshakeError::Material(format!("the key of {id}: {e}")))?;
            let key = Arc::new(CertifiedKey::new(chain.clone(), signing));
            let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ResponderVerifier(anchors.clone())))
                .with_client_auth_cert(chain, key_der)
                .map_err(tls)?;
            client.alpn_protocols = vec![ALPN.to_vec()];
            client.resumption = rustls::client::Resumption::disabled();
            keys.insert(sni.clone(), key.clone());
            by_sni.insert(sni, id.clone());
            locals.insert(
                id,
                Local {
                    client: Arc::new(client),
                    key,
                    chain_der: svid.chain_der.clone(),
                    not_after,
                },
            );
        }
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(Arc::new(ClientVerifier(anchors.clone(), None)))
            .with_cert_resolver(Arc::new(BySni(keys)));
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Credentials {
            trust: Arc::new(trust),
            anchors,
            locals: Arc::new(locals),
            by_sni: Arc::new(by_sni),
            server: Arc::new(server),
        })
    }

    /// A TLS server configuration that terminates a peer outside the mesh
    /// for the local workload `local`: presents its X509-SVID, requires the
    /// peer's (TLS 1.3 only) and admits it only if `admit` does.
    pub fn terminator(
        &self,
        local: &str,
        admit: Admit,
    ) -> Result<Arc<rustls::ServerConfig>, HandshakeError> {
        let held = self
            .locals
            .get(local)
            .ok_or_else(|| HandshakeError::NoCredential(local.to_owned()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HandshakeError::Material(e.to_string()))?
            .with_client_cert_verifier(Arc::new(ClientVerifier(self.anchors.clone(), Some(admit))))
            .with_cert_resolver(Arc::new(Fixed(held.key.clone())));
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Arc::new(server))
    }

    /// Whether a client's certificate chain that a terminator accepted
    /// still verifies against the bundles held now: the peer's SPIFFE ID,
    /// or why not.
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<SpiffeId, rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.anchors
            .verify(
                leaf,
                intermediates,
                UnixTime::now(),
                KeyUsage::client_auth(),
                2,
            )
            .map(|(id, _)| id)
    }

    /// Verifies every peer chain in full on every handshake from now on,
    /// as a TLS stack without a verified-chain cache does (the benchmarks'
    /// like-for-like figure; the agent itself always caches).
    pub fn without_chain_cache(&self) {
        self.anchors
            .cache_chains
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.anchors
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Fails unless this agent holds an SVID for `spiffe_id` (before any
    /// connection is made for it).
    pub(crate) fn require(&self, spiffe_id: &str) -> Result<(), HandshakeError> {
        self.local(spiffe_id).map(|_| ())
    }

    /// The credential of `spiffe_id`, a local identity.
    fn local(&self, spiffe_id: &str) -> Result<&Local, HandshakeError> {
        self.locals
            .get(spiffe_id)
            .ok_or_else(|| HandshakeError::NoCredential(spiffe_id.to_owned()))
    }

    /// Whether this agent holds an SVID for `spiffe_id`.
    pub fn holds(&self, spiffe_id: &str) -> bool {
        self.locals.contains_key(spiffe_id)
    }

    /// The local identities held, sorted.
    pub fn identities(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.locals.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// NotAfter (Unix seconds) of the SVID used for `spiffe_id`.
    pub fn not_after(&self, spiffe_id: &str) -> Option<i64> {
        self.locals.get(spiffe_id).map(|l| l.not_after)
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    head: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let len = u8::try_from(body.len()).unwrap_or(u8::MAX);
    let mut frame = Vec::with_capacity(2 + usize::from(len));
    frame.push(head);
    frame.push(len);
    frame.extend_from_slice(&body[..usize::from(len)]);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// Tells the initiator why it is refused; returns the reason.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, reason: Refusal) -> String {
    let reason = reason.to_string();
    let _ = write_frame(stream, 1, reason.as_bytes()).await;
    reason
}

async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut body = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// One frame: its head byte and its body.
pub type Frame<'a> = (u8, &'a [u8]);

/// The first frame in `bytes` (a head byte, a length byte, that many body
/// bytes) and what follows it; None when `bytes` holds no whole frame.
pub fn split_frame(bytes: &[u8]) -> Option<(Frame<'_>, &[u8])> {
    let (&head, rest) = bytes.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    (rest.len() >= len).then(|| ((head, &rest[..len]), &rest[len..]))
}

/// An initiator's hello frame: the node it speaks for and how many
/// vouching frames follow, or why it is refused.
pub fn read_hello(version: u8, body: &[u8]) -> Result<(String, usize), FrameError> {
    let (count, node) = match version {
        HELLO_VERSION => (0, body),
        HELLO_VOUCHING => {
            let (&count, node) = body.split_first().ok_or(FrameError::EmptyHello)?;
            (usize::from(count), node)
        }
        _ => return Err(FrameError::Version(version)),
    };
    if count > MAX_VOUCHED {
        return Err(FrameError::TooManyVouched(count));
    }
    let node = String::from_utf8(node.to_vec()).map_err(|_| FrameError::NodeName)?;
    Ok((node, count))
}

/// The peer's leaf from a finished TLS session, with its SPIFFE ID and
/// NotAfter: from the verified-chain cache when the verifier just put it
/// there (`usage_tag` as the verifier's), else read from the certificate.
fn peer_leaf(
    anchors: &Anchors,
    certs: Option<&[CertificateDer<'_>]>,
    usage_tag: u8,
    peer: &str,
) -> Result<(SpiffeId, i64), HandshakeError> {
    let (leaf, intermediates) =
        certs
            .and_then(|c| c.split_first())
            .ok_or_else(|| HandshakeError::Protocol {
                peer: peer.to_owned(),
                reason: "no peer certificate after the handshake".into(),
            })?;
    if let Some(known) = anchors.verified_identity(usage_tag, leaf, intermediates) {
        return Ok(known);
    }
    leaf_identity(leaf)
        .map(|l| (l.id, l.not_after))
        .map_err(|e| HandshakeError::Protocol {
            peer: peer.to_owned(),
            reason: e.to_string(),
        })
}

/// What an initiator asks for.
#[derive(Debug, Clone)]
pub struct Initiate<'a> {
    /// The local workload's SPIFFE ID (its SVID is presented).
    pub local: &'a str,
    /// The SPIFFE ID expected of the remote workload.
    pub remote: &'a str,
    /// The node this agent speaks for.
    pub local_node: &'a str,
    /// The node of the responder (recorded as the remote node).
    pub remote_node: &'a str,
    /// The local address to connect from (this node's address, which the
    /// responder checks); None lets the kernel choose.
    pub source: Option<std::net::IpAddr>,
    /// Addresses of the local workload's pods to vouch for: (pod UID,
    /// addresses); at most [`MAX_VOUCHED`] are sent.
    pub vouch: &'a [(Arc<str>, Arc<[IpAddr]>)],
}

/// Authenticates `ask.local` to `ask.remote` over a new connection to the
/// responder at `addr`.
pub async fn initiate(
    creds: &Credentials,
    addr: std::net::SocketAddr,
    ask: &Initiate<'_>,
) -> Result<Authenticated, HandshakeError> {
    let peer = addr.to_string();
    creds.require(ask.local)?;
    let run = async {
        let tcp = connect(addr, ask.source).await?;
        initiate_on(creds, tcp, &peer, ask).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| HandshakeError::Timeout { peer: peer.clone() })?
}

/// A TCP connection to `addr` from `source` (this node's address), if given.
pub async fn connect(
    addr: std::net::SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, HandshakeError> {
    let io = |what: &'static str| {
        move |source| HandshakeError::Io {
            what,
            peer: addr.to_string(),
            source,
        }
    };
    let tcp = match source {
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(io("opening a socket"))?;
            socket
                .bind(std::net::SocketAddr::new(ip, 0))
                .map_err(io("binding to this node's address"))?;
            socket.connect(addr).await.map_err(io("connecting"))?
        }
        None => TcpStream::connect(addr).await.map_err(io("connecting"))?,
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The initiator's side of the handshake on `stream`, to the agent `peer`.
#[tracing::instrument(name = "handshake", skip_all, fields(role = "initiator", local = ask.local, remote = ask.remote, peer = %peer))]
pub(crate) async fn initiate_on<S: AsyncRead + AsyncWrite + Unpin>(
    creds: &Credentials,
    stream: S,
    peer: &str,
    ask: &Initiate<'_>,
) -> Result<Authenticated, HandshakeError> {
    let peer = peer.to_owned();
    let io = |what: &'static str| {
        let peer = peer.clone();
        move |source| HandshakeError::Io { what, peer, source }
    };
    let local = creds.local(ask.local)?;
    let name = ServerName::try_from(server_name(ask.remote))
        .map_err(|e| HandshakeError::Material(format!("SNI for {}: {e}", ask.remote)))?;
    let mut tls = TlsConnector::from(local.client.clone())
        .connect(name, stream)
        .await
        .map_err(io("TLS handshake"))?;
    let (remote, remote_not_after) = peer_leaf(
        &creds.anchors,
        tls.get_ref().1.peer_certificates(),
        1,
        &peer,
    )?;
    if remote.as_str() != ask.remote {
        // The verifier already checked this via SNI; a second look costs nothing.
        return Err(HandshakeError::Protocol {
            peer,
            reason: format!("presented {remote}, expected {}", ask.remote),
        });
    }
    send_hello(&mut tls, ask)
        .await
        .map_err(io("sending the node name"))?;
    let (status, body) = read_frame(&mut tls)
        .await
        .map_err(io("reading the answer"))?;
    if status != 0 {
        return Err(HandshakeError::Refused {
            peer,
            reason: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    // No close_notify: both frames are length-delimited, so a truncation
    // cannot pass for an answer, and closing the socket is enough.
    drop(tls);
    Ok(Authenticated {
        local: ask.local.to_owned(),
        remote: remote.to_string(),
        remote_node: ask.remote_node.to_owned(),
        not_after: local.not_after.min(remote_not_after),
    })
}

/// The hello: the node name, and the addresses vouched for if any.
async fn send_hello<S: AsyncWrite + Unpin>(tls: &mut S, ask: &Initiate<'_>) -> std::io::Result<()> {
    let vouch = &ask.vouch[..ask.vouch.len().min(MAX_VOUCHED)];
    if vouch.is_empty() {
        return write_frame(tls, HELLO_VERSION, ask.local_node.as_bytes()).await;
    }
    let mut hello = Vec::with_capacity(1 + ask.local_node.len());
    hello.push(vouch.len() as u8);
    hello.extend_from_slice(ask.local_node.as_bytes());
    write_frame(tls, HELLO_VOUCHING, &hello).await?;
    for (uid, ips) in vouch {
        write_frame(tls, VOUCH_FRAME, &Vouched::encode(uid, ips)).await?;
    }
    Ok(())
}

/// The hello and the vouching frames that follow it.
async fn read_hello_frames<S: AsyncRead + Unpin>(
    tls: &mut S,
) -> std::io::Result<Result<(String, Vec<Vouched>), FrameError>> {
    let (version, body) = read_frame(tls).await?;
    let (node, count) = match read_hello(version, &body) {
        Ok(hello) => hello,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut vouched = Vec::with_capacity(count);
    for _ in 0..count {
        let (head, body) = read_frame(tls).await?;
        if head != VOUCH_FRAME {
            return Ok(Err(FrameError::NotVouch(head)));
        }
        match Vouched::decode(&body) {
            Ok(v) => vouched.push(v),
            Err(reason) => return Ok(Err(reason)),
        }
    }
    Ok(Ok((node, vouched)))
}

/// What the responder knows about an initiator before admitting it.
#[derive(Debug, Clone)]
pub struct Knock<'a> {
    /// The initiator's verified SPIFFE ID.
    pub remote: &'a str,
    /// The local workload it asked for.
    pub local: &'a str,
    /// The node it says it speaks for.
    pub remote_node: &'a str,
    /// Where the connection came from.
    pub from: std::net::SocketAddr,
    /// The addresses it vouches for (see [`crate::datapath::sandbox`]): for the
    /// responder to keep if it admits the node.
    pub vouched: &'a [Vouched],
}

/// How long a responder waits for its own view of the cluster to know the
/// initiator's workload before it refuses: it records the result before it
/// answers, so the initiator never allows traffic this side would drop.
pub const RECORD_WAIT: Duration = Duration::from_secs(2);

/// Answers one initiator on an accepted connection. `admit` decides whether
/// the initiator may speak for the node it names (the agent checks the
/// node's address) and, when it may, keeps the addresses it vouches for;
/// `record` stores the result and says whether it could
/// (it cannot while this agent does not know the initiator's workload yet:
/// it is retried for up to [`RECORD_WAIT`]). Only a recorded result is
/// answered with success, so both sides hold it before any traffic flows;
/// it is returned too.
pub async fn respond(
    creds: &Credentials,
    tcp: TcpStream,
    admit: impl FnOnce(&Knock<'_>) -> Result<(), Refusal>,
    record: impl Fn(&Authenticated) -> bool,
) -> Result<Authenticated, HandshakeError> {
    let from = tcp.peer_addr().map_err(|source| HandshakeError::Io {
        what: "reading the peer address",
        peer: "?".into(),
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    respond_on(creds, tcp, from, admit, record).await
}

/// Answers one initiator on `stream` (a TCP connection of its own, or a
/// stream of a channel) from `from`; see [`respond`].
pub async fn respond_on<S: AsyncRead + AsyncWrite + Unpin>(
    creds: &Credentials,
    stream: S,
    from: std::net::SocketAddr,
    admit: impl FnOnce(&Knock<'_>) -> Result<(), Refusal>,
    record: impl Fn(&Authenticated) -> bool,
) -> Result<Authenticated, HandshakeError> {
    let peer = from.to_string();
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        respond_inner(creds, stream, from, admit, record),
    )
    .await
    .map_err(|_| HandshakeError::Timeout { peer })?
}

#[tracing::instrument(name = "handshake", skip_all, fields(role = "responder", peer = %from))]
async fn respond_inner<S: AsyncRead + AsyncWrite + Unpin>(
    creds: &Credentials,
    stream: S,
    from: std::net::SocketAddr,
    admit: impl FnOnce(&Knock<'_>) -> Result<(), Refusal>,
    record: impl Fn(&Authenticated) -> bool,
) -> Result<Authenticated, HandshakeError> {
    let peer = from.to_string();
    let io = |what: &'static str| {
        let peer = peer.clone();
        move |source| HandshakeError::Io { what, peer, source }
    };
    let mut tls = TlsAcceptor::from(creds.server.clone())
        .accept(stream)
        .await
        .map_err(io("TLS handshake"))?;
    let (_, session) = tls.get_ref();
    let (remote, remote_not_after) =
        peer_leaf(&creds.anchors, session.peer_certificates(), 2, &peer)?;
    let local = session
        .server_name()
        .and_then(|n| creds.by_sni.get(n))
        .cloned()
        .ok_or_else(|| HandshakeError::Protocol {
            peer: peer.clone(),
            reason: "no SNI naming a local identity".into(),
        })?;
    let not_after = creds.locals.get(&local).map_or(i64::MIN, |l| l.not_after);
    let (node, vouched) = match read_hello_frames(&mut tls)
        .await
        .map_err(io("reading the node name"))?
    {
        Ok(hello) => hello,
        Err(reason) => {
            let reason = refuse(&mut tls, reason.into()).await;
            return Err(HandshakeError::Protocol { peer, reason });
        }
    };
    let knock = Knock {
        remote: remote.as_str(),
        local: &local,
        remote_node: &node,
        from,
        vouched: &vouched,
    };
    if let Err(reason) = admit(&knock) {
        let reason = refuse(&mut tls, reason).await;
        return Err(HandshakeError::Refused { peer, reason });
    }
    let auth = Authenticated {
        local,
        remote: remote.to_string(),
        remote_node: node,
        not_after: not_after.min(remote_not_after),
    };
    let waited = tokio::time::Instant::now();
    while !record(&auth) {
        if waited.elapsed() >= RECORD_WAIT {
            let unrecorded = Refusal::Unrecorded {
                remote: auth.remote.clone(),
                node: auth.remote_node.clone(),
            };
            let reason = refuse(&mut tls, unrecorded).await;
            return Err(HandshakeError::Refused { peer, reason });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    write_frame(&mut tls, 0, b"")
        .await
        .map_err(io("answering"))?;
    // The initiator has sent all it will send (it reads the answer next), so
    // closing here sends FIN after the answer, never a reset.
    drop(tls);
    Ok(auth)
}
