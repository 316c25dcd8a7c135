//! The own trust domain's CA certificates as the operator publishes them
//! (ConfigMap `tessera-trust-bundle`), followed live: a CA joining or leaving
//! the bundle reaches the handshakes within a watch event, not at the next
//! SVID issuance, and a CA that leaves revokes every authentication it may
//! have signed (see the enforcer). The published bundle is the only source
//! of the own CAs (read at start, then watched); the copy the signer sends
//! with each SVID is not used for them.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{info, warn};

use crate::identities::IdentityStore;

/// The ConfigMap the operator publishes the bundle in (in its namespace).
pub const BUNDLE_CONFIGMAP: &str = "tessera-trust-bundle";
/// The key of that ConfigMap holding the CA certificates, PEM.
pub const BUNDLE_KEY: &str = "bundle.pem";
/// The key of that ConfigMap naming the trust domain (`cluster.test`).
pub const TRUST_DOMAIN_KEY: &str = "trustDomain";

/// Why a published bundle is not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    /// The key is missing.
    #[error(
        "ConfigMap {BUNDLE_CONFIGMAP} has no {BUNDLE_KEY}; the operator publishes it, check its log"
    )]
    Missing,
    /// The PEM text does not parse.
    #[error("{BUNDLE_KEY} of ConfigMap {BUNDLE_CONFIGMAP} is not PEM certificates: {0}")]
    Pem(String),
    /// Not one certificate.
    #[error(
        "{BUNDLE_KEY} of ConfigMap {BUNDLE_CONFIGMAP} holds no certificate (an operator never publishes that)"
    )]
    Empty,
    /// The trust domain named is not one.
    #[error("{TRUST_DOMAIN_KEY} of ConfigMap {BUNDLE_CONFIGMAP} is not a trust domain: {0}")]
    TrustDomain(String),
    /// A certificate cannot be a trust anchor.
    #[error(
        "certificate {index} of {BUNDLE_KEY} in ConfigMap {BUNDLE_CONFIGMAP} is unusable as a CA: {reason}"
    )]
    Anchor {
        /// Its position, from 0.
        index: usize,
        /// What webpki said.
        reason: String,
    },
}

/// The CA certificates of a PEM bundle, DER, concatenated (the form of
/// [`crate::identities::Bundles::own_der`]); every one must be usable as a
/// trust anchor.
pub fn parse_pem_bundle(pem: &str) -> Result<Vec<u8>, TrustError> {
    let mut der = Vec::new();
    let mut count = 0;
    for (index, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let cert = cert.map_err(|e| TrustError::Pem(e.to_string()))?;
        webpki::anchor_from_trusted_cert(&cert).map_err(|e| TrustError::Anchor {
            index,
            reason: e.to_string(),
        })?;
        der.extend_from_slice(&cert);
        count += 1;
    }
    if count == 0 {
        return Err(TrustError::Empty);
    }
    Ok(der)
}

/// The CA certificates a published ConfigMap holds (see [`parse_pem_bundle`]).
pub fn own_der_of(cm: &ConfigMap) -> Result<Vec<u8>, TrustError> {
    let pem = cm
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .ok_or(TrustError::Missing)?;
    parse_pem_bundle(pem)
}

/// The trust domain ID (`spiffe://td`) a published ConfigMap names, if it
/// names one.
pub fn trust_domain_id_of(cm: &ConfigMap) -> Result<Option<String>, TrustError> {
    let Some(td) = cm.data.as_ref().and_then(|d| d.get(TRUST_DOMAIN_KEY)) else {
        return Ok(None);
    };
    td.parse::<tessera_api::spiffe::TrustDomain>()
        .map(|td| Some(td.id().to_string()))
        .map_err(|e| TrustError::TrustDomain(format!("{td:?}: {e}")))
}

/// Sets the store's own CAs (and trust domain) from a published ConfigMap;
/// a malformed one is logged and changes nothing (the previous bundle stays
/// in use).
pub fn apply(store: &IdentityStore, cm: &ConfigMap) {
    match own_der_of(cm).and_then(|der| Ok((der, trust_domain_id_of(cm)?))) {
        Ok((der, td)) => {
            if store.bundles().own_der != der {
                info!("own trust bundle updated from ConfigMap {BUNDLE_CONFIGMAP}");
            }
            store.update_bundles(|b| {
                b.own_der = der;
                if let Some(td) = td {
                    b.trust_domain_id = td;
                }
            });
        }
        Err(e) => {
            warn!(error = %e, "ignoring the published trust bundle; the previous one stays in use")
        }
    }
}

/// Follows ConfigMap [`BUNDLE_CONFIGMAP`] in `namespace` for as long as the
/// future runs. A deleted ConfigMap changes nothing (the last bundle stays
/// in use until the operator publishes it again).
pub async fn follow(client: kube::Client, namespace: String, store: IdentityStore) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={BUNDLE_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => apply(&store, &cm),
            Ok(watcher::Event::Delete(_)) => warn!(
                "ConfigMap {namespace}/{BUNDLE_CONFIGMAP} was deleted; the last trust bundle stays in use until the operator publishes it again"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot watch ConfigMap {namespace}/{BUNDLE_CONFIGMAP}; retrying (may the agent list and watch it?)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    }

    #[test]
    fn bundles_parse_to_concatenated_der() {
        let (a, b) = (ca_pem(), ca_pem());
        let one = parse_pem_bundle(&a).unwrap();
        let two = parse_pem_bundle(&format!("{a}{b}")).unwrap();
        assert!(two.len() > one.len() && two.starts_with(&one));
    }

    #[test]
    fn bad_bundles_are_refused_with_a_reason() {
        assert_eq!(parse_pem_bundle(""), Err(TrustError::Empty));
        assert_eq!(parse_pem_bundle("not pem at all"), Err(TrustError::Empty));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_pem_bundle(&format!("{}{garbage}", ca_pem())),
            Err(TrustError::Anchor { index: 1, .. })
        ));
        let cut = "-----BEGIN CERTIFICATE-----\nMIIB";
        assert!(matches!(parse_pem_bundle(cut), Err(TrustError::Pem(_))));
        assert_eq!(own_der_of(&ConfigMap::default()), Err(TrustError::Missing));
    }

    #[test]
    fn a_bad_bundle_leaves_the_previous_one_in_use() {
        let store = IdentityStore::default();
        let good = ca_pem();
        let cm = |pem: &str| ConfigMap {
            data: Some([(BUNDLE_KEY.to_owned(), pem.to_owned())].into()),
            ..ConfigMap::default()
        };
        apply(&store, &cm(&good));
        let der = parse_pem_bundle(&good).unwrap();
        assert_eq!(store.bundles().own_der, der);
        let mut named = cm(&good);
        if let Some(d) = named.data.as_mut() {
            d.insert(TRUST_DOMAIN_KEY.to_owned(), "cluster.test".to_owned());
        }
        apply(&store, &named);
        assert_eq!(store.bundles().trust_domain_id, "spiffe://cluster.test");
        if let Some(d) = named.data.as_mut() {
            d.insert(TRUST_DOMAIN_KEY.to_owned(), "Not A Domain".to_owned());
        }
        assert!(matches!(
            trust_domain_id_of(&named),
            Err(TrustError::TrustDomain(_))
        ));
        apply(&store, &named);
        assert_eq!(store.bundles().trust_domain_id, "spiffe://cluster.test");
        apply(&store, &cm("garbage"));
        apply(&store, &ConfigMap::default());
        assert_eq!(store.bundles().own_der, der);
    }
}
