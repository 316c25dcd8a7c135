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
use tessera_tests::procs::{KillOnDrop, agent_run};
use tessera_tests::resources;

use crate::report::{Figure, ms, percentile};
use crate::system::{release_bins, run_json, start_operator};

const PODS: usize = 1000;
const PACED_PER_SEC: u64 = 100;
const SERVICE_ACCOUNTS: usize = 10;

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
    let rates = run_json(operator, &["bench-sign", "--seconds", "3"])?;
    let rate = |k: &str| rates.get(k);
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
    tessera_tests::fixtures::PodBuilder::new(ns, name)
        .node("node-a")
        .service_account(&format!("sa-{sa}"))
        .build()
}

/// Creates PODS pods in `ns` (paced at `per_sec`, or as fast as 16 creators
/// go when None) and returns each pod's latency to its SVID.
async fn latencies(
    client: &kube::Client,
    ns: &str,
    per_sec: Option<u64>,
    served: &mpsc::Receiver<(String, Instant)>,
    recorded: &mpsc::Receiver<(String, Instant)>,
) -> Result<Stages> {
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
    let mut marked: HashMap<String, Instant> = HashMap::new();
    while let Ok((pod, at)) = recorded.try_recv() {
        marked.entry(pod).or_insert(at);
    }
    let between = |from: &HashMap<String, Instant>, to: &HashMap<String, Instant>| {
        let mut d: Vec<Duration> = from
            .iter()
            .filter(|(pod, _)| pod.starts_with(&format!("{ns}/")))
            .map(|(pod, f)| {
                to.get(pod)
                    .map_or(Duration::MAX, |t| t.saturating_duration_since(*f))
            })
            .collect();
        d.sort();
        d
    };
    Ok(Stages {
        total: between(&created, &seen),
        to_record: between(&created, &marked),
        record_to_svid: between(&marked, &seen),
    })
}

/// Latencies of one phase, whole and split at the operator's PodIdentity record.
struct Stages {
    /// Pod created -> SVID served.
    total: Vec<Duration>,
    /// Pod created -> identity record seen by a watcher (the operator's part).
    to_record: Vec<Duration>,
    /// Annotation seen -> SVID served (the agent's and the signer's part).
    record_to_svid: Vec<Duration>,
}

/// Per (verb, resource): requests served and seconds spent, from the API
/// server's own `apiserver_request_duration_seconds` metric.
async fn apiserver_requests(client: &kube::Client) -> HashMap<String, (f64, f64)> {
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    let Ok(request) = http::Request::get("/metrics").body(Vec::new()) else {
        return out;
    };
    let Ok(text) = client.request_text(request).await else {
        return out;
    };
    for line in text.lines() {
        let (is_sum, rest) =
            if let Some(r) = line.strip_prefix("apiserver_request_duration_seconds_sum{") {
                (true, r)
            } else if let Some(r) = line.strip_prefix("apiserver_request_duration_seconds_count{") {
                (false, r)
            } else {
                continue;
            };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let key = format!("{} {}{}", label("verb"), label("resource"), {
            let sub = label("subresource");
            if sub.is_empty() {
                sub
            } else {
                format!("/{sub}")
            }
        });
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        let entry = out.entry(key).or_default();
        if is_sum {
            entry.1 += v;
        } else {
            entry.0 += v;
        }
    }
    out
}

/// Prints the request kinds that took the API server most time between two
/// snapshots.
fn print_apiserver_delta(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
) {
    let mut rows: Vec<(String, f64, f64)> = after
        .iter()
        .map(|(k, (n, t))| {
            let (n0, t0) = before.get(k).copied().unwrap_or_default();
            (k.clone(), n - n0, t - t0)
        })
        .filter(|r| r.1 > 0.0 && !r.0.starts_with("WATCH"))
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    for (k, n, t) in rows.iter().take(12) {
        println!(
            "    {k:<40} {n:>6.0} requests {:>7.2} ms mean",
            t / n * 1000.0
        );
    }
}

/// Watches PodIdentity records and reports when each pod's first appears.
fn watch_records(client: kube::Client) -> mpsc::Receiver<(String, Instant)> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = mpsc::channel();
    tokio::spawn(async move {
        let records = Api::<tessera_api::crd::PodIdentity>::all(client);
        let mut events = watcher(records, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(Ok(record)) = events.next().await {
            let pod = format!("{}/{}", record.spec.namespace, record.spec.pod_name);
            if tx.send((pod, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

async fn pod_to_svid(operator: &Path, agent: &Path) -> Result<Vec<Figure>> {
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    resources::apply_manifest(&client, &namespaces_and_accounts()).await?;
    let (operator, signer_port, operator_log) =
        start_operator(operator, &cp, &client, "identity-operator.log").await?;
    // Measure a running system: the operator's identity controller is up
    // once it has made the IdentityCounter (the first object of a new CRD
    // can take the API server seconds to store, once in a cluster's life).
    let counters: Api<tessera_api::crd::IdentityCounter> = Api::all(client.clone());
    let what = format!(
        "the operator's IdentityCounter (see {})",
        operator_log.display()
    );
    tessera_tests::eventually(&what, Duration::from_secs(60), || async {
        Ok(counters
            .get_opt(tessera_api::crd::identity::COUNTER_NAME)
            .await?)
    })
    .await?;
    let dir = tempfile_dir()?;
    let (agent, served) = start_agent(agent, &cp, &client, signer_port, &dir).await?;
    let recorded = watch_records(client.clone());
    let mut pids: Vec<(&str, u32)> = vec![
        ("bench", std::process::id()),
        ("operator", operator.0.id()),
        ("agent", agent.0.id()),
    ];
    pids.extend(["etcd", "kube-apiserver"].into_iter().zip(cp.pids()));
    let mut figures = Vec::new();
    for (phase, rate) in [("paced", Some(PACED_PER_SEC)), ("burst", None)] {
        match rate {
            Some(r) => println!("{PODS} pods at {r}/s"),
            None => println!("{PODS} pods at once (16 concurrent creators)"),
        }
        let requests_before = apiserver_requests(&client).await;
        let (before, started) = (cpu(&pids), Instant::now());
        let stages = latencies(&client, phase, rate, &served, &recorded).await?;
        let wall = started.elapsed().as_secs_f64();
        println!("  API server requests:");
        print_apiserver_delta(&requests_before, &apiserver_requests(&client).await);
        let used: Vec<String> = pids
            .iter()
            .zip(cpu(&pids).iter().zip(&before))
            .map(|((name, _), (after, before))| format!("{name} {:.1}", after - before))
            .collect();
        println!("  CPU seconds in {wall:.1} s: {}", used.join(", "));
        figures.extend(phase_figures(phase, rate.is_some(), &stages));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// CPU seconds each process has used so far (0 for one that is gone).
fn cpu(pids: &[(&str, u32)]) -> Vec<f64> {
    pids.iter()
        .map(|p| crate::system::cpu_seconds(p.1).unwrap_or(0.0))
        .collect()
}

/// The namespaces `paced` and `burst`, each with [`SERVICE_ACCOUNTS`]
/// service accounts, as a manifest.
fn namespaces_and_accounts() -> String {
    let mut manifest = String::new();
    for ns in ["paced", "burst"] {
        manifest += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        for sa in 0..SERVICE_ACCOUNTS {
            manifest += &format!(
                "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: sa-{sa}, namespace: {ns}}}\n"
            );
        }
    }
    manifest
}

/// Starts node-a's agent (identities only); the receiver gets each pod the
/// agent logs an issued SVID for, with the time it read the line.
async fn start_agent(
    agent: &Path,
    cp: &tessera_tests::ControlPlane,
    client: &kube::Client,
    signer_port: u16,
    dir: &Path,
) -> Result<(KillOnDrop, mpsc::Receiver<(String, Instant)>)> {
    let audience = tessera_api::signer_api::TOKEN_AUDIENCE;
    let token = resources::service_account_token(
        client,
        "tessera-system",
        "tessera-agent",
        Some("node-a"),
        audience,
    )
    .await?;
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
    Ok((agent, served))
}

/// One phase's figures; the paced phase's p99 carries the target.
fn phase_figures(phase: &str, paced: bool, stages: &Stages) -> Vec<Figure> {
    let fig = |name: String, d: &[Duration], p: f64| Figure::new(&name, ms(percentile(d, p)), "ms");
    let p99 = fig(format!("pod_to_svid_{phase}_p99"), &stages.total, 99.0);
    vec![
        fig(format!("pod_to_svid_{phase}_p50"), &stages.total, 50.0),
        if paced {
            p99.with_target("<= 1000")
        } else {
            p99
        },
        fig(format!("pod_to_svid_{phase}_max"), &stages.total, 100.0),
        fig(
            format!("pod_to_record_{phase}_p99"),
            &stages.to_record,
            99.0,
        ),
        fig(
            format!("record_to_svid_{phase}_p99"),
            &stages.record_to_svid,
            99.0,
        ),
    ]
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
        let plain_line = "2026-11-22T06:00:37Z  INFO tessera_agent::svid::signer: X.509-SVID issued pod=paced/p-1 spiffe_id=spiffe://x/y";
        assert_eq!(issued_pod(plain_line).as_deref(), Some("paced/p-1"));
        assert_eq!(issued_pod("cannot get an SVID pod=a/b"), None);
    }
}
