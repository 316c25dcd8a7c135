//! `cargo xtask bench identity`: how fast Tessera hands out identities.
//!
//! 1. Signing throughput per core: `tessera-operator bench-sign` signs
//!    X.509-SVIDs (CSR parsed, leaf built and signed with the P-256 root) and
//!    JWT-SVIDs on one thread; the peer, measured in the same run, is
//!    `openssl speed ecdsap256` (bare ECDSA P-256 signatures on one core: the
//!    ceiling for any SVID signer on this machine).
//! 2. Pod created -> SVID served, for 1,000 pods on the local control plane
//!    with the release `tessera-operator run` and `tessera-agent run`
//!    processes: from the moment the API server acknowledged the pod's
//!    creation to the moment the agent has its SVID in the Workload API's
//!    store (its "X.509-SVID issued" log line, read as it is written). Once
//!    paced (100 pods/s, like a large rollout) and once as a burst.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tessera_tests::procs::{KillOnDrop, agent_run, operator_run};
use tessera_tests::{ControlPlane, free_port, repo_root, resources};

use crate::bench::{Figure, ms, percentile};

const PODS: usize = 1000;
const PACED_PER_SEC: u64 = 100;
const SERVICE_ACCOUNTS: usize = 10;

fn release_bins() -> Result<(PathBuf, PathBuf)> {
    println!("building release tessera-operator and tessera-agent");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "tessera-operator",
            "-p",
            "tessera-agent",
        ])
        .current_dir(repo_root())
        .status()?;
    if !status.success() {
        bail!("cannot build the release binaries");
    }
    let dir = repo_root().join("target/release");
    Ok((dir.join("tessera-operator"), dir.join("tessera-agent")))
}

/// Sign rate of `openssl speed ecdsap256` on one core.
fn openssl_sign_rate(seconds: u32) -> Result<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", &seconds.to_string(), "ecdsap256"])
        .stderr(Stdio::null())
        .output()
        .context("cannot run openssl; `cargo xtask deps` installs it")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_openssl_speed(&text).with_context(|| format!("unexpected openssl speed output:\n{text}"))
}

/// The sign/s column of the nistp256 line of `openssl speed` output.
fn parse_openssl_speed(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let (_, columns) = line.split_once(')')?;
    // sign, verify, sign/s, verify/s
    columns.split_whitespace().nth(2)?.parse().ok()
}

fn signing(operator: &Path) -> Result<Vec<Figure>> {
    println!("signing on one core (3 s per kind), then openssl speed ecdsap256");
    let out = Command::new(operator)
        .args(["bench-sign", "--seconds", "3"])
        .output()?;
    if !out.status.success() {
        bail!(
            "tessera-operator bench-sign failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rates: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rate = |k: &str| {
        rates[k]
            .as_f64()
            .with_context(|| format!("no {k} in {rates}"))
    };
    let openssl = openssl_sign_rate(3)?;
    Ok(vec![
        Figure::new("x509_svid_sign_per_core", rate("x509_per_sec")?, "1/s")
            .with_peer("openssl ecdsap256 sign", openssl)
            .with_target(">= 5000"),
        Figure::new("jwt_svid_sign_per_core", rate("jwt_per_sec")?, "1/s")
            .with_peer("openssl ecdsap256 sign", openssl),
    ])
}

/// Strips ANSI colour sequences from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `ns/name` of an agent log line saying an SVID was issued.
fn issued_pod(line: &str) -> Option<String> {
    let line = plain(line);
    if !line.contains("X.509-SVID issued") {
        return None;
    }
    let (_, rest) = line.split_once(" pod=")?;
    Some(rest.split_whitespace().next()?.to_owned())
}

fn pod(ns: &str, name: &str, sa: usize) -> Pod {
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": "node-a", "serviceAccountName": format!("sa-{sa}"),
                 "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}
    });
    // A literal object of known shape always converts.
    serde_json::from_value(value).unwrap_or_default()
}

/// Creates PODS pods in `ns` (paced at `per_sec`, or as fast as 16 creators
/// go when None) and returns each pod's latency to its SVID.
async fn latencies(
    client: &kube::Client,
    ns: &str,
    per_sec: Option<u64>,
    served: &mpsc::Receiver<(String, Instant)>,
) -> Result<Vec<Duration>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let (created_tx, created_rx) = mpsc::channel::<(String, Instant)>();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let creators = if per_sec.is_some() { PODS } else { 16 };
    for c in 0..creators {
        let (pods, tx, ns) = (pods.clone(), created_tx.clone(), ns.to_owned());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (c..PODS).step_by(creators).collect();
            for i in mine {
                if let Some(rate) = per_sec {
                    let at = start + Duration::from_micros(i as u64 * 1_000_000 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let name = format!("p-{i}");
                pods.create(
                    &PostParams::default(),
                    &pod(&ns, &name, i % SERVICE_ACCOUNTS),
                )
                .await?;
                let _ = tx.send((format!("{ns}/{name}"), Instant::now()));
            }
            anyhow::Ok(())
        }));
    }
    drop(created_tx);
    let mut created: HashMap<String, Instant> = HashMap::new();
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < PODS || created.len() < PODS {
        while let Ok((pod, at)) = created_rx.try_recv() {
            created.insert(pod, at);
        }
        match served.recv_timeout(Duration::from_millis(50)) {
            Ok((pod, at)) if pod.starts_with(&format!("{ns}/")) => {
                seen.entry(pod).or_insert(at);
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the agent exited"),
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {PODS} pods got an SVID within 180 s ({} created)",
                seen.len(),
                created.len()
            );
        }
    }
    for t in tasks {
        t.await??;
    }
    let mut out: Vec<Duration> = created
        .iter()
        .map(|(pod, c)| {
            seen.get(pod)
                .map_or(Duration::MAX, |s| s.saturating_duration_since(*c))
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn pod_to_svid(operator: &Path, agent: &Path) -> Result<Vec<Figure>> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    resources::install_crds(&client, &tessera_api::crd::all()).await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    let mut manifest = String::new();
    for ns in ["paced", "burst"] {
        manifest += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        for sa in 0..SERVICE_ACCOUNTS {
            manifest += &format!(
                "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: sa-{sa}, namespace: {ns}}}\n"
            );
        }
    }
    resources::apply_manifest(&client, &manifest).await?;

    let signer_port = free_port()?;
    let _operator = KillOnDrop(
        operator_run(operator, cp.kubeconfig(), "cluster.test")
            .arg("--metrics-addr=127.0.0.1:0")
            .arg(format!("--signer-addr=127.0.0.1:{signer_port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    resources::wait_for_trust_bundle(&client, Duration::from_secs(60)).await?;
    let token = resources::service_account_token(
        &client,
        "tessera-system",
        "tessera-agent",
        Some("node-a"),
        tessera_api::signer_api::TOKEN_AUDIENCE,
    )
    .await?;
    let dir = tempfile_dir()?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token)?;
    let socket = dir.join("agent.sock");
    let mut agent = KillOnDrop(
        agent_run(
            agent,
            cp.kubeconfig(),
            "node-a",
            signer_port,
            &token_file,
            &socket,
        )
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?,
    );
    let stderr = agent.0.stderr.take().context("no agent stderr")?;
    let (served_tx, served) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(pod) = issued_pod(&line)
                && served_tx.send((pod, Instant::now())).is_err()
            {
                break;
            }
        }
    });

    println!("{PODS} pods at {PACED_PER_SEC}/s");
    let paced = latencies(&client, "paced", Some(PACED_PER_SEC), &served).await?;
    println!("{PODS} pods at once (16 concurrent creators)");
    let burst = latencies(&client, "burst", None, &served).await?;
    let _ = std::fs::remove_dir_all(&dir);
    let fig = |name: &str, d: &[Duration], p: f64| Figure::new(name, ms(percentile(d, p)), "ms");
    Ok(vec![
        fig("pod_to_svid_paced_p50", &paced, 50.0),
        fig("pod_to_svid_paced_p99", &paced, 99.0).with_target("<= 1000"),
        fig("pod_to_svid_paced_max", &paced, 100.0),
        fig("pod_to_svid_burst_p50", &burst, 50.0),
        fig("pod_to_svid_burst_p99", &burst, 99.0),
        fig("pod_to_svid_burst_max", &burst, 100.0),
    ])
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs both parts.
pub async fn run() -> Result<Vec<Figure>> {
    let (operator, agent) = release_bins()?;
    let mut figures = signing(&operator)?;
    figures.extend(pod_to_svid(&operator, &agent).await?);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openssl_speed() {
        let text = "                              sign    verify    sign/s verify/s\n 256 bits ecdsa (nistp256)   0.0000s   0.0001s  43024.7  11549.0\n";
        assert_eq!(parse_openssl_speed(text), Some(43024.7));
        assert_eq!(parse_openssl_speed("nothing"), None);
    }

    #[test]
    fn reads_issued_lines_with_or_without_colour() {
        let coloured = "\u{1b}[2m2026-11-22T06:00:37Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mtessera_agent::svids\u{1b}[0m\u{1b}[2m:\u{1b}[0m X.509-SVID issued \u{1b}[3mpod\u{1b}[0m\u{1b}[2m=\u{1b}[0mshop/web-a \u{1b}[3mspiffe_id\u{1b}[0m\u{1b}[2m=\u{1b}[0mspiffe://x/y";
        assert_eq!(issued_pod(coloured).as_deref(), Some("shop/web-a"));
        let plain_line = "2026-11-22T06:00:37Z  INFO tessera_agent::svids: X.509-SVID issued pod=paced/p-1 spiffe_id=spiffe://x/y";
        assert_eq!(issued_pod(plain_line).as_deref(), Some("paced/p-1"));
        assert_eq!(issued_pod("cannot get an SVID pod=a/b"), None);
    }
}
