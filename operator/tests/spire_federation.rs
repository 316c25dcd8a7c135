//! Federation with a real SPIRE server, both ways: SPIRE (trust domain
//! `b.test`) federates with the Tessera operator's bundle endpoint, and
//! Tessera federates with SPIRE's through a FederatedTrustDomain
//! (https_spiffe). Then SPIRE prepares a new X.509 authority (it reaches
//! Tessera within the refresh hint), goes down (Stale, the last bundle
//! stays) and comes back (Fresh), and the FederatedTrustDomain is deleted
//! (the bundle is withdrawn).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use tessera_api::bundle::SpiffeBundle;
use tessera_api::crd::federated_trust_domain::FederatedTrustDomain;
use tessera_operator::federation;
use tessera_tests::procs::{KillOnDrop, operator_run};
use tessera_tests::spire::SpireServer;
use tessera_tests::{TestBins, eventually, free_port};

const NS: &str = "tessera-system";

fn decode(doc: &str) -> SpiffeBundle {
    SpiffeBundle::from_json(doc.as_bytes())
        .with_context(|| format!("not a SPIFFE bundle: {doc}"))
        .unwrap()
        .bundle
}

async fn published(client: &kube::Client, td: &str) -> Result<Option<SpiffeBundle>> {
    Ok(federation::controller::published(client, NS)
        .await?
        .get(td)
        .map(|d| decode(d)))
}

/// (reason, message, sequence) of the FTD's Ready condition.
async fn condition(
    ftds: &Api<FederatedTrustDomain>,
    name: &str,
) -> Result<Option<(String, String, Option<i64>)>> {
    Ok(ftds.get_opt(name).await?.and_then(|f| {
        let status = f.status?;
        let c = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        Some((c.reason.clone(), c.message.clone(), status.sequence_number))
    }))
}

#[tokio::test]
async fn tessera_and_spire_federate_both_ways() -> Result<()> {
    let bins = TestBins::locate()?;
    let (cp, client) = tessera_tests::resources::control_plane_with_crds().await?;
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

    // Tessera's operator for cluster.test, serving its bundle endpoint.
    let endpoint_port = free_port()?;
    let log = std::fs::File::create(cp.dir().join("operator.log"))?;
    let _operator = KillOnDrop(
        operator_run(
            std::path::Path::new(env!("CARGO_BIN_EXE_tessera-operator")),
            cp.kubeconfig(),
            "cluster.test",
        )
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()?))
        .arg("--signer-addr=127.0.0.1:0")
        .arg(format!("--bundle-endpoint-addr=127.0.0.1:{endpoint_port}"))
        .arg("--bundle-refresh-hint-seconds=5")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?,
    );
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let tessera_pem = eventually(
        "the operator to publish its trust bundle",
        std::time::Duration::from_secs(20),
        || async {
            Ok(maps
                .get_opt("tessera-trust-bundle")
                .await?
                .and_then(|cm| cm.data)
                .and_then(|mut d| d.remove("bundle.pem")))
        },
    )
    .await?;

    // SPIRE's server for b.test.
    let spire_dir = cp.dir().join("spire-b");
    let mut spire = SpireServer::start(&bins.spire_server, &spire_dir, "b.test", "5s").await?;
    let spire_bundle = decode(&spire.bundle()?);
    assert!(spire_bundle.sequence.is_some(), "SPIRE numbers its bundles");

    // SPIRE federates with Tessera (https_spiffe, bootstrapped with the
    // published bundle) and fetches it.
    let endpoint_url = format!("https://127.0.0.1:{endpoint_port}");
    eventually(
        "the operator's bundle endpoint to listen",
        std::time::Duration::from_secs(20),
        || async {
            Ok(std::net::TcpStream::connect(("127.0.0.1", endpoint_port))
                .is_ok()
                .then_some(()))
        },
    )
    .await?;
    spire.federate_with_tessera("cluster.test", endpoint_port, &tessera_pem)?;
    let held = decode(
        &spire
            .federated_bundle("cluster.test")?
            .context("spire-server bundle list shows no bundle for cluster.test")?,
    );
    let ours = tessera_operator::federation::fetch::fetch(
        &endpoint_url,
        tessera_operator::federation::fetch::Profile::Spiffe {
            id: &"spiffe://cluster.test/tessera/bundle-endpoint".parse()?,
            bundle: &held,
        },
    )
    .await?
    .bundle;
    assert_eq!(held.x509_authorities, ours.x509_authorities);
    // The PEM bootstrap bundle has no JWT keys: SPIRE has them because it
    // fetched the endpoint's bundle.
    assert!(!ours.jwt_authorities.keys.is_empty());
    assert_eq!(held.jwt_authorities, ours.jwt_authorities, "JWT keys too");

    // Tessera federates with SPIRE.
    let ftds: Api<FederatedTrustDomain> = Api::all(client.clone());
    let ftd = spire.federated_trust_domain("b-test")?;
    ftds.create(&PostParams::default(), &ftd).await?;
    let spire_sequence = spire_bundle.sequence.map(|s| s as i64);
    eventually(
        "the FederatedTrustDomain to show SPIRE's sequence",
        std::time::Duration::from_secs(20),
        || async {
            Ok(condition(&ftds, "b-test")
                .await?
                .filter(|(reason, _, seq)| reason == "Fresh" && *seq == spire_sequence))
        },
    )
    .await?;
    let first = published(&client, "b.test")
        .await?
        .context("b.test is published")?;
    assert_eq!(first.x509_authorities, spire_bundle.x509_authorities);

    // SPIRE prepares a new X.509 authority: its bundle grows and the new
    // authority reaches Tessera's published bundle within the refresh hint
    // (5 s).
    spire.cli(&["localauthority", "x509", "prepare"])?;
    let grown = decode(&spire.bundle()?);
    assert_eq!(
        grown.x509_authorities.len(),
        spire_bundle.x509_authorities.len() + 1
    );
    let start = Instant::now();
    eventually(
        "SPIRE's new authority to reach Tessera",
        std::time::Duration::from_secs(20),
        || async {
            Ok(published(&client, "b.test")
                .await?
                .filter(|b| b.x509_authorities == grown.x509_authorities))
        },
    )
    .await?;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5) + Duration::from_secs(2),
        "took {took:?}, more than the refresh hint"
    );
    println!("SPIRE's rotation reached Tessera's published bundle in {took:?}");

    // SPIRE goes down: Stale, and the last bundle stays in use.
    spire.stop();
    let (_, message, seq) = eventually(
        "the FederatedTrustDomain to turn Stale",
        std::time::Duration::from_secs(20),
        || async { Ok(condition(&ftds, "b-test").await?.filter(|c| c.0 == "Stale")) },
    )
    .await?;
    assert!(message.contains("cannot connect"), "{message}");
    assert_eq!(seq, grown.sequence.map(|s| s as i64));
    assert_eq!(
        published(&client, "b.test")
            .await?
            .map(|b| b.x509_authorities),
        Some(grown.x509_authorities.clone())
    );
    // Back again: Fresh.
    spire.resume().await?;
    eventually(
        "the FederatedTrustDomain to turn Fresh again",
        std::time::Duration::from_secs(20),
        || async { Ok(condition(&ftds, "b-test").await?.filter(|c| c.0 == "Fresh")) },
    )
    .await?;

    // Deleting the FederatedTrustDomain withdraws b.test's bundle.
    ftds.delete("b-test", &DeleteParams::default()).await?;
    eventually(
        "b.test's bundle to be withdrawn",
        std::time::Duration::from_secs(20),
        || async { Ok(published(&client, "b.test").await?.is_none().then_some(())) },
    )
    .await?;
    Ok(())
}
