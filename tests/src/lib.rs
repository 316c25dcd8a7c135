//! Test harness for Tessera's integration and end-to-end tests: the Go-built
//! control plane binaries, a real etcd + kube-apiserver on loopback, and
//! helpers to install CRDs and apply manifests.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod controlplane;
pub mod netns;
pub mod pki;
pub mod procs;
pub mod resources;
pub mod testbin;

pub use controlplane::{ControlPlane, free_port};
pub use testbin::TestBins;

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
/// after 20 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
