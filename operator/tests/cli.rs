//! The operator binary against a real control plane.

use std::process::Command;

use anyhow::Result;
use tessera_tests::{ControlPlane, resources};

fn operator(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

#[tokio::test]
async fn check_reports_missing_then_ready_crds() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let kubeconfig = cp.kubeconfig().display().to_string();

    let (ok, text) = operator(&["check", "--kubeconfig", &kubeconfig])?;
    assert!(!ok, "check passed without CRDs:\n{text}");
    assert!(
        text.contains("workloadidentities.tessera.dev: missing"),
        "{text}"
    );

    // What `crds` prints is exactly what makes the check pass.
    let (ok, yaml) = operator(&["crds"])?;
    assert!(ok);
    let client = cp.client().await?;
    let crds = resources::parse_manifest(&yaml)?
        .into_iter()
        .map(|obj| serde_json::from_value(serde_json::to_value(obj)?))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(crds.len(), tessera_api::crd::all().len());
    resources::install_crds(&client, &crds).await?;
    let (ok, text) = operator(&["check", "--kubeconfig", &kubeconfig])?;
    assert!(ok, "{text}");
    assert!(text.contains("API server v1."), "{text}");
    assert_eq!(text.matches(": ready").count(), crds.len(), "{text}");
    Ok(())
}

#[test]
fn check_explains_an_unreadable_kubeconfig() -> Result<()> {
    let (ok, text) = operator(&["check", "--kubeconfig", "/nonexistent/kubeconfig"])?;
    assert!(!ok);
    assert!(
        text.contains("cannot read kubeconfig /nonexistent/kubeconfig"),
        "{text}"
    );
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain HTTP/1.1 GET over TCP; returns (status code, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of a metric without labels, from /metrics.
fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

struct RunningOperator {
    child: std::process::Child,
    port: u16,
}

impl RunningOperator {
    fn start(cp: &ControlPlane, lease_seconds: u64) -> Result<RunningOperator> {
        let port = free_port()?;
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
            .args([
                "run",
                "--trust-domain",
                "cluster.test",
                "--namespace",
                "tessera-system",
            ])
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .arg(format!("--lease-duration={lease_seconds}"))
            .arg("--signer-addr=127.0.0.1:0")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        Ok(RunningOperator { child, port })
    }

    fn is_leader(&self) -> bool {
        metric(self.port, "tessera_operator_leader") == Some(1.0)
    }

    /// Sends SIGTERM and returns (exit success, stderr).
    async fn terminate(mut self) -> Result<(bool, String)> {
        use std::time::{Duration, Instant};
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let exit = loop {
            if let Some(exit) = self.child.try_wait()? {
                break exit;
            }
            assert!(Instant::now() < deadline, "the operator ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut log = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut err, &mut log)?;
        }
        Ok((exit.success(), log))
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn cluster_with_namespaces() -> Result<(ControlPlane, kube::Client)> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    resources::install_crds(&client, &tessera_api::crd::all()).await?;
    let manifest = "apiVersion: v1\nkind: Namespace\nmetadata: {name: tessera-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: default}\n";
    for obj in resources::parse_manifest(manifest)? {
        resources::create(&client, &obj, false).await?;
    }
    Ok((cp, client))
}

async fn create_pod_and_wait(client: &kube::Client, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};
    use std::time::{Duration, Instant};
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}]}}))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let annotations = pods
            .get(name)
            .await?
            .metadata
            .annotations
            .unwrap_or_default();
        if annotations
            .get(tessera_api::annotations::SPIFFE_ID)
            .map(String::as_str)
            == Some("spiffe://cluster.test/ns/default/sa/default")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("pod {name} never got its identity; annotations {annotations:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_publishes_the_bundle_annotates_pods_serves_metrics_and_stops_on_sigterm() -> Result<()>
{
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;

    let (cp, client) = cluster_with_namespaces().await?;
    let op = RunningOperator::start(&cp, 15)?;
    create_pod_and_wait(&client, "p").await?;
    let bundle = Api::<ConfigMap>::namespaced(client.clone(), "tessera-system")
        .get("tessera-trust-bundle")
        .await?;
    let pem = bundle
        .data
        .unwrap_or_default()
        .remove("bundle.pem")
        .unwrap_or_default();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    assert_eq!(http_get(op.port, "/healthz")?.0, 200);
    assert_eq!(http_get(op.port, "/readyz")?.0, 200);
    assert_eq!(http_get(op.port, "/nope")?.0, 404);
    assert!(op.is_leader());
    assert_eq!(metric(op.port, "tessera_operator_ca_roots"), Some(1.0));
    assert!(metric(op.port, "tessera_operator_identities_assigned_total").unwrap_or(0.0) >= 1.0);

    let (ok, log) = op.terminate().await?;
    assert!(ok, "log:\n{log}");
    assert!(
        log.contains("bundle published") && log.contains("shutting down"),
        "{log}"
    );
    assert!(log.contains("signing service listening"), "{log}");
    Ok(())
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over() -> Result<()> {
    use std::time::{Duration, Instant};

    let (cp, client) = cluster_with_namespaces().await?;
    let a = RunningOperator::start(&cp, 4)?;
    let b = RunningOperator::start(&cp, 4)?;
    create_pod_and_wait(&client, "first").await?;
    // Exactly one leader (allow the metrics of both to settle).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (leader, standby) = loop {
        match (a.is_leader(), b.is_leader()) {
            (true, false) => break (a, b),
            (false, true) => break (b, a),
            (both, _) => assert!(!both || Instant::now() < deadline, "two leaders at once"),
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        http_get(standby.port, "/readyz")?.0,
        200,
        "a standby is ready too"
    );

    let (ok, log) = leader.terminate().await?;
    assert!(ok, "{log}");
    // The standby takes over and keeps assigning identities.
    create_pod_and_wait(&client, "second").await?;
    assert!(standby.is_leader());
    Ok(())
}
