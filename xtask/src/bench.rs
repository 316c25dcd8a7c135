//! `cargo xtask bench <name>`: benchmark families, each writing
//! `target/bench/<name>.json` in the format of DESIGN.md and printing a table.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tessera_tests::{ControlPlane, repo_root, resources};

/// One measured figure. `met` is computed from `target`, never written by hand.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figure {
    name: String,
    value: f64,
    unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    met: Option<bool>,
}

impl Figure {
    /// A figure with no peer and no target.
    pub fn new(name: &str, value: f64, unit: &str) -> Figure {
        Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            peer: None,
            peer_value: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    /// Adds a peer measured in the same run; the ratio is value / peer value.
    pub fn with_peer(mut self, peer: &str, peer_value: f64) -> Figure {
        self.peer = Some(peer.to_owned());
        self.peer_value = Some(peer_value);
        self.ratio = (peer_value != 0.0).then(|| self.value / peer_value);
        self.met = self.target.as_deref().and_then(|t| evaluate(t, &self));
        self
    }

    /// Sets the target (`<= 5`, `>= 5000`, `>= 2x peer`) and computes `met`.
    pub fn with_target(mut self, target: &str) -> Figure {
        self.target = Some(target.to_owned());
        self.met = evaluate(target, &self);
        self
    }
}

/// Evaluates a target against a figure: `<= N`, `>= N`, or `<=`/`>=` `Nx peer`.
/// Returns None when the target cannot be read or needs a missing peer.
pub fn evaluate(target: &str, figure: &Figure) -> Option<bool> {
    let target = target.trim();
    let (op, rest) = if let Some(r) = target.strip_prefix("<=") {
        ("<=", r)
    } else if let Some(r) = target.strip_prefix(">=") {
        (">=", r)
    } else {
        return None;
    };
    let rest = rest.trim();
    let (bound, value) = if let Some(factor) = rest.strip_suffix("x peer") {
        (factor.trim().parse::<f64>().ok()?, figure.ratio?)
    } else {
        let number = rest.split_whitespace().next()?;
        (number.parse::<f64>().ok()?, figure.value)
    };
    Some(if op == "<=" {
        value <= bound
    } else {
        value >= bound
    })
}

#[derive(Serialize)]
struct Report<'a> {
    benchmark: &'a str,
    machine: String,
    figures: &'a [Figure],
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, loopback")
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes the report and prints the table.
fn report(name: &str, figures: &[Figure]) -> Result<()> {
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    let json = serde_json::to_string_pretty(&Report {
        benchmark: name,
        machine: machine(),
        figures,
    })?;
    std::fs::write(&path, json + "\n")?;
    println!(
        "\n{:<34} {:>12} {:<6} {:<18} {:>10} {:>8} {:<14} met",
        "figure", "value", "unit", "peer", "peer", "ratio", "target"
    );
    for f in figures {
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{:<34} {:>12.2} {:<6} {:<18} {:>10} {:>8} {:<14} {}",
            f.name,
            f.value,
            f.unit,
            f.peer.as_deref().unwrap_or("-"),
            opt(f.peer_value),
            opt(f.ratio),
            f.target.as_deref().unwrap_or("-"),
            f.met.map_or("-", |m| if m { "yes" } else { "NO" }),
        );
    }
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Runs the benchmark family `name`.
pub async fn run(name: &str) -> Result<()> {
    let figures = match name {
        "controlplane" => controlplane().await?,
        "identity" => crate::bench_identity::run().await?,
        "auth" => auth().await?,
        // The part of `auth` that runs a cluster (first connection, policy
        // to maps, agent memory).
        "auth-cluster" => {
            let (operator, agent) = crate::bench_identity::release_bins()?;
            crate::bench_datapath::run(&operator, &agent).await?
        }
        other => bail!(
            "unknown benchmark {other:?}; available: controlplane, identity, auth, auth-cluster"
        ),
    };
    report(name, &figures)
}

/// Control-plane start time, CRD install time, and custom-resource create latency.
async fn controlplane() -> Result<Vec<Figure>> {
    const STARTS: usize = 3;
    const CREATES: usize = 300;
    let mut starts = Vec::new();
    let mut last = None;
    for i in 0..STARTS {
        let t = Instant::now();
        let cp = ControlPlane::start().await?;
        starts.push(t.elapsed());
        println!("start {}: {:.2}s", i + 1, t.elapsed().as_secs_f64());
        last = Some(cp);
    }
    starts.sort();
    let Some(cp) = last else {
        bail!("no control plane started");
    };
    let client = cp.client().await?;

    let t = Instant::now();
    resources::install_crds(&client, &tessera_api::crd::all()).await?;
    let install = t.elapsed();

    let mut latencies = Vec::with_capacity(CREATES);
    for i in 0..CREATES {
        let yaml = format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata:\n  name: bench-{i}\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: bench-{i}\n  rules:\n  - from:\n    - namespaces: [default]\n    ports:\n    - port: 8080\n"
        );
        let obj = resources::parse_manifest(&yaml)?.remove(0);
        let t = Instant::now();
        resources::create(&client, &obj, false).await?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Ok(vec![
        Figure::new(
            "controlplane_start_p50",
            percentile(&starts, 50.0).as_secs_f64(),
            "s",
        ),
        Figure::new(
            "controlplane_start_max",
            percentile(&starts, 100.0).as_secs_f64(),
            "s",
        ),
        Figure::new("crd_install_established", ms(install), "ms"),
        Figure::new(
            "authpolicy_create_p50",
            ms(percentile(&latencies, 50.0)),
            "ms",
        ),
        Figure::new(
            "authpolicy_create_p99",
            ms(percentile(&latencies, 99.0)),
            "ms",
        ),
    ])
}

/// The Go peer of the handshake benchmark, its source in the repo.
const TLSBENCH_GO: &str = include_str!("../go/tlsbench/main.go");

/// Builds `xtask/go/tlsbench` once per source version into the test binary
/// cache (outside the repo); its path.
fn tlsbench() -> Result<std::path::PathBuf> {
    let hash = TLSBENCH_GO.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let dir = tessera_tests::testbin::cache_root()?.join(format!("tlsbench-{hash:016x}"));
    let bin = dir.join("tlsbench");
    if bin.exists() {
        return Ok(bin);
    }
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("main.go"), TLSBENCH_GO)?;
    std::fs::write(src.path().join("go.mod"), "module tlsbench\n\ngo 1.26\n")?;
    std::fs::create_dir_all(&dir)?;
    let status = std::process::Command::new("go")
        .current_dir(src.path())
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .status()?;
    if !status.success() {
        bail!("go build of the crypto/tls peer failed");
    }
    Ok(bin)
}

/// `cargo xtask bench auth`: agent handshakes against Go crypto/tls doing
/// the same mutual TLS 1.3 handshake (ECDSA P-256 SVIDs from the same files,
/// P-256 key exchange, AES-128-GCM, no resumption), each with client and server pinned
/// to one core; and the ingress program's cost per packet, measured by the
/// kernel with BPF_PROG_TEST_RUN (one million runs per scenario; needs root).
async fn auth() -> Result<Vec<Figure>> {
    let (operator, agent) = crate::bench_identity::release_bins()?;
    let peer = tlsbench()?;
    let certs = tempfile::tempdir()?;
    let dir = certs
        .path()
        .to_str()
        .context("temporary directory is not UTF-8")?;
    println!("handshakes on one core, 5 s each: tessera-agent, then Go crypto/tls");
    let ours = json_of(one_core(&agent).args(["bench-handshake", "--dir", dir, "--seconds", "5"]))?;
    let theirs = json_of(
        one_core(&peer)
            .args(["-dir", dir, "-seconds", "5"])
            .args(["-client-id", "spiffe://bench.test/ns/shop/sa/web"])
            .args(["-server-id", "spiffe://bench.test/ns/shop/sa/db"])
            .env("GOMAXPROCS", "1"),
    )?;
    println!("eBPF ingress decision cost (BPF_PROG_TEST_RUN, 1,000,000 runs per scenario)");
    let cost = run_json(&agent, &["bench-datapath", "--repeat", "1000000"])?;
    let go = "go crypto/tls";
    let mut figures = vec![
        Figure::new("handshakes_per_core", ours.get("per_second")?, "1/s")
            .with_target(">= 2x peer")
            .with_peer(go, theirs.get("per_second")?),
        Figure::new("handshake_p50", ours.get("p50_ms")?, "ms")
            .with_peer(go, theirs.get("p50_ms")?),
        Figure::new("handshake_p99", ours.get("p99_ms")?, "ms")
            .with_peer(go, theirs.get("p99_ms")?),
        Figure::new("ebpf_test_run_floor", cost.get("floor_ns")?, "ns"),
        Figure::new("ebpf_decision_no_policy", cost.get("no_policy_ns")?, "ns"),
        Figure::new(
            "ebpf_decision_authenticated_cached",
            cost.get("authenticated_cached_ns")?,
            "ns",
        )
        .with_target("<= 100"),
        Figure::new(
            "ebpf_decision_authenticated_full",
            cost.get("authenticated_ns")?,
            "ns",
        ),
        Figure::new(
            "ebpf_decision_authenticated_worst",
            cost.get("authenticated_worst_ns")?,
            "ns",
        ),
    ];
    figures.extend(crate::bench_datapath::run(&operator, &agent).await?);
    Ok(figures)
}

/// The numbers a hidden `bench-*` subcommand of our binaries printed as JSON.
pub struct Numbers(serde_json::Value);

impl Numbers {
    /// The number under `key`.
    pub fn get(&self, key: &str) -> Result<f64> {
        self.0[key]
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("no {key} in {}", self.0))
    }
}

/// Runs `bin args` and reads the JSON object it prints.
pub fn run_json(bin: &std::path::Path, args: &[&str]) -> Result<Numbers> {
    json_of(std::process::Command::new(bin).args(args))
}

/// Runs `cmd` and reads the JSON object it prints.
fn json_of(cmd: &mut std::process::Command) -> Result<Numbers> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Numbers(serde_json::from_slice(&out.stdout)?))
}

/// `bin` pinned to CPU 0 with taskset (util-linux).
fn one_core(bin: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "0"]).arg(bin);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let f = Figure::new("x", 4.0, "ms").with_target("<= 5 ms");
        assert_eq!(f.met, Some(true));
        let f = Figure::new("x", 6.0, "ms").with_target("<= 5");
        assert_eq!(f.met, Some(false));
        let f = Figure::new("x", 1900.0, "1/s")
            .with_peer("go", 800.0)
            .with_target(">= 2x peer");
        assert_eq!(f.ratio, Some(2.375));
        assert_eq!(f.met, Some(true));
        let f = Figure::new("x", 1500.0, "1/s")
            .with_target(">= 2x peer")
            .with_peer("go", 800.0);
        assert_eq!(f.met, Some(false));
        assert_eq!(Figure::new("x", 1.0, "s").with_target("about 1").met, None);
        assert_eq!(
            Figure::new("x", 1.0, "s").with_target(">= 2x peer").met,
            None
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
