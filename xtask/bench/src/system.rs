//! The processes benchmarks run: release builds of our binaries, the
//! operator on a test control plane, a command pinned to one core, and the
//! JSON figures our hidden `bench-*` subcommands print.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tessera_tests::procs::{KillOnDrop, operator_run};
use tessera_tests::{free_port, repo_root, resources};

/// Builds the release operator and agent; returns their paths.
pub fn release_bins() -> Result<(PathBuf, PathBuf)> {
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
            "--features",
            "tessera-agent/bench,tessera-operator/bench",
        ])
        .current_dir(repo_root())
        .status()?;
    if !status.success() {
        bail!("cannot build the release binaries");
    }
    let dir = repo_root().join("target/release");
    Ok((dir.join("tessera-operator"), dir.join("tessera-agent")))
}

/// Starts the release operator for trust domain `cluster.test` against
/// `cp`, logging to `target/bench/<log_name>`, and waits for its trust
/// bundle: the process, its signer port and its log's path.
pub async fn start_operator(
    operator: &Path,
    cp: &tessera_tests::ControlPlane,
    client: &kube::Client,
    log_name: &str,
) -> Result<(KillOnDrop, u16, PathBuf)> {
    let signer_port = free_port()?;
    let logs = repo_root().join("target/bench");
    std::fs::create_dir_all(&logs)?;
    let operator_log = logs.join(log_name);
    println!("operator log: {}", operator_log.display());
    let child = KillOnDrop(
        operator_run(operator, cp.kubeconfig(), "cluster.test")
            .arg("--metrics-addr=127.0.0.1:0")
            .arg(format!("--signer-addr=127.0.0.1:{signer_port}"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&operator_log)?)
            .spawn()?,
    );
    resources::wait_for_trust_bundle(client, Duration::from_secs(60)).await?;
    Ok((child, signer_port, operator_log))
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
pub fn json_of(cmd: &mut std::process::Command) -> Result<Numbers> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Numbers(serde_json::from_slice(&out.stdout)?))
}

/// `bin` pinned to CPU 0 with taskset (util-linux).
pub fn one_core(bin: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "0"]).arg(bin);
    cmd
}

/// User and system CPU seconds process `pid` used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The fields after the command name: state is the first, utime the
    // 12th, stime the 13th (clock ticks, 100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}
