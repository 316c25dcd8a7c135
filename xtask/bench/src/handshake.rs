//! `cargo xtask bench auth`: the agents' handshakes against Go crypto/tls on
//! one core, the ingress program's cost per packet, and (through
//! [`crate::datapath`]) the figures of a running system.

use anyhow::{Context, Result, bail};

use crate::report::Figure;
use crate::system::{json_of, one_core, release_bins, run_json};

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
/// P-256 key exchange, AES-128-GCM, no resumption), each with client and
/// server pinned to one core, beside the crypto floor; an agent's restart
/// at the handshake level; the ingress program's cost per packet, measured
/// by the kernel with BPF_PROG_TEST_RUN (one million runs per scenario;
/// needs root); and the figures of a running system.
pub async fn run() -> Result<Vec<Figure>> {
    let (operator, agent) = release_bins()?;
    let mut figures = handshake_figures(&agent)?;
    figures.extend(restart_figures(&agent)?);
    figures.extend(ebpf_figures(&agent)?);
    figures.extend(crate::datapath::run(&operator, &agent).await?);
    Ok(figures)
}

/// Handshakes per core as the product runs against Go with a connection
/// per pair, the same work on both sides, and the cost over the floor.
fn handshake_figures(agent: &std::path::Path) -> Result<Vec<Figure>> {
    let peer = tlsbench()?;
    let certs = tempfile::tempdir()?;
    let dir = certs
        .path()
        .to_str()
        .context("temporary directory is not UTF-8")?;
    println!(
        "handshakes on one core, 5 s each: tessera-agent (as it runs, then without its channel and its verified-chain cache), then Go crypto/tls (a connection per pair, then doing the agents' whole work)"
    );
    let ours = json_of(one_core(agent).args(["bench-handshake", "--dir", dir, "--seconds", "5"]))?;
    let go_run = |verdict: bool| {
        let mut cmd = one_core(&peer);
        cmd.args(["-dir", dir, "-seconds", "5"])
            .args(["-client-id", "spiffe://bench.test/ns/shop/sa/web"])
            .args(["-server-id", "spiffe://bench.test/ns/shop/sa/db"])
            .env("GOMAXPROCS", "1");
        if verdict {
            cmd.arg("-verdict");
        }
        json_of(&mut cmd)
    };
    let (theirs, theirs_same_work) = (go_run(false)?, go_run(true)?);
    let floor_us = ours.get("floor_us")?;
    let cost_us = 1e6 / ours.get("per_second")?;
    let go = "go crypto/tls";
    Ok(vec![
        Figure::new("handshakes_per_core", ours.get("per_second")?, "1/s")
            .with_target(">= 2x peer")
            .with_peer(go, theirs.get("per_second")?),
        Figure::new("handshake_p50", ours.get("p50_ms")?, "ms")
            .with_peer(go, theirs.get("p50_ms")?),
        Figure::new("handshake_p99", ours.get("p99_ms")?, "ms")
            .with_peer(go, theirs.get("p99_ms")?),
        Figure::new(
            "handshakes_per_core_same_work",
            ours.get("same_work_per_second")?,
            "1/s",
        )
        .with_target(">= 1x peer")
        .with_peer(
            "go crypto/tls, whole work",
            theirs_same_work.get("per_second")?,
        ),
        Figure::new("handshake_crypto_floor", floor_us, "us"),
        Figure::new("handshake_cost_over_floor", cost_us / floor_us, "x").with_target("<= 1.5"),
    ])
}

/// 100 local identities x 1,000 peers from empty caches, each agent on a
/// core of its own.
fn restart_figures(agent: &std::path::Path) -> Result<Vec<Figure>> {
    println!(
        "restart: 100 local identities x 1,000 peer identities, each agent on a core of its own"
    );
    let caches = tempfile::tempdir()?;
    let caches = caches
        .path()
        .to_str()
        .context("temporary directory is not UTF-8")?;
    let restart = run_json(
        agent,
        &[
            "bench-restart",
            "--dir",
            caches,
            "--local",
            "100",
            "--remote",
            "1000",
        ],
    )?;
    Ok(vec![
        Figure::new(
            "restart_pairs_authenticated",
            restart.get("pairs")?,
            "pairs",
        )
        .with_target(">= 100000"),
        Figure::new("restart_pairs_wall", restart.get("wall_s")?, "s").with_target("<= 60"),
        Figure::new(
            "restart_initiator_cpu_per_pair",
            restart.get("initiator_cpu_per_pair_us")?,
            "us",
        ),
        Figure::new(
            "restart_responder_cpu_per_pair",
            restart.get("responder_cpu_per_pair_us")?,
            "us",
        ),
        Figure::new(
            "restart_peak_rss_both_agents",
            restart.get("peak_rss_mib")?,
            "MiB",
        ),
    ])
}

/// The ingress program's cost per packet.
fn ebpf_figures(agent: &std::path::Path) -> Result<Vec<Figure>> {
    println!("eBPF ingress decision cost (BPF_PROG_TEST_RUN, 1,000,000 runs per scenario)");
    let cost = run_json(agent, &["bench-datapath", "--repeat", "1000000"])?;
    let full = |name: &str, key: &str| -> Result<Figure> {
        Ok(Figure::new(name, cost.get(key)?, "ns").with_target("<= 200"))
    };
    Ok(vec![
        Figure::new("ebpf_test_run_floor", cost.get("floor_ns")?, "ns"),
        Figure::new("ebpf_non_syn", cost.get("non_syn_ns")?, "ns").with_target("<= 50"),
        Figure::new("ebpf_decision_no_policy", cost.get("no_policy_ns")?, "ns"),
        Figure::new(
            "ebpf_decision_authenticated_cached",
            cost.get("authenticated_cached_ns")?,
            "ns",
        )
        .with_target("<= 100"),
        full("ebpf_decision_authenticated_full", "authenticated_ns")?,
        full(
            "ebpf_decision_authenticated_worst",
            "authenticated_worst_ns",
        )?,
        full(
            "ebpf_decision_authenticated_worst_ipv6",
            "authenticated_worst_v6_ns",
        )?,
    ])
}
