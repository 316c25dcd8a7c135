//! Federation against a real API server and real HTTPS: Tessera's bundle
//! endpoint (both profiles) fetched with the operator's bundle client, and
//! the FederatedTrustDomain controller following another trust domain's
//! endpoint through rotation, an outage and deletion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use rustls::pki_types::CertificateDer;
use tessera_api::bundle::SpiffeBundle;
use tessera_api::crd::federated_trust_domain::{
    BundleEndpointProfile, BundleEndpointProfileType, FederatedTrustDomain,
    FederatedTrustDomainSpec,
};
use tessera_api::spiffe::TrustDomain;
use tessera_operator::ca::authority::{CaConfig, TrustDomainCa};
use tessera_operator::federation::controller::{self, FederationConfig, STORE_NAME};
use tessera_operator::federation::endpoint::{self, Source};
use tessera_operator::federation::fetch::{self, FetchError, Profile};
use tessera_operator::metrics::Metrics;
use tessera_tests::{ControlPlane, eventually};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};

const HINT: Duration = Duration::from_secs(2);

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// A trust domain's CA kept in a Secret in `ns`, with roots for 30 days.
async fn trust_domain(
    client: &kube::Client,
    td: &str,
    ns: &str,
) -> Result<(CaConfig, Arc<RwLock<TrustDomainCa>>)> {
    namespace(client, ns).await?;
    let mut cfg = CaConfig::new(td.parse()?, ns);
    cfg.root_ttl = Duration::from_secs(30 * 24 * 3600);
    let ca = TrustDomainCa::load_or_create(client, &cfg, OffsetDateTime::now_utc()).await?;
    Ok((cfg, Arc::new(RwLock::new(ca))))
}

/// A running https_spiffe endpoint: its address and the task serving it.
struct Endpoint {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn spiffe_endpoint(
    addr: SocketAddr,
    td: &TrustDomain,
    ca: &Arc<RwLock<TrustDomainCa>>,
    rotated: &Arc<Notify>,
) -> Result<Endpoint> {
    let listener = endpoint::bind(addr).await?;
    let addr = listener.local_addr()?;
    let source = Source {
        ca: ca.clone(),
        refresh_hint: HINT,
        metrics: Arc::new(Metrics::default()),
    };
    let (td, rotated) = (td.clone(), rotated.clone());
    let task = tokio::spawn(async move {
        endpoint::run_spiffe(listener, td, source, rotated)
            .await
            .unwrap();
    });
    Ok(Endpoint { addr, task })
}

/// A private Web PKI: a CA and a server certificate for 127.0.0.1, as PEM
/// files in `dir`. Returns the CA certificate (PEM) and the file paths.
fn web_pki(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (dir.join("web.crt"), dir.join("web.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_cert.pem(), cert_path, key_path)
}

fn der_roots(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[tokio::test]
async fn the_bundle_endpoint_serves_both_profiles_through_a_rotation() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    let (cfg, ca) = trust_domain(&client, "cluster.test", "tessera-system").await?;
    let td = cfg.trust_domain.clone();
    let rotated = Arc::new(Notify::new());
    let endpoint = spiffe_endpoint("127.0.0.1:0".parse()?, &td, &ca, &rotated).await?;
    let url = format!("https://{}/", endpoint.addr);
    let id = endpoint::endpoint_id(&td)?;
    let first = ca
        .read()
        .await
        .spiffe_bundle(OffsetDateTime::now_utc(), HINT);

    // https_spiffe: the endpoint's SVID checked against the bundle held.
    let got = fetch::fetch(
        &url,
        Profile::Spiffe {
            id: &id,
            bundle: &first,
        },
    )
    .await?;
    assert_eq!(got.bundle, first, "the whole bundle, as the CA has it");
    assert!(got.ignored.is_empty());
    assert_eq!(got.bundle.sequence, Some(1));
    assert_eq!(got.bundle.refresh_hint, Some(HINT.as_secs()));
    assert_eq!(got.bundle.x509_authorities.len(), 1);
    assert_eq!(got.bundle.jwt_authorities.keys.len(), 1);

    // The wrong endpoint ID, or another trust domain's bundle, is refused.
    let other_id = td.member("/spire/server")?;
    let err = fetch::fetch(
        &url,
        Profile::Spiffe {
            id: &other_id,
            bundle: &first,
        },
    )
    .await
    .expect_err("the endpoint is not spiffe://cluster.test/spire/server");
    assert!(
        matches!(&err, FetchError::Tls { reason, .. } if reason.contains("not the configured endpoint SPIFFE ID")),
        "{err}"
    );
    let stranger = TrustDomainCa::in_memory(vec![tessera_operator::ca::authority::new_root(
        &"b.test".parse()?,
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    )?])
    .spiffe_bundle(OffsetDateTime::now_utc(), HINT);
    let err = fetch::fetch(
        &url,
        Profile::Spiffe {
            id: &id,
            bundle: &stranger,
        },
    )
    .await
    .expect_err("the endpoint's SVID does not chain to b.test's bundle");
    assert!(
        matches!(&err, FetchError::Tls { reason, .. } if reason.contains("does not chain")),
        "{err}"
    );

    // A rotation: the served bundle has both roots and the next sequence
    // number, and a relying party holding only the old bundle can still
    // authenticate the endpoint (its SVID comes from the older root).
    let later = OffsetDateTime::now_utc() + time::Duration::days(25);
    assert!(ca.write().await.rotate_if_due(&client, &cfg, later).await?);
    rotated.notify_waiters();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = fetch::fetch(
        &url,
        Profile::Spiffe {
            id: &id,
            bundle: &first,
        },
    )
    .await?;
    assert_eq!(got.bundle.sequence, Some(2));
    assert_eq!(got.bundle.x509_authorities.len(), 2);
    assert_eq!(got.bundle.x509_authorities[0], first.x509_authorities[0]);
    assert_eq!(got.bundle.jwt_authorities.keys.len(), 2);

    // A root removed by hand (here the new one, which the clock moved 25
    // days ahead made) gets a new sequence number too: the Secret follower
    // numbers it.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "tessera-system");
    let follower = tokio::spawn(tessera_operator::ca::authority::follow_secret(
        client.clone(),
        cfg.clone(),
        ca.clone(),
        |_| {},
    ));
    let mut secret = secrets.get(&cfg.secret_name).await?;
    let data = secret.data.as_mut().unwrap();
    let roots: Vec<serde_json::Value> =
        serde_json::from_slice(&data[tessera_operator::ca::authority::SECRET_KEY].0)?;
    data.insert(
        tessera_operator::ca::authority::SECRET_KEY.to_owned(),
        k8s_openapi::ByteString(serde_json::to_vec(&roots[..1])?),
    );
    secrets
        .replace(&cfg.secret_name, &PostParams::default(), &secret)
        .await?;
    let current = eventually(
        "the hand-edited roots to be served with sequence 3",
        std::time::Duration::from_secs(20),
        || {
            let (url, id) = (url.clone(), id.clone());
            let held = got.bundle.clone();
            async move {
                let now = fetch::fetch(
                    &url,
                    Profile::Spiffe {
                        id: &id,
                        bundle: &held,
                    },
                )
                .await?;
                Ok((now.bundle.sequence == Some(3)).then_some(now.bundle))
            }
        },
    )
    .await?;
    assert_eq!(current.x509_authorities, first.x509_authorities);
    follower.abort();

    // https_web: a Web PKI certificate from files, checked the Web PKI way.
    let dir = tempfile::tempdir()?;
    let (web_ca, cert, key) = web_pki(dir.path());
    let listener = endpoint::bind("127.0.0.1:0".parse()?).await?;
    let web_url = format!("https://{}/", listener.local_addr()?);
    let source = Source {
        ca: ca.clone(),
        refresh_hint: HINT,
        metrics: Arc::new(Metrics::default()),
    };
    let web = tokio::spawn(endpoint::run_web(listener, cert, key, source));
    let roots = der_roots(&web_ca);
    let got = fetch::fetch(&web_url, Profile::Web(Some(&roots))).await?;
    assert_eq!(got.bundle, current);
    let err = fetch::fetch(&web_url, Profile::Web(None))
        .await
        .expect_err("a private CA is not among the system roots");
    assert!(
        matches!(err, FetchError::Tls { .. } | FetchError::Trust(_)),
        "{err}"
    );
    // Only / serves the bundle.
    let err = fetch::fetch(&format!("{web_url}other"), Profile::Web(Some(&roots)))
        .await
        .expect_err("nothing is served at /other");
    assert!(
        matches!(&err, FetchError::Http { reason, .. } if reason.contains("404")),
        "{err}"
    );
    web.abort();
    endpoint.task.abort();
    Ok(())
}

fn ftd(
    name: &str,
    td: &str,
    url: &str,
    profile: BundleEndpointProfile,
    bootstrap: Option<String>,
) -> FederatedTrustDomain {
    FederatedTrustDomain::new(
        name,
        FederatedTrustDomainSpec {
            trust_domain: td.to_owned(),
            bundle_endpoint_url: url.to_owned(),
            bundle_endpoint_profile: profile,
            trust_domain_bundle: bootstrap,
            refresh_interval: None,
            max_bundle_age: None,
        },
    )
}

/// A bundle of a new root for trust domain `td`, valid for an hour.
fn fresh_bundle(td: &str) -> Result<SpiffeBundle> {
    let root = tessera_operator::ca::authority::new_root(
        &td.parse()?,
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    )?;
    Ok(TrustDomainCa::in_memory(vec![root]).spiffe_bundle(OffsetDateTime::now_utc(), HINT))
}

fn spiffe_profile(id: &str) -> BundleEndpointProfile {
    BundleEndpointProfile {
        profile_type: BundleEndpointProfileType::HttpsSpiffe,
        endpoint_spiffe_id: Some(id.to_owned()),
        ca_bundle: None,
    }
}

/// The Ready condition's (status, reason, message) and the sequence.
fn ready(f: &FederatedTrustDomain) -> Option<(String, String, String, Option<i64>)> {
    let status = f.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        c.status.clone(),
        c.reason.clone(),
        c.message.clone(),
        status.sequence_number,
    ))
}

async fn published(client: &kube::Client, td: &str) -> Result<Option<SpiffeBundle>> {
    let all = controller::published(client, "tessera-system").await?;
    Ok(match all.get(td) {
        Some(doc) => Some(SpiffeBundle::from_json(doc.as_bytes())?.bundle),
        None => None,
    })
}

async fn wait_reason(
    ftds: &Api<FederatedTrustDomain>,
    name: &str,
    reason: &str,
) -> Result<(String, String, String, Option<i64>)> {
    eventually(
        &format!("{name} to turn {reason}"),
        std::time::Duration::from_secs(20),
        || async {
            Ok(ftds
                .get_opt(name)
                .await?
                .as_ref()
                .and_then(ready)
                .filter(|r| r.1 == reason))
        },
    )
    .await
}

#[tokio::test]
async fn federated_trust_domains_follow_their_endpoint() -> Result<()> {
    let (cp, client) = tessera_tests::resources::control_plane_with_crds().await?;
    namespace(&client, "tessera-system").await?;
    // The far side: trust domain b.test with its own CA and bundle endpoint.
    let (b_cfg, b_ca) = trust_domain(&client, "b.test", "b-system").await?;
    let b_td = b_cfg.trust_domain.clone();
    let b_rotated = Arc::new(Notify::new());
    let b_endpoint = spiffe_endpoint("127.0.0.1:0".parse()?, &b_td, &b_ca, &b_rotated).await?;
    let b_addr = b_endpoint.addr;
    let b_url = format!("https://{b_addr}/");
    let b_id = endpoint::endpoint_id(&b_td)?.to_string();
    let bootstrap = || async {
        String::from_utf8(
            b_ca.read()
                .await
                .spiffe_bundle(OffsetDateTime::now_utc(), HINT)
                .to_json()
                .unwrap(),
        )
        .unwrap()
    };

    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run(
        client.clone(),
        FederationConfig {
            own: "cluster.test".parse()?,
            namespace: "tessera-system".into(),
        },
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let ftds: Api<FederatedTrustDomain> = Api::all(client.clone());
    let pp = PostParams::default();
    ftds.create(
        &pp,
        &ftd(
            "b",
            "b.test",
            &b_url,
            spiffe_profile(&b_id),
            Some(bootstrap().await),
        ),
    )
    .await?;
    let (status, _, message, sequence) = wait_reason(&ftds, "b", "Fresh").await?;
    assert_eq!(status, "True");
    assert_eq!(sequence, Some(1), "{message}");
    let first = published(&client, "b.test")
        .await?
        .expect("b.test's bundle is published");
    assert_eq!(
        first,
        b_ca.read()
            .await
            .spiffe_bundle(OffsetDateTime::now_utc(), HINT)
    );
    let status = ftds.get("b").await?.status.unwrap();
    assert!(status.last_refresh_time.is_some() && status.next_refresh_time.is_some());
    assert_eq!(status.key_count, Some(2));
    assert!(
        ftds.get("b")
            .await?
            .metadata
            .finalizers
            .unwrap()
            .contains(&controller::FINALIZER.to_owned())
    );

    // b.test rotates: the new root reaches the published bundle within the
    // refresh hint (held to 5 s at least).
    let later = OffsetDateTime::now_utc() + time::Duration::days(25);
    assert!(
        b_ca.write()
            .await
            .rotate_if_due(&client, &b_cfg, later)
            .await?
    );
    b_rotated.notify_waiters();
    let rotated_at = std::time::Instant::now();
    let rotated = eventually(
        "b.test's rotation to be published",
        std::time::Duration::from_secs(20),
        || async {
            Ok(published(&client, "b.test")
                .await?
                .filter(|b| b.sequence == Some(2)))
        },
    )
    .await?;
    assert!(rotated_at.elapsed() < controller::MIN_REFRESH + Duration::from_secs(3));
    assert_eq!(rotated.x509_authorities.len(), 2);
    wait_reason(&ftds, "b", "Fresh").await?;
    eventually(
        "the status to show sequence 2",
        std::time::Duration::from_secs(20),
        || async {
            Ok(ftds
                .get("b")
                .await?
                .status
                .and_then(|s| s.sequence_number)
                .filter(|s| *s == 2))
        },
    )
    .await?;

    // The endpoint goes down: Stale, and the last bundle stays published.
    b_endpoint.task.abort();
    let _ = b_endpoint.task.await;
    let (status, _, message, sequence) = wait_reason(&ftds, "b", "Stale").await?;
    assert_eq!(status, "False");
    assert_eq!(sequence, Some(2), "the bundle in use is still sequence 2");
    assert!(message.contains("cannot connect"), "{message}");
    assert_eq!(published(&client, "b.test").await?, Some(rotated.clone()));
    assert_eq!(metrics.federation_stale.get(), 1);
    // It comes back: Fresh again.
    let b_back = spiffe_endpoint(b_addr, &b_td, &b_ca, &b_rotated).await?;
    wait_reason(&ftds, "b", "Fresh").await?;
    assert_eq!(metrics.federation_stale.get(), 0);

    // Refused: this cluster's own trust domain, a second FTD for b.test,
    // a malformed bootstrap bundle. None publishes anything.
    ftds.create(
        &pp,
        &ftd(
            "own",
            "cluster.test",
            &b_url,
            spiffe_profile(&b_id),
            Some(bootstrap().await),
        ),
    )
    .await?;
    let (_, _, message, _) = wait_reason(&ftds, "own", "Error").await?;
    assert!(message.contains("own trust domain"), "{message}");
    ftds.create(
        &pp,
        &ftd("b-again", "b.test", &b_url, spiffe_profile(&b_id), None),
    )
    .await?;
    let (_, _, message, _) = wait_reason(&ftds, "b-again", "Error").await?;
    assert!(
        message.contains("already federated by FederatedTrustDomain b"),
        "{message}"
    );
    ftds.create(
        &pp,
        &ftd(
            "c",
            "c.test",
            &b_url,
            spiffe_profile("spiffe://c.test/x"),
            Some("{\"keys\": 7}".into()),
        ),
    )
    .await?;
    let (_, _, message, _) = wait_reason(&ftds, "c", "Error").await?;
    assert!(
        message.contains("trustDomainBundle is not a SPIFFE bundle"),
        "{message}"
    );
    // https_spiffe against the wrong trust domain's endpoint: the
    // endpoint's SVID does not chain to d.test's bundle.
    let d_bundle = fresh_bundle("d.test")?;
    let d_doc = String::from_utf8(d_bundle.to_json()?)?;
    // (Trusted for a day without a refresh: the default, three of its 5 s
    // refreshes, would withdraw it while the rest of this test runs.)
    let mut d = ftd(
        "d",
        "d.test",
        &b_url,
        spiffe_profile("spiffe://d.test/bundle"),
        Some(d_doc),
    );
    d.spec.max_bundle_age = Some("24h".into());
    ftds.create(&pp, &d).await?;
    let (_, _, message, _) = wait_reason(&ftds, "d", "Stale").await?;
    assert!(message.contains("TLS"), "{message}");
    assert_eq!(
        published(&client, "d.test").await?,
        Some(d_bundle),
        "the bootstrap bundle stays"
    );
    // The same with a maximum age: once its bundle has gone unrefreshed
    // for longer, it is withdrawn, and the bootstrap does not bring it back.
    let e_bundle = fresh_bundle("e.test")?;
    let mut e = ftd(
        "e",
        "e.test",
        &b_url,
        spiffe_profile("spiffe://e.test/bundle"),
        Some(String::from_utf8(e_bundle.to_json()?)?),
    );
    e.spec.max_bundle_age = Some("10s".into());
    ftds.create(&pp, &e).await?;
    wait_reason(&ftds, "e", "Stale").await?;
    assert!(published(&client, "e.test").await?.is_some());
    let (status, _, message, sequence) = wait_reason(&ftds, "e", "Expired").await?;
    assert_eq!(status, "False");
    assert_eq!(sequence, None);
    assert!(message.contains("withdrawn"), "{message}");
    for _ in 0..10 {
        assert_eq!(
            published(&client, "e.test").await?,
            None,
            "an expired bundle came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // An endpoint SPIFFE ID of another trust domain is refused.
    ftds.create(
        &pp,
        &ftd("f", "f.test", &b_url, spiffe_profile(&b_id), None),
    )
    .await?;
    let (_, _, message, _) = wait_reason(&ftds, "f", "Error").await?;
    assert!(
        message.contains("is not in trust domain f.test"),
        "{message}"
    );

    let all = controller::published(&client, "tessera-system").await?;
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        ["b.test", "d.test"],
        "only owning, valid federations publish"
    );

    // Deleting the FTD withdraws its bundle; deleting the refused
    // duplicate never touched it.
    ftds.delete("b-again", &DeleteParams::default()).await?;
    eventually(
        "b-again to be gone",
        std::time::Duration::from_secs(20),
        || async { Ok(ftds.get_opt("b-again").await?.is_none().then_some(())) },
    )
    .await?;
    assert!(published(&client, "b.test").await?.is_some());
    ftds.delete("b", &DeleteParams::default()).await?;
    eventually(
        "b.test's bundle to be withdrawn",
        std::time::Duration::from_secs(20),
        || async { Ok(published(&client, "b.test").await?.is_none().then_some(())) },
    )
    .await?;
    eventually(
        "b to be gone",
        std::time::Duration::from_secs(20),
        || async { Ok(ftds.get_opt("b").await?.is_none().then_some(())) },
    )
    .await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "tessera-system");
    assert!(
        maps.get(STORE_NAME)
            .await?
            .data
            .unwrap()
            .contains_key("d.test")
    );

    let _ = stop.send(());
    controller.await?;
    b_back.task.abort();
    drop(cp);
    Ok(())
}
