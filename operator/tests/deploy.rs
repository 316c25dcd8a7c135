//! `deploy/` against the test API server: the namespace and the
//! kustomization apply (server-side dry run, then for real); each service
//! account may do what its binary needs and nothing dangerous (`kubectl
//! auth can-i`); two operators running as the operator's service account,
//! with only its roles, elect a leader, publish the bundle, give a pod its
//! identity, compile a policy and point the leader-only Services at the
//! leader, then at the standby when the leader stops; `kubectl delete -k`
//! leaves the namespace and the CA Secret and nothing else of it.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use tessera_api::names::{
    AGENT, BUNDLE_ENDPOINT_SERVICE, CA_SECRET, NAMESPACE, OPERATOR, SIGNER_SERVICE,
};
use tessera_tests::procs::operator_run;
use tessera_tests::rbac;

mod common;
use tessera_tests::{ControlPlane, eventually, free_port, repo_root, resources};

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    cp.kubectl_output(args)
}

fn service_account(name: &str) -> String {
    rbac::service_account(NAMESPACE, name)
}

/// The namespace, then the kustomization: dry run, then for real.
fn install(cp: &ControlPlane) -> Result<()> {
    let dir = deploy_dir();
    let namespace = dir.join("namespace.yaml");
    kubectl(
        cp,
        &["apply", "--server-side", "-f", namespace.to_str().unwrap()],
    )?;
    let dry = kubectl(
        cp,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-k",
            dir.to_str().unwrap(),
        ],
    )
    .context("the server-side dry run of deploy/ failed")?;
    assert!(dry.contains("(server dry run)"), "{dry}");
    kubectl(cp, &["apply", "--server-side", "-k", dir.to_str().unwrap()])?;
    // CRDs must be established before the operator starts.
    kubectl(
        cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd",
            "--all",
        ],
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_applies_and_each_account_may_do_only_what_its_binary_needs() -> Result<()> {
    let cp = ControlPlane::start().await?;
    install(&cp)?;
    let mut forbidden = common::grants::forbidden_to_both();
    rbac::assert_grants(
        &cp,
        &service_account(OPERATOR),
        &common::grants::operator_needs(),
        &forbidden,
    );
    forbidden.extend(common::grants::forbidden_to_agent());
    rbac::assert_grants(
        &cp,
        &service_account(AGENT),
        &common::grants::agent_needs(),
        &forbidden,
    );
    Ok(())
}

/// `tessera-operator run` as pod `pod` at `ip`, with `kubeconfig`.
struct Replica {
    child: Child,
    metrics: u16,
    ip: &'static str,
    log: PathBuf,
}

impl Replica {
    fn start(cp: &ControlPlane, kubeconfig: &Path, pod: &str, ip: &'static str) -> Result<Self> {
        let metrics = free_port()?;
        let log = cp.dir().join(format!("{pod}.log"));
        let child = operator_run(
            Path::new(env!("CARGO_BIN_EXE_tessera-operator")),
            kubeconfig,
            "cluster.test",
        )
        .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
        .arg("--lease-duration=3")
        .arg(format!("--signer-addr=127.0.0.1:{}", free_port()?))
        .arg(format!("--bundle-endpoint-addr=127.0.0.1:{}", free_port()?))
        .env("POD_NAME", pod)
        .env("POD_IP", ip)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
        Ok(Replica {
            child,
            metrics,
            ip,
            log,
        })
    }

    fn is_leader(&self) -> bool {
        tessera_tests::metric(self.metrics, "tessera_operator_leader") == Some(1.0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address the EndpointSlice of `service` points at.
async fn leader_address(client: &kube::Client, service: &str) -> Result<Option<String>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(slices
        .get_opt(service)
        .await?
        .and_then(|s| s.endpoints.into_iter().flatten().next())
        .and_then(|e| e.addresses.into_iter().next()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_with_their_roles_alone_and_the_services_follow_the_leader() -> Result<()> {
    let cp = ControlPlane::start().await?;
    install(&cp)?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_with_token(
        OPERATOR,
        &rbac::api_token(&client, NAMESPACE, OPERATOR).await?,
    )?;
    let a = Replica::start(&cp, &kubeconfig, "operator-a", "10.0.0.1")?;
    let b = Replica::start(&cp, &kubeconfig, "operator-b", "10.0.0.2")?;
    resources::wait_for_trust_bundle(&client, Duration::from_secs(30)).await?;
    let (leader, standby) = eventually("a leader", std::time::Duration::from_secs(20), || async {
        Ok(match (a.is_leader(), b.is_leader()) {
            (true, false) => Some((&a, &b)),
            (false, true) => Some((&b, &a)),
            _ => None,
        })
    })
    .await?;
    for service in [SIGNER_SERVICE, BUNDLE_ENDPOINT_SERVICE] {
        eventually(
            &format!("{service} at the leader"),
            std::time::Duration::from_secs(20),
            || async {
                Ok(
                    (leader_address(&client, service).await?.as_deref() == Some(leader.ip))
                        .then_some(()),
                )
            },
        )
        .await?;
    }

    // The leader does its work with the roles alone: a pod gets its
    // identity, a policy is compiled and its status written.
    resources::apply_manifest(
        &client,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: shop}\n---\n\
         apiVersion: tessera.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {name: shop}\n\
         spec:\n  spiffeIDTemplate: \"spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}\"\n  podSelector: {matchLabels: {app: web}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
         spec: {nodeName: node-a, containers: [{name: c, image: registry.invalid/c:1}]}\n---\n\
         apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from: [{namespaces: [shop]}]\n    ports: [{port: 8080}]\n",
    )
    .await?;
    let record = eventually(
        "web's identity record",
        std::time::Duration::from_secs(20),
        || async { resources::pod_identity(&client, "shop", "web").await },
    )
    .await?;
    assert_eq!(record.spiffe_id, "spiffe://cluster.test/ns/shop/sa/default");
    eventually(
        "the AuthPolicy's status",
        std::time::Duration::from_secs(20),
        || async {
            let policy: Api<tessera_api::crd::AuthPolicy> = Api::namespaced(client.clone(), "shop");
            Ok(policy
                .get("web")
                .await?
                .status
                .is_some_and(|s| !s.conditions.is_empty())
                .then_some(()))
        },
    )
    .await?;

    // The standby takes over, and the Services follow.
    let standby_ip = standby.ip;
    let (stays, goes) = if std::ptr::eq(leader, &a) {
        (b, a)
    } else {
        (a, b)
    };
    drop(goes);
    for service in [SIGNER_SERVICE, BUNDLE_ENDPOINT_SERVICE] {
        eventually(
            &format!("{service} at the new leader"),
            std::time::Duration::from_secs(20),
            || async {
                Ok(
                    (leader_address(&client, service).await?.as_deref() == Some(standby_ip))
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    assert!(stays.is_leader());
    let log = stays.log();
    if log.contains("forbidden") {
        bail!("the operator was refused something with its roles:\n{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_k_keeps_only_the_namespace_and_the_ca_secret() -> Result<()> {
    let cp = ControlPlane::start().await?;
    install(&cp)?;
    let client = cp.client().await?;
    // The CA Secret, as the operator makes it.
    let kubeconfig = cp.kubeconfig_with_token(
        OPERATOR,
        &rbac::api_token(&client, NAMESPACE, OPERATOR).await?,
    )?;
    let operator = Replica::start(&cp, &kubeconfig, "operator-a", "10.0.0.1")?;
    resources::wait_for_trust_bundle(&client, Duration::from_secs(30)).await?;
    drop(operator);
    let dir = deploy_dir();
    kubectl(&cp, &["delete", "--wait=true", "-k", dir.to_str().unwrap()])?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(
        secrets.get_opt(CA_SECRET).await?.is_some(),
        "the CA Secret went"
    );
    // Nothing of deploy/ is left.
    let left = kubectl(
        &cp,
        &[
            "get",
            "deployments,daemonsets,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/part-of=tessera",
            "-o",
            "name",
        ],
    )?;
    assert_eq!(left.trim(), "", "left in the namespace: {left}");
    let left = kubectl(
        &cp,
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            "app.kubernetes.io/part-of=tessera",
            "-o",
            "name",
        ],
    )?;
    assert_eq!(left.trim(), "", "left in the cluster: {left}");
    let crds = kubectl(&cp, &["get", "crds", "-o", "name"])?;
    assert!(!crds.contains("tessera.dev"), "CRDs left: {crds}");
    Ok(())
}
