//! The trust-domain CA against a real API server: created once even when two
//! operators start together, rotated with overlap, never overwritten when
//! unreadable, and its bundle published for agents.
#![allow(clippy::expect_used)] // expect_err states what each failure means

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tessera_operator::ca::authority::BUNDLE_KEY;
use tessera_operator::ca::{CaConfig, CaError, TrustDomainCa};
use tessera_tests::ControlPlane;
use time::OffsetDateTime;

const NS: &str = "tessera-system";

async fn setup() -> Result<(ControlPlane, kube::Client, CaConfig)> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let mut cfg = CaConfig::new("cluster.test".parse()?, NS);
    cfg.root_ttl = Duration::from_secs(30 * 24 * 3600);
    Ok((cp, client, cfg))
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

#[tokio::test]
async fn two_operators_starting_together_share_one_ca() -> Result<()> {
    let (cp, client, cfg) = setup().await?;
    let other = cp.client().await?;
    let now = OffsetDateTime::now_utc();
    let (a, b) = tokio::join!(
        TrustDomainCa::load_or_create(&client, &cfg, now),
        TrustDomainCa::load_or_create(&other, &cfg, now)
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.roots().len(), 1);
    assert_eq!(a.roots()[0].cert_pem, b.roots()[0].cert_pem);
    // A restart reads the same root back.
    let again = TrustDomainCa::load_or_create(&client, &cfg, now).await?;
    assert_eq!(again.roots()[0].cert_pem, a.roots()[0].cert_pem);
    Ok(())
}

#[tokio::test]
async fn rotation_overlaps_old_and_new_roots_until_the_old_expires() -> Result<()> {
    let (_cp, client, cfg) = setup().await?;
    let start = OffsetDateTime::now_utc();
    let mut ca = TrustDomainCa::load_or_create(&client, &cfg, start).await?;
    let first = ca.roots()[0].cert_pem.clone();

    // Early in its life nothing changes.
    assert!(!ca.rotate_if_due(&client, &cfg, start + days(5)).await?);
    // With less than a third of its life left, a second root joins.
    let later = start + days(25);
    assert!(ca.rotate_if_due(&client, &cfg, later).await?);
    assert_eq!(ca.roots().len(), 2);
    assert_eq!(ca.roots()[0].cert_pem, first);
    let second = ca.roots()[1].cert_pem.clone();
    assert_eq!(ca.active(later)?.cert_pem, second, "the new root signs");
    let bundle = ca.bundle_pem(later);
    assert!(
        bundle.contains(&first) && bundle.contains(&second),
        "both roots are trusted during the overlap"
    );
    // SVIDs signed now cannot outlive the signing root.
    assert_eq!(ca.max_svid_not_after(later)?, ca.roots()[1].not_after);

    // Another operator sees the rotation.
    let seen = TrustDomainCa::load_or_create(&client, &cfg, later).await?;
    assert_eq!(seen.roots().len(), 2);

    // Once the first root expires it leaves the Secret and the bundle.
    let after = start + days(31);
    assert!(ca.rotate_if_due(&client, &cfg, after).await?);
    assert_eq!(ca.roots().len(), 1);
    assert_eq!(ca.roots()[0].cert_pem, second);
    assert!(!ca.bundle_pem(after).contains(&first));

    ca.publish_bundle(&client, &cfg, after).await?;
    let cm = Api::<ConfigMap>::namespaced(client, NS)
        .get(&cfg.bundle_name)
        .await?;
    let published = cm.data.unwrap_or_default();
    assert_eq!(published.get(BUNDLE_KEY), Some(&second));
    assert_eq!(
        published.get("trustDomain").map(String::as_str),
        Some("cluster.test")
    );
    Ok(())
}

#[tokio::test]
async fn an_unreadable_secret_is_reported_and_left_alone() -> Result<()> {
    let (_cp, client, cfg) = setup().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let broken = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": cfg.secret_name, "namespace": NS},
        "stringData": {"roots.json": "[{\"cert_pem\": \"not a certificate\", \"key_pem\": \"\"}]"}});
    secrets
        .patch(
            &cfg.secret_name,
            &PatchParams::apply("test"),
            &Patch::Apply(broken),
        )
        .await?;
    let before = secrets.get(&cfg.secret_name).await?;

    let err = TrustDomainCa::load_or_create(&client, &cfg, OffsetDateTime::now_utc())
        .await
        .expect_err("a broken CA Secret must not load");
    assert!(matches!(err, CaError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");

    let after = secrets.get(&cfg.secret_name).await?;
    assert_eq!(after.data, before.data, "the broken Secret was changed");
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    Ok(())
}

/// The published bundle, once it holds exactly `roots` certificates.
async fn bundle_with(client: &kube::Client, cfg: &CaConfig, roots: usize) -> Result<String> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pem = maps
            .get_opt(&cfg.bundle_name)
            .await?
            .and_then(|cm| cm.data?.get(BUNDLE_KEY).cloned())
            .unwrap_or_default();
        if pem.matches("BEGIN CERTIFICATE").count() == roots {
            return Ok(pem);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the bundle did not reach {roots} root(s) within 10 s: {pem}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn changes_to_the_roots_secret_are_reloaded_and_published_at_once() -> Result<()> {
    let (_cp, client, cfg) = setup().await?;
    let start = OffsetDateTime::now_utc();
    let ca = TrustDomainCa::load_or_create(&client, &cfg, start).await?;
    ca.publish_bundle(&client, &cfg, start).await?;
    let first = ca.roots()[0].cert_pem.clone();
    let held = std::sync::Arc::new(tokio::sync::RwLock::new(ca));
    let (tx, mut reloads) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(tessera_operator::ca::authority::follow_secret(
        client.clone(),
        cfg.clone(),
        held.clone(),
        move |ca| {
            let _ = tx.send(ca.roots().len());
        },
    ));

    // Another replica rotates (its own copy of the roots): this one follows.
    let mut other = TrustDomainCa::load_or_create(&client, &cfg, start).await?;
    assert!(other.rotate_if_due(&client, &cfg, start + days(25)).await?);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), reloads.recv()).await?,
        Some(2)
    );
    let both = bundle_with(&client, &cfg, 2).await?;
    assert!(both.contains(&first));
    assert_eq!(held.read().await.roots().len(), 2);

    // An administrator removes the new root from the Secret: it leaves the
    // bundle at once.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets.get(&cfg.secret_name).await?;
    let data = secret.data.clone().unwrap_or_default();
    let mut roots: Vec<serde_json::Value> = serde_json::from_slice(&data["roots.json"].0)?;
    roots.truncate(1);
    let patch = serde_json::json!({"stringData": {"roots.json": serde_json::to_string(&roots)?}});
    secrets
        .patch(
            &cfg.secret_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), reloads.recv()).await?,
        Some(1)
    );
    assert_eq!(bundle_with(&client, &cfg, 1).await?, first);

    // A broken Secret changes nothing: the roots in memory stay in use.
    let broken = serde_json::json!({"stringData": {"roots.json": "[{\"cert_pem\": \"x\", \"key_pem\": \"\"}]"}});
    secrets
        .patch(
            &cfg.secret_name,
            &PatchParams::default(),
            &Patch::Merge(&broken),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(reloads.try_recv().is_err(), "a broken Secret was loaded");
    assert_eq!(held.read().await.roots()[0].cert_pem, first);
    assert_eq!(bundle_with(&client, &cfg, 1).await?, first);
    follower.abort();
    Ok(())
}
