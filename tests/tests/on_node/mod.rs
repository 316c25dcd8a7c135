//! What Tessera must do on a real node however it was installed (from
//! `deploy/` or through OLM): identities for workload containers, mutual
//! authentication between real pods, and an agent restart. Shared by the
//! real-node install tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use tessera_api::crd::AuthPolicy;
use tessera_api::names::{AGENT, NAMESPACE};
use tessera_tests::realnode::{LOGS, RealNode};
use tessera_tests::{ControlPlane, TestBins, eventually, resources};

/// Where the agent's Workload API socket is on the host.
pub const SOCKET_DIR: &str = "/run/tessera";
/// The agent's metrics port on the node (host network).
pub const AGENT_METRICS_PORT: u16 = 9091;
/// The workloads' namespace.
pub const WORKLOADS: &str = "default";
/// The node's pod cgroup root on this machine: the kubelet's cgroupfs
/// driver, in the cgroup v2 hierarchy of a hybrid host.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/kubepods";

/// Where the node's logs are, for failures.
pub fn logs() -> String {
    format!(
        "the node's logs are kept in {}",
        std::env::temp_dir().join(LOGS).display()
    )
}

/// The pods matching `labels` in the namespace, and how many are Ready.
pub async fn ready(pods: &Api<Pod>, labels: &str) -> Result<(usize, usize)> {
    let list = pods.list(&ListParams::default().labels(labels)).await?;
    let ready = list.items.iter().filter(|p| is_ready(p)).count();
    Ok((list.items.len(), ready))
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The trust domain the install publishes in its bundle ConfigMap.
pub async fn trust_domain(client: &kube::Client) -> Result<String> {
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), NAMESPACE);
    maps.get(tessera_api::names::BUNDLE_CONFIGMAP)
        .await?
        .data
        .and_then(|mut d| d.remove("trustDomain"))
        .context("the bundle ConfigMap names no trustDomain")
}

/// Two pods of different service accounts fetch their own SVIDs from inside
/// their containers (`web` with the test program's go-spiffe client, `db`
/// with `spire-agent api fetch x509`); a host process outside any pod is
/// refused.
pub async fn identities(cp: &ControlPlane, node: &RealNode, trust_domain: &str) -> Result<()> {
    let client = cp.client().await?;
    let images = node.images();
    let socket = format!("{SOCKET_DIR}/agent.sock");
    for (name, image, args) in [
        ("web", &images.workload, vec!["svid", socket.as_str()]),
        (
            "db",
            &images.spire_agent,
            vec!["api", "fetch", "x509", "-socketPath", socket.as_str()],
        ),
    ] {
        service_account(&client, name).await?;
        resources::apply_manifest(&client, &socket_pod(name, image, &args)).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client, WORKLOADS);
    for (name, shows) in [("web", ""), ("db", "SPIFFE ID:")] {
        let pod = format!("{name}-svid");
        let phase = finished(&pods, &pod).await?;
        let log = node.container_log(WORKLOADS, &pod, "c");
        let want = format!("spiffe://{trust_domain}/ns/{WORKLOADS}/sa/{name}");
        assert_eq!(phase, "Succeeded", "{name}'s fetch failed: {log}");
        assert!(
            log.lines()
                .any(|l| l.contains(shows) && l.split_whitespace().any(|w| w == want)),
            "{name} should have fetched {want}; it printed: {log}"
        );
    }
    // The test itself: a host process in no pod.
    let out = std::process::Command::new(&TestBins::locate()?.spire_agent)
        .args([
            "api",
            "fetch",
            "x509",
            "-timeout",
            "5s",
            "-socketPath",
            &socket,
        ])
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a host process got an SVID: {text}");
    assert!(
        text.contains("PermissionDenied"),
        "refused for another reason: {text}"
    );
    Ok(())
}

/// A one-shot pod `<name>-svid` of service account `name` running `image` with `args`,
/// the agent's socket directory mounted read-only.
fn socket_pod(name: &str, image: &str, args: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-svid, namespace: {WORKLOADS}}}\n\
         spec:\n  serviceAccountName: {name}\n  restartPolicy: Never\n  automountServiceAccountToken: false\n\
         \x20 containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n\
         \x20   args: {args:?}\n    volumeMounts: [{{name: spiffe, mountPath: {SOCKET_DIR}, readOnly: true}}]\n\
         \x20 volumes: [{{name: spiffe, hostPath: {{path: {SOCKET_DIR}, type: Directory}}}}]\n"
    )
}

/// The phase pod `name` ends in: Succeeded or Failed.
async fn finished(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(
        &format!("{name} to finish"),
        Duration::from_secs(60),
        || async {
            let phase = pods.get(name).await?.status.and_then(|s| s.phase);
            Ok(phase.filter(|p| p == "Succeeded" || p == "Failed"))
        },
    )
    .await
    .with_context(logs)
}

/// Probe interval of the workloads' clients, in milliseconds.
const PROBE_MS: u64 = 200;

/// With policies that let `web` reach `db` and `db` reach `ledger`, with
/// mutual authentication: `web`'s first connection succeeds, another pod's
/// are refused at connect(); deleting `web`'s policy refuses its new
/// connections within 1 s; a pod that the CNI gives `db`'s address after
/// `db` is deleted does not inherit `db`'s authentication to `ledger`.
pub async fn mutual_authentication(cp: &ControlPlane, node: &RealNode) -> Result<()> {
    let client = cp.client().await?;
    let image = &node.images().workload;
    for account in ["ledger", "other", "impostor"] {
        service_account(&client, account).await?;
    }
    // db-baseline keeps db under default deny once db-from-web is gone
    // (a pod no policy selects accepts everything).
    for (name, target, from, port) in [
        ("db-baseline", "db", "{namespaces: [nobody]}", 9),
        (
            "db-from-web",
            "db",
            "{podSelector: {matchLabels: {app: web}}}",
            5432,
        ),
        (
            "ledger-from-db",
            "ledger",
            "{podSelector: {matchLabels: {app: db}}}",
            7000,
        ),
    ] {
        resources::apply_manifest(
            &client,
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: {name}, namespace: {WORKLOADS}}}\n\
                 spec:\n  selector: {{matchLabels: {{app: {target}}}}}\n  rules:\n  - from: [{from}]\n    ports: [{{port: {port}}}]\n    authentication: Mutual\n"
            ),
        )
        .await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), WORKLOADS);
    let serve = |port: &str| vec!["serve".to_owned(), port.to_owned()];
    resources::apply_manifest(&client, &pod("ledger", image, &[("c", serve("7000"))])).await?;
    let ledger = running_ip(&pods, "ledger").await?;
    let db_pod = pod(
        "db",
        image,
        &[
            ("server", serve("5432")),
            ("client", probe(format!("{ledger}:7000"))),
        ],
    );
    resources::apply_manifest(&client, &db_pod).await?;
    let db = running_ip(&pods, "db").await?;
    for name in ["web", "other"] {
        let manifest = pod(name, image, &[("c", probe(format!("{db}:5432")))]);
        resources::apply_manifest(&client, &manifest).await?;
    }
    let web = probes(node, "web", "c", 3).await?;
    assert!(
        web.iter().all(|p| p.ok),
        "web's connections to db, from the first: {web:?}"
    );
    let other = probes(node, "other", "c", 3).await?;
    assert!(
        all_refused(&other.iter().collect::<Vec<_>>()),
        "another pod's connections to db should be refused at connect(): {other:?}"
    );
    let db_client = probes(node, "db", "client", 3).await?;
    assert!(
        db_client.iter().all(|p| p.ok),
        "db's connections to ledger: {db_client:?}"
    );
    agent_restart(&client, node).await?;
    policy_deletion(&client, node).await?;
    address_reuse(&client, node, db, ledger).await
}

/// Deleting web's policy: its new connections are refused from 1 s on.
async fn policy_deletion(client: &kube::Client, node: &RealNode) -> Result<()> {
    let policies: Api<AuthPolicy> = Api::namespaced(client.clone(), WORKLOADS);
    let deleted = unix_ms();
    policies
        .delete("db-from-web", &DeleteParams::default())
        .await?;
    tokio::time::sleep(Duration::from_millis(1000 + 3 * PROBE_MS)).await;
    let web = probes(node, "web", "c", 1).await?;
    let late: Vec<_> = web.iter().filter(|p| p.at >= deleted + 1000).collect();
    assert!(
        !late.is_empty() && all_refused(&late),
        "web's connections from 1 s after the policy's deletion ({deleted}) should be refused: {web:?}"
    );
    Ok(())
}

/// db's address, reused: a pod the CNI gives it after db is gone does not
/// inherit db's authentication to ledger.
async fn address_reuse(
    client: &kube::Client,
    node: &RealNode,
    db: std::net::Ipv4Addr,
    ledger: std::net::Ipv4Addr,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), WORKLOADS);
    let image = &node.images().workload;
    pods.delete(
        "db",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await?;
    eventually("db gone", Duration::from_secs(60), || async {
        Ok(pods.get_opt("db").await?.is_none().then_some(()))
    })
    .await?;
    eventually("db's address released", Duration::from_secs(30), || async {
        Ok(node.pod_address_free(db).then_some(()))
    })
    .await?;
    node.next_pod_address(db)?;
    let impostor = pod("impostor", image, &[("c", probe(format!("{ledger}:7000")))]);
    resources::apply_manifest(client, &impostor).await?;
    assert_eq!(
        running_ip(&pods, "impostor").await?,
        db,
        "the CNI gave another address"
    );
    let impostor = probes(node, "impostor", "c", 3).await?;
    assert!(
        all_refused(&impostor.iter().collect::<Vec<_>>()),
        "the pod at db's old address reached ledger: {impostor:?}"
    );
    Ok(())
}

/// Deletes the agent's pod: the DaemonSet's new pod restores the
/// authentications from its auth cache (counted) and makes no handshake
/// for `web`'s and `db`'s connections, which go on succeeding, while
/// `other`'s stay refused throughout.
pub async fn agent_restart(client: &kube::Client, node: &RealNode) -> Result<()> {
    let agents: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let labels = format!("app.kubernetes.io/name={AGENT}");
    let old = agents.list(&ListParams::default().labels(&labels)).await?;
    let old = old
        .items
        .first()
        .and_then(|p| p.metadata.name.clone())
        .context("no agent pod")?;
    agents.delete(&old, &DeleteParams::default()).await?;
    eventually(
        "the new agent's pod Ready",
        Duration::from_secs(120),
        || async {
            let list = agents.list(&ListParams::default().labels(&labels)).await?;
            let new_ready = list
                .items
                .iter()
                .any(|p| p.metadata.name.as_deref() != Some(old.as_str()) && is_ready(p));
            Ok((new_ready && list.items.len() == 1).then_some(()))
        },
    )
    .await
    .with_context(logs)?;
    let ready_at = unix_ms();
    tokio::time::sleep(Duration::from_millis(5 * PROBE_MS)).await;
    let metrics = tessera_tests::http_get(AGENT_METRICS_PORT, "/metrics")?.1;
    let restored = metric_sum(&metrics, "tessera_agent_auth_restored_total");
    let handshakes = metric_sum(&metrics, "tessera_agent_handshakes_total");
    assert!(
        restored >= 1.0,
        "the new agent restored no authentication:\n{metrics}"
    );
    assert_eq!(handshakes, 0.0, "the new agent made handshakes:\n{metrics}");
    for (pod, container) in [("web", "c"), ("db", "client")] {
        let probes = probes(node, pod, container, 1).await?;
        let after: Vec<_> = probes.iter().filter(|p| p.at > ready_at).collect();
        assert!(
            !after.is_empty() && after.iter().all(|p| p.ok),
            "{pod}'s connections after the restart: {probes:?}"
        );
    }
    let other = probes(node, "other", "c", 1).await?;
    assert!(
        other.iter().all(|p| !p.ok),
        "other got through during the restart: {other:?}"
    );
    Ok(())
}

/// The sum of the samples of `name` in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The arguments of a `workload probe` of `to` every [`PROBE_MS`].
fn probe(to: String) -> Vec<String> {
    vec!["probe".to_owned(), to, PROBE_MS.to_string()]
}

/// Whether every probe was refused at connect() (EPERM).
fn all_refused(probes: &[&Probe]) -> bool {
    probes
        .iter()
        .all(|p| p.text.contains("operation not permitted"))
}

/// One connection attempt of a `workload probe`.
#[derive(Debug)]
struct Probe {
    /// When it started, in ms since the Unix epoch.
    at: u64,
    ok: bool,
    text: String,
}

/// The probes `container` of `pod` printed, once there are at least `n`.
async fn probes(node: &RealNode, pod: &str, container: &str, n: usize) -> Result<Vec<Probe>> {
    eventually(
        &format!("{n} probes of {pod}/{container}"),
        Duration::from_secs(60),
        || async {
            let log = node.container_log(WORKLOADS, pod, container);
            let probes: Vec<Probe> = log
                .lines()
                .filter_map(|line| {
                    let (at, text) = line.split_once(' ')?;
                    Some(Probe {
                        at: at.parse().ok()?,
                        ok: text.starts_with("ok "),
                        text: text.to_owned(),
                    })
                })
                .collect();
            Ok((probes.len() >= n).then_some(probes))
        },
    )
    .await
    .with_context(logs)
}

fn unix_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn service_account(client: &kube::Client, name: &str) -> Result<()> {
    resources::apply_manifest(
        client,
        &format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {WORKLOADS}}}\n"),
    )
    .await?;
    Ok(())
}

/// A pod of service account `name`, labelled `app: name`, whose containers
/// run `image` with the given arguments.
fn pod(name: &str, image: &str, containers: &[(&str, Vec<String>)]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {WORKLOADS}, labels: {{app: {name}}}}}\n\
         spec:\n  serviceAccountName: {name}\n  automountServiceAccountToken: false\n  terminationGracePeriodSeconds: 0\n  containers:\n"
    );
    for (container, args) in containers {
        out += &format!(
            "  - name: {container}\n    image: {image}\n    imagePullPolicy: Never\n    args: {args:?}\n"
        );
    }
    out
}

/// The address of pod `name` once it runs.
async fn running_ip(pods: &Api<Pod>, name: &str) -> Result<std::net::Ipv4Addr> {
    let ip = eventually(
        &format!("{name} Running"),
        Duration::from_secs(60),
        || async {
            let status = pods.get(name).await?.status.unwrap_or_default();
            Ok((status.phase.as_deref() == Some("Running"))
                .then_some(status.pod_ip)
                .flatten())
        },
    )
    .await
    .with_context(logs)?;
    Ok(ip.parse()?)
}
