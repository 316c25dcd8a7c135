//! The identity material this node's pods may fetch: per pod UID, the X.509
//! SVIDs with their keys, and the trust bundles. Every change replaces the
//! whole value, so Workload API streams always send a full, consistent state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tessera_api::jwt::JwkSet;
use tokio::sync::watch;

use crate::svid::records::PodUid;

/// One X.509-SVID with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Svid {
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain_der: Vec<u8>,
    /// DER PKCS#8 private key.
    pub key_der: Vec<u8>,
    /// Operator hint (WorkloadIdentity `hint`), or empty.
    pub hint: String,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

/// Trust bundles: the own trust domain's and federated ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundles {
    /// Trust domain ID (`spiffe://td`) of this cluster.
    pub trust_domain_id: String,
    /// DER CA certificates of the own trust domain, concatenated.
    pub own_der: Vec<u8>,
    /// JWT authorities of the own trust domain.
    pub own_jwt: JwkSet,
    /// DER CA certificates of federated trust domains, by trust domain ID.
    pub federated_der: BTreeMap<String, Vec<u8>>,
    /// JWT authorities of federated trust domains, by trust domain ID.
    pub federated_jwt: BTreeMap<String, JwkSet>,
}

/// What one pod may fetch: its X.509-SVIDs and the trust domains it federates with (not its PodIdentity record, which says who it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSvids {
    /// The pod's namespace (for signing requests).
    pub namespace: String,
    /// The pod's name (for signing requests).
    pub name: String,
    /// Its SVIDs (usually one).
    pub svids: Vec<X509Svid>,
    /// Trust domain IDs whose federated bundles it receives.
    pub federates_with: Vec<String>,
}

/// One pod's current identity; None once removed.
type PodSlot = watch::Sender<Option<Arc<PodSvids>>>;

/// Shared, cheaply cloned store; one per agent.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    pods: Arc<Mutex<HashMap<PodUid, PodSlot>>>,
    bundles: watch::Sender<Arc<Bundles>>,
    /// Bumped on every pod change: handshake credentials follow it.
    changes: watch::Sender<u64>,
}

impl Default for IdentityStore {
    fn default() -> Self {
        IdentityStore {
            pods: Arc::default(),
            bundles: watch::channel(Arc::new(Bundles::default())).0,
            changes: watch::channel(0).0,
        }
    }
}

impl IdentityStore {
    fn sender(&self, uid: &PodUid) -> PodSlot {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.entry(uid.clone())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Sets (or replaces) a pod's identity; open streams see it at once.
    pub fn set(&self, uid: &PodUid, identity: PodSvids) {
        self.sender(uid).send_replace(Some(Arc::new(identity)));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Removes a pod's identity; open streams end with PermissionDenied.
    pub fn remove(&self, uid: &PodUid) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = pods.remove(uid) {
            tx.send_replace(None);
        }
        drop(pods);
        self.changes.send_modify(|n| *n += 1);
    }

    /// How many of this node's pods hold an identity (SVIDs issued).
    pub fn pods_with_identity(&self) -> usize {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values().filter(|tx| tx.borrow().is_some()).count()
    }

    /// Every SVID held for this node's pods.
    pub fn all_svids(&self) -> Vec<X509Svid> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values()
            .filter_map(|tx| tx.borrow().clone())
            .flat_map(|p| p.svids.clone())
            .collect()
    }

    /// Changes whenever any pod's identity is set or removed.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Follows a pod's identity, if it has one; a None value later means it
    /// was removed.
    pub fn watch_pod(&self, uid: &PodUid) -> Option<watch::Receiver<Option<Arc<PodSvids>>>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.get(uid).map(watch::Sender::subscribe)
    }

    /// The pod's identity now, if it has one.
    pub fn current(&self, uid: &PodUid) -> Option<Arc<PodSvids>> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.get(uid).and_then(|tx| tx.borrow().clone())
    }

    /// The bundles now.
    pub fn bundles(&self) -> Arc<Bundles> {
        self.bundles.borrow().clone()
    }

    /// Replaces the bundles.
    pub fn set_bundles(&self, bundles: Bundles) {
        self.update_bundles(|b| *b = bundles);
    }

    /// Changes the bundles with `edit`; open streams hear of it only when
    /// something actually changed.
    pub fn update_bundles(&self, edit: impl FnOnce(&mut Bundles)) {
        self.bundles.send_if_modified(|current| {
            let mut next = Bundles::clone(current);
            edit(&mut next);
            if next == **current {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }

    /// Follows the bundles.
    pub fn watch_bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.bundles.subscribe()
    }
}

/// Splits concatenated DER certificates.
pub fn split_der(
    mut der: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, BadCertificate> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) =
            x509_parser::parse_x509_certificate(der).map_err(|e| BadCertificate(e.to_string()))?;
        let used = der.len() - rest.len();
        out.push(rustls::pki_types::CertificateDer::from(
            der[..used].to_vec(),
        ));
        der = rest;
    }
    Ok(out)
}

/// Bytes that should hold DER certificates and do not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad DER certificate: {0}")]
pub struct BadCertificate(String);
