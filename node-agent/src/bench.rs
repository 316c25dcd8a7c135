//! The handshake benchmark behind `tessera-agent bench-handshake` (run by
//! `cargo xtask bench auth`): a throwaway CA and two X509-SVIDs (ECDSA
//! P-256), written as PEM so the Go crypto/tls peer uses the very same
//! material, then sequential agent handshakes over loopback with initiator
//! and responder on one thread.

pub mod restart;

use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::mesh::handshake::{self, Credentials, Initiate};
use crate::svid::store::{Bundles, X509Svid};

/// The benchmark's trust domain and identities.
pub const TRUST_DOMAIN: &str = "spiffe://bench.test";
/// The initiator's SPIFFE ID.
pub const CLIENT_ID: &str = "spiffe://bench.test/ns/shop/sa/web";
/// The responder's SPIFFE ID.
pub const SERVER_ID: &str = "spiffe://bench.test/ns/shop/sa/db";

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Making certificates failed.
    #[error("cannot make certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// Writing them failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A handshake failed.
    #[error(transparent)]
    Handshake(#[from] handshake::HandshakeError),
    /// Loopback failed.
    #[error("loopback: {0}")]
    Io(#[from] std::io::Error),
    /// An auth cache failed.
    #[error("auth cache: {0}")]
    Cache(String),
    /// A primitive of the crypto floor failed.
    #[error("ring refused the {0} of the crypto floor")]
    Crypto(&'static str),
}

/// Handshake rate and latency.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeFigures {
    /// Completed handshakes per second (initiator and responder on one core).
    pub per_second: f64,
    /// Median latency of one handshake, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Handshakes measured.
    pub count: usize,
}

/// A leaf SVID for `id`: PEM, DER and key.
type Leaf = (String, Vec<u8>, KeyPair);

pub(crate) fn leaf(id: &str, issuer: &Issuer<'_, KeyPair>) -> Result<Leaf, rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(id.to_owned().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), cert.der().to_vec(), key))
}

/// Makes the CA and both SVIDs, writes `ca.pem`, `client.pem`,
/// `client.key`, `server.pem`, `server.key` into `dir`, and returns the
/// SVIDs and bundle for the Rust side.
pub fn make_material(dir: &Path) -> Result<(X509Svid, X509Svid, Bundles), BenchError> {
    let (issuer, ca_cert) = bench_ca_cert()?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| BenchError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    write("ca.pem", &ca_cert.pem())?;
    let mut svids = Vec::new();
    for (name, id) in [("client", CLIENT_ID), ("server", SERVER_ID)] {
        let (pem, der, key) = leaf(id, &issuer)?;
        write(&format!("{name}.pem"), &pem)?;
        write(&format!("{name}.key"), &key.serialize_pem())?;
        svids.push(X509Svid {
            spiffe_id: id.to_owned(),
            chain_der: der,
            key_der: key.serialize_der(),
            hint: String::new(),
        });
    }
    let bundles = Bundles {
        trust_domain_id: TRUST_DOMAIN.to_owned(),
        own_der: ca_cert.der().to_vec(),
        ..Default::default()
    };
    let server = svids.pop().ok_or(rcgen::Error::CouldNotParseCertificate)?;
    let client = svids.pop().ok_or(rcgen::Error::CouldNotParseCertificate)?;
    Ok((client, server, bundles))
}

/// How the benchmark's handshakes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As the agents run them: over a channel, with the verified-chain cache.
    Product,
    /// The work of a TLS stack without either: a TCP connection per
    /// handshake, every chain verified in full.
    SameWork,
}

/// Answers handshakes on `listener`, channels and plain connections alike.
async fn serve(listener: tokio::net::TcpListener, responder: Credentials) {
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            continue;
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            if crate::mesh::channel::is_channel(&tcp).await {
                crate::mesh::channel::serve(tcp, move |stream| {
                    let responder = responder.clone();
                    async move {
                        let _ =
                            handshake::respond_on(&responder, stream, from, |_| Ok(()), |_| true)
                                .await;
                    }
                })
                .await;
            } else {
                let _ = handshake::respond(&responder, tcp, |_| Ok(()), |_| true).await;
            }
        });
    }
}

/// The benchmark's CA: its issuer and its certificate.
fn bench_ca_cert() -> Result<(Issuer<'static, KeyPair>, rcgen::Certificate), rcgen::Error> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.subject_alt_names = vec![SanType::URI(TRUST_DOMAIN.to_owned().try_into()?)];
    let ca_cert = ca.self_signed(&ca_key)?;
    Ok((Issuer::new(ca, ca_key), ca_cert))
}

/// The benchmark's CA: its issuer and its certificate's DER.
pub(crate) fn bench_ca() -> Result<(Issuer<'static, KeyPair>, Vec<u8>), rcgen::Error> {
    bench_ca_cert().map(|(issuer, cert)| (issuer, cert.der().to_vec()))
}

/// Runs sequential handshakes for `seconds` on the current (single)
/// thread, as `mode` says.
pub async fn handshakes(
    client: &X509Svid,
    server: &X509Svid,
    bundles: &Bundles,
    seconds: f64,
    mode: Mode,
) -> Result<HandshakeFigures, BenchError> {
    let initiator = Credentials::build([client], bundles)?;
    let responder = Credentials::build([server], bundles)?;
    if mode == Mode::SameWork {
        initiator.without_chain_cache();
        responder.without_chain_cache();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(serve(listener, responder));
    let channels = crate::mesh::channel::Channels::default();
    let ask = Initiate {
        local: CLIENT_ID,
        remote: SERVER_ID,
        local_node: "node-a",
        remote_node: "node-b",
        source: None,
        vouch: &[],
    };
    let once = || async {
        match mode {
            Mode::Product => channels.authenticate(&initiator, addr, &ask).await,
            Mode::SameWork => handshake::initiate(&initiator, addr, &ask).await,
        }
    };
    // Warm up, then measure.
    for _ in 0..20 {
        once().await?;
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        once().await?;
        latencies.push(t.elapsed());
    }
    let total = started.elapsed();
    accept.abort();
    latencies.sort();
    let at = |p: f64| {
        let i = ((p / 100.0) * (latencies.len() as f64 - 1.0)).round() as usize;
        latencies
            .get(i.min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1000.0
    };
    Ok(HandshakeFigures {
        per_second: latencies.len() as f64 / total.as_secs_f64(),
        p50_ms: at(50.0),
        p99_ms: at(99.0),
        count: latencies.len(),
    })
}

/// The cryptography one mutual TLS 1.3 handshake cannot do without, with
/// the library the agents use (ring) on this thread: both sides' ephemeral
/// P-256 key pairs and agreements, two ECDSA P-256 signatures and two
/// verifications (the CertificateVerify messages). Microseconds per
/// handshake, the median of `rounds` rounds.
pub fn crypto_floor(rounds: usize) -> Result<f64, BenchError> {
    use ring::agreement::{self, ECDH_P256, EphemeralPrivateKey};
    use ring::signature::{
        self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    };
    let rng = ring::rand::SystemRandom::new();
    fn crypto<E>(what: &'static str) -> impl Fn(E) -> BenchError {
        move |_| BenchError::Crypto(what)
    }
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(crypto("key"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(crypto("key"))?;
    let public = signature::UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );
    // What TLS 1.3 signs: 64 spaces, a context string, a zero byte and the
    // transcript hash.
    let message = [0x20u8; 130];
    let mut each = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let client = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(crypto("ECDHE"))?;
        let server = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(crypto("ECDHE"))?;
        let client_share = client.compute_public_key().map_err(crypto("ECDHE"))?;
        let server_share = server.compute_public_key().map_err(crypto("ECDHE"))?;
        for (private, share) in [(client, server_share), (server, client_share)] {
            let share = agreement::UnparsedPublicKey::new(&ECDH_P256, share.as_ref().to_vec());
            agreement::agree_ephemeral(private, &share, |secret| secret.len())
                .map_err(crypto("ECDHE"))?;
        }
        for _ in 0..2 {
            let sig = key.sign(&rng, &message).map_err(crypto("signature"))?;
            public
                .verify(&message, sig.as_ref())
                .map_err(crypto("verification"))?;
        }
        each.push(started.elapsed());
    }
    each.sort();
    let median = each.get(each.len() / 2).copied().unwrap_or_default();
    Ok(median.as_secs_f64() * 1e6)
}

/// Makes the material in `dir` and measures handshakes for `seconds` on a
/// runtime of its own (one thread); the figures as JSON.
pub fn run_handshakes(dir: &Path, seconds: f64) -> Result<String, BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (client, server, bundles) = make_material(dir)?;
    let product = runtime.block_on(handshakes(
        &client,
        &server,
        &bundles,
        seconds,
        Mode::Product,
    ))?;
    let same_work = runtime.block_on(handshakes(
        &client,
        &server,
        &bundles,
        seconds,
        Mode::SameWork,
    ))?;
    let floor_us = crypto_floor(2000)?;
    Ok(format!(
        "{{\"per_second\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"count\": {}, \"same_work_per_second\": {}, \"same_work_p50_ms\": {}, \"floor_us\": {floor_us}}}",
        product.per_second,
        product.p50_ms,
        product.p99_ms,
        product.count,
        same_work.per_second,
        same_work.p50_ms
    ))
}
