//! Reading and verifying X509-SVIDs: the SPIFFE ID and validity of a leaf
//! certificate, as the SPIFFE X509-SVID specification defines them (exactly
//! one URI SAN, a SPIFFE ID), and its chain to the trust anchors the caller
//! chooses from the SPIFFE ID (one trust domain's bundle, never a merge of
//! several).

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::spiffe::SpiffeId;

/// Why a certificate is not a usable X509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// Not DER X.509, or a malformed extension.
    #[error("bad certificate: {0}")]
    Certificate(String),
    /// No subjectAltName, or not exactly one URI in it.
    #[error("not an X509-SVID: {0}")]
    NotSvid(String),
    /// The chain does not lead to the anchors of the SVID's trust domain.
    #[error("the X509-SVID of {id} does not chain to {trust_domain}'s bundle: {reason}")]
    Untrusted {
        /// The SPIFFE ID in the certificate.
        id: SpiffeId,
        /// Its trust domain.
        trust_domain: String,
        /// What webpki said.
        reason: String,
    },
    /// No anchors are held for the SVID's trust domain.
    #[error(
        "no trust bundle for spiffe://{trust_domain} (the trust domain of {id}); is it federated?"
    )]
    NoBundle {
        /// The SPIFFE ID in the certificate.
        id: SpiffeId,
        /// Its trust domain.
        trust_domain: String,
    },
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    BadId {
        /// The URI as found.
        uri: String,
        /// Why it was refused.
        reason: String,
    },
}

/// What a leaf certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// Reads a leaf certificate (DER): exactly one URI SAN, which must parse as
/// a SPIFFE ID. Untrusted input: never panics.
pub fn leaf(der: &[u8]) -> Result<Leaf, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SvidError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Certificate(format!("subjectAltName: {e}")))?
        .ok_or_else(|| SvidError::NotSvid("no subjectAltName".to_owned()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(SvidError::NotSvid(format!(
            "an X509-SVID has exactly one URI SAN, this one has {}",
            uris.len()
        )));
    };
    let id = uri.parse::<SpiffeId>().map_err(|e| SvidError::BadId {
        uri: (*uri).to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Leaf {
        id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Verifies an X509-SVID: reads `end_entity` (see [`leaf`]), asks
/// `anchors_for` for the trust anchors of its trust domain (None: none are
/// held), and checks the
/// chain through `intermediates` to them for `usage` at `now` with
/// `algorithms`. The leaf on success.
pub fn verify<'a>(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors_for: impl FnOnce(&Leaf) -> Option<&'a [TrustAnchor<'a>]>,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<Leaf, SvidError> {
    let read = leaf(end_entity)?;
    let untrusted = |reason: String| SvidError::Untrusted {
        id: read.id.clone(),
        trust_domain: read.id.trust_domain().to_string(),
        reason,
    };
    let anchors = anchors_for(&read).ok_or_else(|| SvidError::NoBundle {
        id: read.id.clone(),
        trust_domain: read.id.trust_domain().to_string(),
    })?;
    let cert =
        EndEntityCert::try_from(end_entity).map_err(|e| SvidError::Certificate(e.to_string()))?;
    cert.verify_for_usage(algorithms, anchors, intermediates, now, usage, None, None)
        .map_err(|e| untrusted(e.to_string()))?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(u: &str) -> rcgen::SanType {
        rcgen::SanType::URI(u.try_into().unwrap())
    }

    #[test]
    fn reads_the_one_spiffe_id() {
        let der = cert(vec![
            uri("spiffe://b.test/ns/db"),
            rcgen::SanType::DnsName("db".try_into().unwrap()),
        ]);
        let leaf = leaf(&der).unwrap();
        assert_eq!(leaf.id.as_str(), "spiffe://b.test/ns/db");
        assert!(leaf.not_before < leaf.not_after);
    }

    #[test]
    fn refuses_what_is_not_an_svid() {
        assert!(matches!(leaf(b"junk"), Err(SvidError::Certificate(_))));
        let none = cert(vec![rcgen::SanType::DnsName("db".try_into().unwrap())]);
        assert!(matches!(leaf(&none), Err(SvidError::NotSvid(_))));
        let two = cert(vec![uri("spiffe://b.test/a"), uri("spiffe://b.test/b")]);
        assert!(matches!(leaf(&two), Err(SvidError::NotSvid(_))));
        let https = cert(vec![uri("https://b.test/a")]);
        assert!(matches!(leaf(&https), Err(SvidError::BadId { .. })));
    }
}
