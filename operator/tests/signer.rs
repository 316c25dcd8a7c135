//! The signing service over TLS against a real API server: an agent with a
//! node-bound token gets SVIDs for pods on its node and is refused for pods
//! elsewhere; bad, foreign-audience, unbound and other service accounts'
//! tokens are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use rcgen::{CertificateParams, KeyPair};
use tessera_api::signer_api::signer_client::SignerClient;
use tessera_api::signer_api::{SignJwtsvidRequest, SignX509svidRequest, TOKEN_AUDIENCE};
use tessera_operator::ca::authority::{CaConfig, TrustDomainCa};
use tessera_operator::ca::signer::{self, SignerConfig, SignerService};
use tessera_operator::identity;
use tessera_tests::{ControlPlane, resources};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The pods on top of [`resources::TWO_NODES`].
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: p-a, namespace: shop, labels: {app: a}}
spec:
  nodeName: node-a
  containers: [{name: c, image: registry.invalid/c:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: p-b, namespace: shop}
spec:
  nodeName: node-b
  containers: [{name: c, image: registry.invalid/c:1}]
"#;

struct Fixture {
    cp: ControlPlane,
    client: kube::Client,
    channel: Channel,
    root_der: Vec<u8>,
    /// The identity controller, writing the pods' PodIdentity records.
    controller: tokio::task::JoinHandle<()>,
}

async fn fixture() -> Result<Fixture> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    resources::apply_manifest(&client, PODS).await?;
    // p-a's ID comes from a WorkloadIdentity with its own ttl and hint; p-b
    // has the default.
    let wid = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": "wid-a"},
        "spec": {"spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace}/sa/a", "ttl": "20m", "jwtTTL": "2m", "hint": "internal",
            "podSelector": {"matchLabels": {"app": "a"}}}});
    resources::create(&client, &serde_json::from_value(wid)?, false).await?;
    let controller = {
        let client = client.clone();
        tokio::spawn(async move {
            let td = "cluster.test".parse().expect("trust domain");
            let run = identity::run(
                client,
                td,
                Default::default(),
                Duration::from_secs(30),
                None,
                std::future::pending(),
            );
            if let Err(e) = run.await {
                eprintln!("identity controller failed: {e}");
            }
        })
    };
    for pod in ["p-a", "p-b"] {
        resources::wait_for_pod_identity(&client, "shop", pod).await?;
    }

    let td: tessera_api::spiffe::TrustDomain = "cluster.test".parse()?;
    let ca_cfg = CaConfig::new(td.clone(), "tessera-system");
    let ca = TrustDomainCa::load_or_create(&client, &ca_cfg, OffsetDateTime::now_utc()).await?;
    let bundle_pem = ca.bundle_pem(OffsetDateTime::now_utc());
    let root_der = x509_parser::pem::parse_x509_pem(bundle_pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let dns = "tessera-signer.tessera-system.svc".to_owned();
    let identity = signer::server_identity(&ca, &td, std::slice::from_ref(&dns))?;
    let service = SignerService::new(
        client.clone(),
        SignerConfig {
            trust_domain: td,
            agent_username: "system:serviceaccount:tessera-system:tessera-agent".into(),
            svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
        },
        Arc::new(tokio::sync::RwLock::new(ca)),
    );
    let (addr, _task) = signer::serve(
        "127.0.0.1:0".parse()?,
        service,
        identity,
        std::future::pending(),
    )
    .await?;
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bundle_pem))
                .domain_name(dns),
        )?
        .connect()
        .await?;
    Ok(Fixture {
        cp,
        client,
        channel,
        root_der,
        controller,
    })
}

/// The pod's current UID.
async fn pod_uid(f: &Fixture, pod: &str) -> String {
    Api::<Pod>::namespaced(f.client.clone(), "shop")
        .get(pod)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap_or_default()
}

/// `message` with `token` as its bearer credential, if any.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

/// The agent's token bound to `node`.
async fn agent_token(f: &Fixture, node: &str) -> Result<String> {
    resources::agent_token(&f.client, node, TOKEN_AUDIENCE).await
}

async fn sign(
    f: &Fixture,
    pod: &str,
    token: Option<&str>,
    uid: Option<String>,
) -> Result<(String, Vec<u8>, KeyPair), tonic::Status> {
    let actual_uid = pod_uid(f, pod).await;
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let request = with_token(
        SignX509svidRequest {
            pod_namespace: "shop".into(),
            pod_name: pod.into(),
            pod_uid: uid.unwrap_or(actual_uid),
            csr: csr.der().to_vec(),
        },
        token,
    );
    let response = SignerClient::new(f.channel.clone())
        .sign_x509svid(request)
        .await?
        .into_inner();
    assert_eq!(response.hint, if pod == "p-a" { "internal" } else { "" });
    Ok((response.spiffe_id, response.chain[0].clone(), key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_svids_only_for_its_own_nodes_pods() -> Result<()> {
    let f = fixture().await?;
    let node_a = agent_token(&f, "node-a").await?;

    let (id, leaf_der, key) = sign(&f, "p-a", Some(&node_a), None).await?;
    assert_eq!(id, "spiffe://cluster.test/ns/shop/sa/a");
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)?;
    let (_, root) = x509_parser::parse_x509_certificate(&f.root_der)?;
    leaf.verify_signature(Some(root.public_key()))?;
    assert!(!leaf.is_ca());
    // The WorkloadIdentity's ttl (20m), plus the 30 s of clock-skew slack.
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 20 * 60 + 30);
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the CSR's key was not the one certified"
    );
    let uris: Vec<String> = leaf
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(uris, std::slice::from_ref(&id));
    assert!(
        leaf.key_usage()?
            .is_some_and(|ku| ku.value.digital_signature())
    );

    let denied = sign(&f, "p-b", Some(&node_a), None)
        .await
        .expect_err("pod on another node");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    assert!(denied.message().contains("not on node node-a"), "{denied}");

    let stale = sign(
        &f,
        "p-a",
        Some(&node_a),
        Some("00000000-0000-0000-0000-000000000000".into()),
    )
    .await
    .expect_err("wrong pod UID");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_foreign_tokens_are_refused() -> Result<()> {
    let f = fixture().await?;
    let cases = [
        ("no token", None, tonic::Code::Unauthenticated),
        (
            "forged token",
            Some("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl".to_owned()),
            tonic::Code::Unauthenticated,
        ),
        (
            "other audience",
            Some(
                resources::service_account_token(
                    &f.client,
                    "tessera-system",
                    "tessera-agent",
                    Some("node-a"),
                    "https://kubernetes.default.svc",
                )
                .await?,
            ),
            tonic::Code::Unauthenticated,
        ),
        (
            "not the agent",
            Some(
                resources::service_account_token(
                    &f.client,
                    "shop",
                    "default",
                    Some("node-a"),
                    TOKEN_AUDIENCE,
                )
                .await?,
            ),
            tonic::Code::PermissionDenied,
        ),
        (
            "not node-bound",
            Some(
                resources::service_account_token(
                    &f.client,
                    "tessera-system",
                    "tessera-agent",
                    None,
                    TOKEN_AUDIENCE,
                )
                .await?,
            ),
            tonic::Code::PermissionDenied,
        ),
    ];
    for (what, token, code) in cases {
        let status = sign(&f, "p-a", token.as_deref(), None)
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status}");
    }
    Ok(())
}

async fn sign_jwt(
    f: &Fixture,
    pod: &str,
    token: &str,
    audience: &[&str],
) -> Result<tessera_api::signer_api::SignJwtsvidResponse, tonic::Status> {
    let request = with_token(
        SignJwtsvidRequest {
            pod_namespace: "shop".into(),
            pod_name: pod.into(),
            pod_uid: pod_uid(f, pod).await,
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
        },
        Some(token),
    );
    Ok(SignerClient::new(f.channel.clone())
        .sign_jwtsvid(request)
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_es256_for_the_asked_audience_and_own_node_only() -> Result<()> {
    let f = fixture().await?;
    let node_a = agent_token(&f, "node-a").await?;
    let answer = sign_jwt(&f, "p-a", &node_a, &["db", "cache"]).await?;
    assert_eq!(answer.spiffe_id, "spiffe://cluster.test/ns/shop/sa/a");
    assert_eq!(answer.hint, "internal");
    let set = tessera_api::jwt::JwkSet::from_json(&answer.jwt_bundle)?;
    assert_eq!(set.keys.len(), 1);
    let td: tessera_api::spiffe::TrustDomain = "cluster.test".parse()?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let verified =
        tessera_api::jwt::verify(&answer.token, "cache", now, |t| (t == &td).then_some(&set))?;
    assert_eq!(verified.spiffe_id.as_str(), answer.spiffe_id);
    assert_eq!(verified.claims["aud"], serde_json::json!(["db", "cache"]));
    let (exp, iat) = (
        verified.claims["exp"].as_i64().unwrap(),
        verified.claims["iat"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 120, "the WorkloadIdentity's jwtTTL");
    assert_eq!(exp, answer.expires_at);
    // ES256 with the bundle's kid.
    let (h, _) = answer.token.split_once('.').unwrap();
    let header: serde_json::Value = serde_json::from_slice(&base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        h,
    )?)?;
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], set.keys[0].kid.as_str());

    let denied = sign_jwt(&f, "p-b", &node_a, &["db"])
        .await
        .expect_err("pod on another node");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    for bad in [&[][..], &[""][..]] {
        let status = sign_jwt(&f, "p-a", &node_a, bad)
            .await
            .expect_err("no audience");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() -> Result<()> {
    let f = fixture().await?;
    let real = agent_token(&f, "node-a").await?;
    // Re-signed unchanged, the token still works: the minting is sound...
    let resigned = f.cp.resign_service_account_token(&real, |_| {})?;
    let (id, _, _) = sign(&f, "p-a", Some(&resigned), None).await?;
    assert_eq!(id, "spiffe://cluster.test/ns/shop/sa/a");
    // ...so only the expiry differs in this one.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expired = f.cp.resign_service_account_token(&real, |claims| {
        claims.insert("iat".into(), (now - 7200).into());
        claims.insert("nbf".into(), (now - 7200).into());
        claims.insert("exp".into(), (now - 3600).into());
    })?;
    let status = sign(&f, "p-a", Some(&expired), None)
        .await
        .expect_err("expired token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    let status = sign_jwt(&f, "p-a", &expired, &["db"])
        .await
        .expect_err("expired token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    Ok(())
}

/// What a refused signing request answered.
async fn refusal(f: &Fixture, pod: &str, token: &str) -> tonic::Status {
    match sign(f, pod, Some(token), None).await {
        Ok((id, _, _)) => panic!("signed {id} for {pod}"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operators_record_agreeing_with_the_workload_identities_is_signed() -> Result<()> {
    let f = fixture().await?;
    let node_a = agent_token(&f, "node-a").await?;
    let pods: Api<Pod> = Api::namespaced(f.client.clone(), "shop");
    // Values written on the pod itself count for nothing.
    let forged = serde_json::json!({"metadata": {"annotations": {
        "tessera.dev/spiffe-id": "spiffe://cluster.test/payments/ledger",
        "tessera.dev/identity": "300/1",
        "tessera.dev/identity-source": "default"}}});
    pods.patch("p-a", &PatchParams::default(), &Patch::Merge(forged))
        .await?;
    let (id, _, _) = sign(&f, "p-a", Some(&node_a), None).await.unwrap();
    assert_eq!(id, "spiffe://cluster.test/ns/shop/sa/a");

    // With the controller stopped, a record that disagrees with what the
    // WorkloadIdentity objects give the pod is refused...
    f.controller.abort();
    let uid = pod_uid(&f, "p-a").await;
    let records: Api<tessera_api::crd::PodIdentity> = Api::all(f.client.clone());
    let rewrite =
        serde_json::json!({"spec": {"spiffeID": "spiffe://cluster.test/payments/ledger"}});
    records
        .patch(&uid, &PatchParams::default(), &Patch::Merge(rewrite))
        .await?;
    let status = refusal(&f, "p-a", &node_a).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("identity mismatch"), "{status:?}");

    // ...and so is a pod without a record.
    records.delete(&uid, &Default::default()).await?;
    let status = refusal(&f, "p-a", &node_a).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("has no identity"), "{status:?}");

    // A pod that has finished gets nothing, record or not.
    let uid_b = pod_uid(&f, "p-b").await;
    let node_b = agent_token(&f, "node-b").await?;
    assert!(records.get_opt(&uid_b).await?.is_some());
    pods.patch_status(
        "p-b",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
    )
    .await?;
    let status = refusal(&f, "p-b", &node_b).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("finished"), "{status:?}");
    Ok(())
}

/// A signing request for p-a carrying `token`.
fn bad_token_request(token: &str) -> tonic::Request<SignX509svidRequest> {
    with_token(
        SignX509svidRequest {
            pod_namespace: "shop".into(),
            pod_name: "p-a".into(),
            pod_uid: "x".into(),
            csr: Vec::new(),
        },
        Some(token),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_costs_a_bounded_number_of_token_reviews() -> Result<()> {
    use tessera_operator::ca::signer::limits::{REVIEW_BURST, REVIEWS_PER_SECOND};
    const REQUESTS: usize = 10_000;
    let f = fixture().await?;
    let before = resources::apiserver_request_count(&f.client, "tokenreviews").await?;
    let started = std::time::Instant::now();
    let mut client = SignerClient::new(f.channel.clone());
    let mut refused_without_review = 0;
    for i in 0..REQUESTS {
        let status = client
            .sign_x509svid(bad_token_request(&format!("not-a-token-{i}")))
            .await
            .unwrap_err();
        match status.code() {
            tonic::Code::Unauthenticated => {}
            tonic::Code::ResourceExhausted => refused_without_review += 1,
            other => panic!("request {i}: {other:?} {}", status.message()),
        }
    }
    let took = started.elapsed().as_secs_f64();
    // The API server counts a request once it has answered it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reviews = resources::apiserver_request_count(&f.client, "tokenreviews").await? - before;
    let bound = REVIEW_BURST + REVIEWS_PER_SECOND * (took + 1.0);
    println!(
        "{REQUESTS} bad tokens in {took:.1} s cost {reviews} TokenReviews (bound {bound:.0}); {refused_without_review} refused without one"
    );
    assert!(reviews >= 1.0, "the count of TokenReviews did not move");
    assert!(
        reviews <= bound,
        "{reviews} TokenReviews, more than {bound}"
    );

    // The same rejected token again costs nothing either, even with budget.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = resources::apiserver_request_count(&f.client, "tokenreviews").await?;
    for _ in 0..100 {
        let status = client
            .sign_x509svid(bad_token_request("not-a-token-again"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reviews = resources::apiserver_request_count(&f.client, "tokenreviews").await? - before;
    assert_eq!(
        reviews, 1.0,
        "one rejected token asked about {reviews} times"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_a_bounded_number_of_distinct_jwt_audiences() -> Result<()> {
    use tessera_operator::ca::signer::limits::MAX_AUDIENCE_SETS;
    let f = fixture().await?;
    let node_a = agent_token(&f, "node-a").await?;
    for i in 0..MAX_AUDIENCE_SETS {
        let audience = format!("aud-{i}");
        sign_jwt(&f, "p-a", &node_a, &[audience.as_str()])
            .await
            .unwrap();
    }
    sign_jwt(&f, "p-a", &node_a, &["aud-0"]).await.unwrap();
    let refused = sign_jwt(&f, "p-a", &node_a, &["one-too-many"])
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("reuse audiences"), "{refused:?}");
    Ok(())
}
