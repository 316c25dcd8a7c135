//! Test harness for Tessera's integration and end-to-end tests: the Go-built
//! control plane binaries, a real etcd + kube-apiserver on loopback, and
//! helpers to install CRDs and apply manifests.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod controlplane;
pub mod docs;
pub mod fixtures;
pub mod netns;
pub mod oci;
pub mod olm;
pub mod pki;
pub mod procs;
pub mod rbac;
pub mod realnode;
pub mod resources;
pub mod scapy;
pub mod spire;
pub mod testbin;

pub use controlplane::{ControlPlane, free_port};
pub use testbin::TestBins;

/// True when this process runs as root (uid 0), read from /proc.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A binary of this workspace, from the same target directory as the running
/// test (`cargo test --workspace`, which `cargo xtask test` runs, builds them
/// all). Fails with what to run when it is missing.
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow::anyhow!("unexpected test binary path {}", exe.display()))?;
    let bin = profile_dir.join(name);
    anyhow::ensure!(
        bin.exists(),
        "{} is missing; build it first (cargo build --workspace --bins, or run cargo xtask test)",
        bin.display()
    );
    Ok(bin)
}

/// Polls `check` every 50 ms until it yields a value; fails naming `what`
/// once `limit` has passed. Every wait in the tests states its limit.
pub async fn eventually<T, F, Fut>(
    what: &str,
    limit: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET of `path` on loopback `port`; returns (status code,
/// body).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
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

/// The value of the sample `name` (with its labels as exposed, e.g.
/// `x_total{reason="a"}`) from the /metrics endpoint on loopback `port`.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
