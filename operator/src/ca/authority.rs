//! The trust-domain CA: ECDSA P-256 roots kept in a Secret, created on first
//! start, rotated with overlap, and the trust bundle published for agents.
//!
//! The Secret holds every root still valid, newest last, as JSON under
//! [`SECRET_KEY`]. Writers use the Secret's resourceVersion, so two operators
//! starting at once end up with one CA. A Secret that cannot be read is never
//! overwritten: losing the CA would break every workload's trust at once.
//!
//! The Secret also holds the bundle's sequence number ([`SEQUENCE_KEY`]),
//! increased with every change of the roots, including changes an
//! administrator makes by hand (see [`follow_secret`]): federated trust
//! domains use it to tell a new bundle from the one they hold.
//!
//! Rotation: when the newest root has less than a third of its lifetime left,
//! a new root is added and becomes the signer. An old root stays in the bundle
//! until it expires; SVIDs never outlive the root that signed them (see
//! [`TrustDomainCa::max_svid_not_after`]), so none is orphaned.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};
use tessera_api::bundle::SpiffeBundle;
use tessera_api::jwt::{JwkSet, SigningKey};
use tessera_api::spiffe::TrustDomain;
use time::OffsetDateTime;

/// Key in the CA Secret under which the roots are stored.
pub const SECRET_KEY: &str = "roots.json";
/// Key in the CA Secret holding the bundle's sequence number
/// (`spiffe_sequence` of the bundle endpoint), a decimal integer increased
/// with every change of the roots. A Secret without it counts as 1.
pub const SEQUENCE_KEY: &str = "sequence";
use crate::ca::CaError;
pub use tessera_api::names::BUNDLE_KEY;
use tessera_api::names::FIELD_MANAGER;
use tessera_api::names::TRUST_DOMAIN_KEY;

/// Where the CA lives and how long roots last.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain the CA signs for.
    pub trust_domain: TrustDomain,
    /// Namespace of the Secret and the bundle ConfigMap (the operator's).
    pub namespace: String,
    /// Name of the Secret holding the roots.
    pub secret_name: String,
    /// Name of the ConfigMap the bundle is published in.
    pub bundle_name: String,
    /// Lifetime of a new root.
    pub root_ttl: Duration,
}

impl CaConfig {
    /// Defaults: Secret `tessera-ca`, ConfigMap `tessera-trust-bundle`, roots for a year.
    pub fn new(trust_domain: TrustDomain, namespace: &str) -> CaConfig {
        CaConfig {
            trust_domain,
            namespace: namespace.to_owned(),
            secret_name: tessera_api::names::CA_SECRET.to_owned(),
            bundle_name: tessera_api::names::BUNDLE_CONFIGMAP.to_owned(),
            root_ttl: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

impl From<kube::Error> for CaError {
    fn from(e: kube::Error) -> Self {
        CaError::Api(Arc::new(e))
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// One root as stored in the Secret.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
struct StoredRoot {
    cert_pem: String,
    key_pem: String,
    /// The JWT-SVID signing key that lives and rotates with this root (PKCS#8
    /// PEM). Kept apart from the X.509 key so no key signs two kinds of thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jwt_key_pem: Option<String>,
}

/// A root certificate with its key and validity. Everything signing needs is
/// parsed once, when the root is loaded, not on every signature.
#[derive(Clone)]
pub struct Root {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    key_pem: String,
    issuer: Arc<Issuer<'static, KeyPair>>,
    jwt_key_pem: Option<String>,
    jwt: Option<Arc<SigningKey>>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Root")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Root {
    fn parse(stored: &StoredRoot) -> Result<Root, RootError> {
        let der = pem_der(&stored.cert_pem)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(RootError::at("root certificate"))?;
        if !cert.is_ca() {
            return Err(RootError::NotCa);
        }
        let validity = cert.validity();
        let (not_before, not_after) = (
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime(),
        );
        let key = KeyPair::from_pem(&stored.key_pem).map_err(RootError::at("root key"))?;
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key)
            .map_err(RootError::at("root as issuer"))?;
        let jwt = match &stored.jwt_key_pem {
            Some(pem) => {
                let der = KeyPair::from_pem(pem)
                    .map_err(RootError::at("JWT key"))?
                    .serialize_der();
                Some(Arc::new(
                    SigningKey::from_pkcs8(&der).map_err(RootError::at("JWT key"))?,
                ))
            }
            None => None,
        };
        Ok(Root {
            cert_pem: stored.cert_pem.clone(),
            cert_der: der,
            key_pem: stored.key_pem.clone(),
            issuer: Arc::new(issuer),
            jwt_key_pem: stored.jwt_key_pem.clone(),
            jwt,
            not_before,
            not_after,
        })
    }

    fn stored(&self) -> StoredRoot {
        StoredRoot {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            jwt_key_pem: self.jwt_key_pem.clone(),
        }
    }

    /// The JWT-SVID signing key of this root, if it has one (roots made
    /// before JWT support have none; rotation adds a root that has).
    pub fn jwt_key(&self) -> Option<&SigningKey> {
        self.jwt.as_deref()
    }

    /// The rcgen issuer that signs with this root.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn pem_der(text: &str) -> Result<Vec<u8>, RootError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(RootError::at("PEM"))?;
    Ok(pem.contents)
}

/// What is wrong with a stored root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    /// A part of it could not be read.
    #[error("{part}: {reason}")]
    Unreadable {
        /// The certificate, its key, or the JWT key.
        part: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// Its certificate is not a CA certificate.
    #[error("a stored root is not a CA certificate")]
    NotCa,
}

impl RootError {
    fn at<E: std::fmt::Display>(part: &'static str) -> impl Fn(E) -> RootError {
        move |e| RootError::Unreadable {
            part,
            reason: e.to_string(),
        }
    }
}

/// Makes a new self-signed root for `td`, valid from `now` for `ttl`.
pub fn new_root(td: &TrustDomain, now: OffsetDateTime, ttl: Duration) -> Result<Root, CaError> {
    let cert_err = |e: rcgen::Error| CaError::Certificate(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tessera");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Tessera root for {td}"));
    let uri = td.id().to_string().try_into().map_err(cert_err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    // A little slack for clocks that run behind.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + ttl;
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| CaError::Certificate("no randomness for a serial number".to_owned()))?;
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let jwt_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    // The same path as a root read back from the Secret, so both are alike.
    Root::parse(&StoredRoot {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        jwt_key_pem: Some(jwt_key.serialize_pem()),
    })
    .map_err(|e| CaError::Certificate(e.to_string()))
}

/// The trust domain's roots, newest last.
#[derive(Debug, Clone)]
pub struct TrustDomainCa {
    roots: Vec<Root>,
    sequence: u64,
    resource_version: Option<String>,
}

impl TrustDomainCa {
    /// Reads the CA Secret, creating it with one new root when absent.
    pub async fn load_or_create(
        client: &kube::Client,
        cfg: &CaConfig,
        now: OffsetDateTime,
    ) -> Result<TrustDomainCa, CaError> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
        for _ in 0..8 {
            if let Some(secret) = secrets.get_opt(&cfg.secret_name).await? {
                return Self::from_secret(cfg, &secret);
            }
            let root = new_root(&cfg.trust_domain, now, cfg.root_ttl)?;
            let secret = secret_for(cfg, &[root], 1, None)?;
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => return Self::from_secret(cfg, &created),
                // Another operator created it first: use theirs.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CaError::Contention)
    }

    /// Reads the roots from the roots Secret (the same checks as at start).
    pub fn from_secret(cfg: &CaConfig, secret: &Secret) -> Result<TrustDomainCa, CaError> {
        let unreadable = |reason: String| CaError::Unreadable {
            namespace: cfg.namespace.clone(),
            name: cfg.secret_name.clone(),
            reason,
        };
        let data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(SECRET_KEY))
            .ok_or_else(|| unreadable(format!("no {SECRET_KEY} key")))?;
        let stored: Vec<StoredRoot> = serde_json::from_slice(&data.0)
            .map_err(|e| unreadable(format!("{SECRET_KEY}: {e}")))?;
        if stored.is_empty() {
            return Err(unreadable("no roots".to_owned()));
        }
        let sequence = match secret.data.as_ref().and_then(|d| d.get(SEQUENCE_KEY)) {
            None => 1,
            Some(raw) => std::str::from_utf8(&raw.0)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    unreadable(format!("{SEQUENCE_KEY} is not a non-negative integer"))
                })?,
        };
        let roots = stored
            .iter()
            .map(Root::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(TrustDomainCa {
            roots,
            sequence,
            resource_version: secret.metadata.resource_version.clone(),
        })
    }

    /// Whether `secret` holds a newer state of the roots Secret than the one
    /// these roots came from.
    pub fn is_older_than(&self, secret: &Secret) -> bool {
        let theirs = secret.metadata.resource_version.as_deref();
        match (self.resource_version.as_deref(), theirs) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(ours), Some(theirs)) if ours == theirs => false,
            // resourceVersions are opaque to clients, but etcd-backed API
            // servers hand out increasing integers: an event older than
            // what is held (a watch catching up after this operator's own
            // write) must not bring old roots back.
            (Some(ours), Some(theirs)) => match (ours.parse::<u64>(), theirs.parse::<u64>()) {
                (Ok(ours), Ok(theirs)) => theirs > ours,
                _ => true,
            },
        }
    }

    /// A CA held only in memory (no Secret behind it), for benchmarks and tests.
    pub fn in_memory(roots: Vec<Root>) -> TrustDomainCa {
        TrustDomainCa {
            roots,
            sequence: 1,
            resource_version: None,
        }
    }

    /// The bundle's sequence number (see [`SEQUENCE_KEY`]).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Whether `other` holds the same roots, in the same order.
    pub fn same_roots(&self, other: &TrustDomainCa) -> bool {
        self.roots.len() == other.roots.len()
            && self
                .roots
                .iter()
                .zip(&other.roots)
                .all(|(a, b)| a.cert_der == b.cert_der && a.jwt_key_pem == b.jwt_key_pem)
    }

    /// The bundle in SPIFFE bundle format: every unexpired root (X.509
    /// authorities) and JWT key, oldest first, with the sequence number and
    /// `refresh_hint`.
    pub fn spiffe_bundle(&self, now: OffsetDateTime, refresh_hint: Duration) -> SpiffeBundle {
        SpiffeBundle {
            x509_authorities: self
                .roots
                .iter()
                .filter(|r| now < r.not_after)
                .map(|r| r.cert_der.clone())
                .collect(),
            jwt_authorities: self.jwt_bundle(now),
            sequence: Some(self.sequence),
            refresh_hint: Some(refresh_hint.as_secs().max(1)),
        }
    }

    /// The oldest root that is valid now and stays valid for `ttl`, else
    /// the active one. A certificate others check against a bundle they
    /// fetched earlier (the bundle endpoint's) is issued from it: a new
    /// root reaches them through the bundle long before the old one
    /// expires, so no relying party is ever shown a root it has not had
    /// the chance to fetch.
    pub fn longest_trusted(&self, now: OffsetDateTime, ttl: Duration) -> Result<&Root, CaError> {
        self.roots
            .iter()
            .find(|r| r.not_before <= now && now + ttl <= r.not_after)
            .map_or_else(|| self.active(now), Ok)
    }

    /// Issues a TLS server certificate from `root` (one of these roots): an
    /// X509-SVID for `id`, with `dns` names and `ips` too, valid for `ttl`
    /// at most (never past the root). Returns the certificate and the key,
    /// both PEM.
    pub fn issue_server_cert(
        &self,
        root: &Root,
        id: &tessera_api::spiffe::SpiffeId,
        dns: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(String, String), CaError> {
        let cert_err = |e: rcgen::Error| CaError::Certificate(e.to_string());
        let mut params = CertificateParams::new(dns.to_vec()).map_err(cert_err)?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let uri = id.to_string().try_into().map_err(cert_err)?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = (now + ttl).min(root.not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let cert = params.signed_by(&key, root.issuer()).map_err(cert_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Every root, newest last.
    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// The root that signs now: the newest one already valid.
    pub fn active(&self, now: OffsetDateTime) -> Result<&Root, CaError> {
        self.roots
            .iter()
            .rev()
            .find(|r| r.not_before <= now && now < r.not_after)
            .ok_or(CaError::Expired)
    }

    /// The root that signs JWT-SVIDs now: the newest valid one with a JWT key.
    pub fn active_jwt(&self, now: OffsetDateTime) -> Result<(&Root, &SigningKey), CaError> {
        self.roots
            .iter()
            .rev()
            .filter(|r| r.not_before <= now && now < r.not_after)
            .find_map(|r| r.jwt_key().map(|k| (r, k)))
            .ok_or(CaError::Expired)
    }

    /// The JWT bundle: the JWT keys of every unexpired root, oldest first.
    pub fn jwt_bundle(&self, now: OffsetDateTime) -> JwkSet {
        JwkSet {
            keys: self
                .roots
                .iter()
                .filter(|r| now < r.not_after)
                .filter_map(|r| r.jwt_key().map(|k| k.public().clone()))
                .collect(),
        }
    }

    /// The latest NotAfter an SVID signed now may have: the active root's.
    pub fn max_svid_not_after(&self, now: OffsetDateTime) -> Result<OffsetDateTime, CaError> {
        Ok(self.active(now)?.not_after)
    }

    /// The trust bundle: every unexpired root, PEM, oldest first.
    pub fn bundle_pem(&self, now: OffsetDateTime) -> String {
        self.roots
            .iter()
            .filter(|r| now < r.not_after)
            .map(|r| r.cert_pem.as_str())
            .collect()
    }

    /// Adds a new root when the newest has less than a third of its lifetime
    /// left, and drops expired ones. Returns whether the Secret changed.
    pub async fn rotate_if_due(
        &mut self,
        client: &kube::Client,
        cfg: &CaConfig,
        now: OffsetDateTime,
    ) -> Result<bool, CaError> {
        let newest = self.roots.last().ok_or(CaError::Expired)?;
        let lifetime = newest.not_after - newest.not_before;
        // A root without a JWT key (made before JWT support) is replaced too.
        let due = newest.not_after - now < lifetime / 3 || newest.jwt_key().is_none();
        let expired = self.roots.iter().any(|r| r.not_after <= now);
        if !due && !expired {
            return Ok(false);
        }
        let mut roots: Vec<Root> = self
            .roots
            .iter()
            .filter(|r| now < r.not_after)
            .cloned()
            .collect();
        if due {
            roots.push(new_root(&cfg.trust_domain, now, cfg.root_ttl)?);
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
        let secret = secret_for(
            cfg,
            &roots,
            self.sequence.saturating_add(1),
            self.resource_version.clone(),
        )?;
        match secrets
            .replace(&cfg.secret_name, &PostParams::default(), &secret)
            .await
        {
            Ok(updated) => {
                *self = Self::from_secret(cfg, &updated)?;
                Ok(true)
            }
            // Someone else rotated first: adopt their roots.
            Err(e) if is_status(&e, 409) => {
                *self = Self::load_or_create(client, cfg, now).await?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the bundle into the ConfigMap agents read (server-side apply).
    pub async fn publish_bundle(
        &self,
        client: &kube::Client,
        cfg: &CaConfig,
        now: OffsetDateTime,
    ) -> Result<(), CaError> {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &cfg.namespace);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(cfg.bundle_name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (BUNDLE_KEY.to_owned(), self.bundle_pem(now)),
                (TRUST_DOMAIN_KEY.to_owned(), cfg.trust_domain.to_string()),
            ])),
            ..ConfigMap::default()
        };
        let mut value =
            serde_json::to_value(&cm).map_err(|e| CaError::Certificate(e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("apiVersion".into(), "v1".into());
            obj.insert("kind".into(), "ConfigMap".into());
        }
        maps.patch(
            &cfg.bundle_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(value),
        )
        .await?;
        Ok(())
    }
}

fn secret_for(
    cfg: &CaConfig,
    roots: &[Root],
    sequence: u64,
    resource_version: Option<String>,
) -> Result<Secret, CaError> {
    let stored: Vec<StoredRoot> = roots.iter().map(Root::stored).collect();
    let json = serde_json::to_vec(&stored).map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(cfg.secret_name.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "tessera".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (SECRET_KEY.to_owned(), ByteString(json)),
            (
                SEQUENCE_KEY.to_owned(),
                ByteString(sequence.to_string().into_bytes()),
            ),
        ])),
        ..Secret::default()
    })
}

/// Follows the roots Secret for changes made under the operator: an
/// administrator removing a root (a compromised one, say) or adding one, or
/// another replica rotating. A newer Secret is reloaded into `ca`, the bundle
/// republished (agents follow it and revoke every authentication when a root
/// leaves) and `reloaded` called. A Secret that cannot be read, or whose
/// roots are none valid now, is reported and changes nothing: the roots in
/// memory stay in use. Runs until the task is dropped.
pub async fn follow_secret(
    client: kube::Client,
    cfg: CaConfig,
    ca: Arc<tokio::sync::RwLock<TrustDomainCa>>,
    reloaded: impl Fn(&TrustDomainCa) + Send + 'static,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let selector = watcher::Config::default().fields(&format!("metadata.name={}", cfg.secret_name));
    let mut events = std::pin::pin!(watcher(secrets, selector).default_backoff());
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(namespace = %cfg.namespace, name = %cfg.secret_name, "the roots Secret was deleted; the roots in memory stay in use, restore the Secret (rotation fails until then)");
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the roots Secret; retrying (may the operator list and watch Secrets in its namespace?)");
                continue;
            }
        };
        let now = OffsetDateTime::now_utc();
        let mut held = ca.write().await;
        if !held.is_older_than(&secret) {
            continue;
        }
        let next = match TrustDomainCa::from_secret(&cfg, &secret) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "the roots Secret changed but cannot be used; the roots in memory stay in use");
                continue;
            }
        };
        if let Err(e) = next.active(now) {
            tracing::warn!(error = %e, "the roots Secret changed to roots none of which is valid now; the roots in memory stay in use");
            continue;
        }
        let mut next = next;
        if !held.same_roots(&next) && next.sequence <= held.sequence {
            // Changed by hand without a new sequence number: give it one, so
            // federated trust domains notice. The write comes back as one
            // more (newer) event, which changes nothing further.
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
            let bumped = secret_for(
                &cfg,
                &next.roots,
                held.sequence.saturating_add(1),
                next.resource_version.clone(),
            );
            match bumped {
                Ok(bumped) => match secrets
                    .replace(&cfg.secret_name, &PostParams::default(), &bumped)
                    .await
                {
                    Ok(written) => match TrustDomainCa::from_secret(&cfg, &written) {
                        Ok(written) => next = written,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read back the roots Secret after numbering it")
                        }
                    },
                    // Changed again meanwhile: the newer event follows.
                    Err(e) if is_status(&e, 409) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot give the changed roots a new bundle sequence number; federated trust domains may not notice the change until the next rotation")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot give the changed roots a new bundle sequence number")
                }
            }
        }
        let before = held.roots.len();
        *held = next;
        tracing::info!(
            before,
            after = held.roots.len(),
            "the roots Secret changed; roots reloaded, bundle republished"
        );
        if let Err(e) = held.publish_bundle(&client, &cfg, now).await {
            tracing::warn!(error = %e, "cannot publish the reloaded bundle; it goes out with the next change or rotation");
        }
        reloaded(&held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_secrets_replace_the_roots_held() {
        let td: TrustDomain = "cluster.test".parse().unwrap();
        let cfg = CaConfig::new(td.clone(), "ns");
        let root = new_root(&td, OffsetDateTime::now_utc(), Duration::from_secs(3600)).unwrap();
        let secret = |rv: Option<&str>| {
            secret_for(&cfg, std::slice::from_ref(&root), 1, rv.map(Into::into)).unwrap()
        };
        let held = TrustDomainCa::from_secret(&cfg, &secret(Some("100"))).unwrap();
        assert!(
            !held.is_older_than(&secret(Some("100"))),
            "the same version"
        );
        assert!(
            !held.is_older_than(&secret(Some("99"))),
            "an event older than what is held"
        );
        assert!(held.is_older_than(&secret(Some("101"))));
        assert!(
            held.is_older_than(&secret(Some("opaque"))),
            "not a number: reload"
        );
        assert!(!held.is_older_than(&secret(None)));
        assert!(TrustDomainCa::in_memory(vec![root.clone()]).is_older_than(&secret(Some("1"))));
    }

    #[test]
    fn new_root_is_a_p256_ca_for_the_trust_domain() {
        let td: TrustDomain = "cluster.test".parse().unwrap();
        let now = OffsetDateTime::now_utc();
        let root = new_root(&td, now, Duration::from_secs(3600)).unwrap();
        let der = pem_der(&root.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://cluster.test"]);
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok()),
            Some(x509_parser::oid_registry::OID_EC_P256)
        );
        assert!(
            format!("{root:?}").find("PRIVATE").is_none(),
            "Debug must not print the key"
        );
        let parsed = Root::parse(&root.stored()).unwrap();
        assert_eq!(
            parsed.not_after.unix_timestamp(),
            root.not_after.unix_timestamp()
        );
        let _ = root.issuer();
        // Its JWT key is apart from the X.509 key, and survives the Secret.
        let jwt = parsed.jwt_key().unwrap().public().clone();
        assert_eq!(jwt, root.jwt_key().unwrap().public().clone());
        let x509_point = cert.public_key().subject_public_key.data.to_vec();
        assert_ne!(jwt.point, x509_point);
    }
}
