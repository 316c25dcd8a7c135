//! Test harness for Tessera's integration and end-to-end tests: the Go-built
//! control plane binaries, a real etcd + kube-apiserver on loopback, and
//! helpers to install CRDs and apply manifests.
#![forbid(unsafe_code)]

pub mod controlplane;
pub mod pki;
pub mod resources;
pub mod testbin;

pub use controlplane::ControlPlane;
pub use testbin::TestBins;

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}
