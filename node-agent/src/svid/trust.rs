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

use std::collections::BTreeMap;

use tessera_api::bundle::{FEDERATED_CONFIGMAP, SpiffeBundle};
use tessera_api::jwt::JwkSet;
use tessera_api::spiffe::TrustDomain;

use crate::svid::store::IdentityStore;

pub use tessera_api::names::{BUNDLE_CONFIGMAP, BUNDLE_KEY, TRUST_DOMAIN_KEY};

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
    #[error("the bundle holds no CA certificate (an operator or SPIRE never publishes that)")]
    Empty,
    /// The trust domain named is not one.
    #[error("{TRUST_DOMAIN_KEY} of ConfigMap {BUNDLE_CONFIGMAP} is not a trust domain: {0}")]
    TrustDomain(String),
    /// A federated bundle document is not a SPIFFE bundle.
    #[error(transparent)]
    Federated(#[from] tessera_api::bundle::BundleError),
    /// A federated bundle holds no authority at all.
    #[error("no X.509 or JWT authorities")]
    NoAuthorities,
    /// A certificate cannot be a trust anchor.
    #[error("certificate {index} of the bundle is unusable as a CA: {reason}")]
    Anchor {
        /// Its position, from 0.
        index: usize,
        /// What webpki said.
        reason: String,
    },
}

/// The CA certificates of a PEM bundle, DER, concatenated (the form of
/// [`crate::svid::store::Bundles::own_der`]); every one must be usable as a
/// trust anchor.
pub fn parse_pem_bundle(pem: &str) -> Result<Vec<u8>, TrustError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Pem(e.to_string()))?;
    anchors_der(certs.iter().map(|c| c.as_ref()))
}

/// CA certificates (DER), each checked to be usable as a trust anchor,
/// concatenated (the form of [`crate::svid::store::Bundles`]); at least one.
/// Every source of CAs (the published bundle, federated bundles, the SPIRE
/// agent's bundle) goes through this check.
pub fn anchors_der<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, TrustError> {
    let mut der = Vec::new();
    for (index, cert) in certs.into_iter().enumerate() {
        webpki::anchor_from_trusted_cert(&CertificateDer::from(cert)).map_err(|e| {
            TrustError::Anchor {
                index,
                reason: e.to_string(),
            }
        })?;
        der.extend_from_slice(cert);
    }
    if der.is_empty() {
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

/// The federated trust domains' authorities, by trust domain ID
/// (`spiffe://b.test`), each trust domain's kept apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Federated {
    /// X.509 CA certificates, DER and concatenated (the form of
    /// [`crate::svid::store::Bundles::federated_der`]); a trust domain whose
    /// bundle holds none is absent.
    pub der: BTreeMap<String, Vec<u8>>,
    /// JWT authorities; a trust domain whose bundle holds none is absent.
    pub jwt: BTreeMap<String, JwkSet>,
}

impl Federated {
    /// The trust domain IDs with any authority.
    pub fn trust_domains(&self) -> std::collections::BTreeSet<&str> {
        self.der
            .keys()
            .chain(self.jwt.keys())
            .map(String::as_str)
            .collect()
    }

    fn keep(&mut self, id: &str, previous: &Federated) {
        if let Some(der) = previous.der.get(id) {
            self.der.insert(id.to_owned(), der.clone());
        }
        if let Some(jwt) = previous.jwt.get(id) {
            self.jwt.insert(id.to_owned(), jwt.clone());
        }
    }
}

/// The federated trust domains' authorities from the published ConfigMap
/// ([`FEDERATED_CONFIGMAP`]).
///
/// `previous` is what is in use now: an entry that cannot be used (a key
/// that is not a trust domain name, the own trust domain, a malformed
/// bundle, a CA webpki refuses, a bundle without any authority) is logged
/// and keeps its previous value, if it had one. A trust domain whose key is
/// gone is gone (the operator withdraws a bundle when its
/// FederatedTrustDomain is deleted).
pub fn federated_of(cm: Option<&ConfigMap>, own_td_id: &str, previous: &Federated) -> Federated {
    let mut out = Federated::default();
    let Some(data) = cm.and_then(|cm| cm.data.as_ref()) else {
        return out;
    };
    for (key, document) in data {
        let td = match key.parse::<TrustDomain>() {
            Ok(td) => td,
            Err(e) => {
                warn!(key = %key, error = %e, "ConfigMap {FEDERATED_CONFIGMAP}: key is not a trust domain name; ignored");
                continue;
            }
        };
        let id = td.id().to_string();
        if id == own_td_id {
            warn!(trust_domain = %td, "ConfigMap {FEDERATED_CONFIGMAP} names this cluster's own trust domain; ignored (its CAs come from {BUNDLE_CONFIGMAP} only)");
            continue;
        }
        match federated_authorities(document) {
            Ok((der, jwt)) => {
                if let Some(der) = der {
                    out.der.insert(id.clone(), der);
                }
                if let Some(jwt) = jwt {
                    out.jwt.insert(id, jwt);
                }
            }
            Err(e) => {
                let kept = previous.der.contains_key(&id) || previous.jwt.contains_key(&id);
                warn!(trust_domain = %td, error = %e, kept, "federated bundle unusable; the previous one (if any) stays in use");
                out.keep(&id, previous);
            }
        }
    }
    out
}

/// One federated bundle document's authorities: its X.509 CAs, checked and
/// DER concatenated, and its JWT keys; each None when the bundle has none,
/// an error when it has neither.
fn federated_authorities(document: &str) -> Result<(Option<Vec<u8>>, Option<JwkSet>), TrustError> {
    let bundle = SpiffeBundle::from_json(document.as_bytes())?.bundle;
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.keys.is_empty() {
        return Err(TrustError::NoAuthorities);
    }
    let der = if bundle.x509_authorities.is_empty() {
        None
    } else {
        Some(anchors_der(
            bundle.x509_authorities.iter().map(Vec::as_slice),
        )?)
    };
    let jwt = (!bundle.jwt_authorities.keys.is_empty()).then_some(bundle.jwt_authorities);
    Ok((der, jwt))
}

/// Sets the store's federated bundles from the published ConfigMap (see
/// [`federated_of`]); `None` when it does not exist.
pub fn apply_federated(store: &IdentityStore, cm: Option<&ConfigMap>) {
    let current = store.bundles();
    let previous = Federated {
        der: current.federated_der.clone(),
        jwt: current.federated_jwt.clone(),
    };
    let next = federated_of(cm, &current.trust_domain_id, &previous);
    if next != previous {
        info!(
            trust_domains = ?next.trust_domains(),
            "federated bundles updated from ConfigMap {FEDERATED_CONFIGMAP}"
        );
    }
    store.update_bundles(|b| {
        b.federated_der = next.der;
        b.federated_jwt = next.jwt;
    });
}

/// Follows ConfigMap [`FEDERATED_CONFIGMAP`] in `namespace` for as long as
/// the future runs. Deleting the ConfigMap withdraws every federated
/// bundle, as deleting each FederatedTrustDomain would.
pub async fn follow_federated(client: kube::Client, namespace: String, store: IdentityStore) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={FEDERATED_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
    let mut seen = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                seen = true;
                apply_federated(&store, Some(&cm));
            }
            Ok(watcher::Event::Delete(_)) => {
                warn!(
                    "ConfigMap {namespace}/{FEDERATED_CONFIGMAP} was deleted; every federated bundle is withdrawn"
                );
                seen = false;
                apply_federated(&store, None);
            }
            // A relist that finds no ConfigMap: nothing is federated.
            Ok(watcher::Event::InitDone) if !seen => apply_federated(&store, None),
            Ok(watcher::Event::Init) => seen = false,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot watch ConfigMap {namespace}/{FEDERATED_CONFIGMAP}; retrying (may the agent list and watch it?)")
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

    fn spiffe_doc(pems: &[&str]) -> String {
        let bundle = SpiffeBundle {
            x509_authorities: pems.iter().map(|p| parse_pem_bundle(p).unwrap()).collect(),
            sequence: Some(3),
            ..SpiffeBundle::default()
        };
        String::from_utf8(bundle.to_json().unwrap()).unwrap()
    }

    fn jwt_doc() -> String {
        let key = tessera_api::jwt::SigningKey::from_pkcs8(
            rcgen::KeyPair::generate().unwrap().serialized_der(),
        )
        .unwrap();
        let bundle = SpiffeBundle {
            jwt_authorities: JwkSet {
                keys: vec![key.public().clone()],
            },
            ..SpiffeBundle::default()
        };
        String::from_utf8(bundle.to_json().unwrap()).unwrap()
    }

    #[test]
    fn federated_bundles_are_kept_apart_and_bad_ones_keep_the_previous() {
        let (b1, b2, c) = (ca_pem(), ca_pem(), ca_pem());
        let cm = |entries: &[(&str, String)]| ConfigMap {
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        let own = "spiffe://cluster.test";
        let first = federated_of(
            Some(&cm(&[
                ("b.test", spiffe_doc(&[&b1, &b2])),
                ("c.test", spiffe_doc(&[&c])),
                ("cluster.test", spiffe_doc(&[&c])),
                ("Not A Domain", spiffe_doc(&[&c])),
                ("j.test", jwt_doc()),
            ])),
            own,
            &Federated::default(),
        );
        assert_eq!(
            first.der.keys().collect::<Vec<_>>(),
            ["spiffe://b.test", "spiffe://c.test"],
            "the own trust domain and bad keys are ignored"
        );
        assert_eq!(
            first.der["spiffe://b.test"],
            [
                parse_pem_bundle(&b1).unwrap(),
                parse_pem_bundle(&b2).unwrap()
            ]
            .concat()
        );
        assert_eq!(first.der["spiffe://c.test"], parse_pem_bundle(&c).unwrap());
        assert_eq!(
            first.jwt.keys().collect::<Vec<_>>(),
            ["spiffe://j.test"],
            "a JWT-only bundle gives JWT authorities and no X.509 ones"
        );
        assert_eq!(first.jwt["spiffe://j.test"].keys.len(), 1);
        // b.test and j.test turn malformed: their previous authorities stay;
        // c.test is withdrawn.
        let second = federated_of(
            Some(&cm(&[
                ("b.test", "{\"keys\": 1}".to_owned()),
                ("j.test", "[]".to_owned()),
            ])),
            own,
            &first,
        );
        assert_eq!(second.der.keys().collect::<Vec<_>>(), ["spiffe://b.test"]);
        assert_eq!(second.der["spiffe://b.test"], first.der["spiffe://b.test"]);
        assert_eq!(second.jwt, first.jwt);
        // A bundle with no authority at all is refused too; with nothing
        // before, the trust domain has no bundle.
        let empty = String::from_utf8(SpiffeBundle::default().to_json().unwrap()).unwrap();
        assert_eq!(
            federated_of(Some(&cm(&[("d.test", empty)])), own, &first),
            Federated::default()
        );
        assert_eq!(federated_of(None, own, &first), Federated::default());

        let store = IdentityStore::default();
        store.update_bundles(|b| b.trust_domain_id = own.to_owned());
        apply_federated(&store, Some(&cm(&[("b.test", spiffe_doc(&[&b1]))])));
        assert_eq!(
            store.bundles().federated_der["spiffe://b.test"],
            parse_pem_bundle(&b1).unwrap()
        );
        assert!(store.bundles().federated_jwt.is_empty());
        apply_federated(&store, Some(&cm(&[("j.test", jwt_doc())])));
        assert!(store.bundles().federated_der.is_empty());
        assert_eq!(store.bundles().federated_jwt.len(), 1);
        apply_federated(&store, None);
        assert!(store.bundles().federated_der.is_empty());
        assert!(store.bundles().federated_jwt.is_empty());
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
