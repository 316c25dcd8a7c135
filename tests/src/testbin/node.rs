//! What a real node runs besides Kubernetes' own binaries: containerd v2
//! and its runc shim, runc (with seccomp; cgo and libseccomp-dev), crictl
//! for diagnostics, CoreDNS for the cluster's names, and `workload` (`workload.go`, ours), the static
//! program of the test images: the pod sandbox's process and the
//! workloads' TCP server, client and Workload API client.

use std::path::Path;

use anyhow::Result;

use super::{
    CONTAINERD_VERSION, COREDNS_VERSION, CRI_TOOLS_VERSION, GO_SPIFFE_VERSION, RUNC_VERSION,
    Recipe, build_into,
};

/// `containerd`, `containerd-shim-runc-v2`, `ctr` and `runc`.
pub(super) fn build_runtime(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/containerd\n\ngo 1.26.6\n\nrequire (\n\tgithub.com/containerd/containerd/v2 v{CONTAINERD_VERSION}\n\tgithub.com/opencontainers/runc v{RUNC_VERSION}\n)\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            // No btrfs snapshotter (it needs btrfs headers); runc filters
            // system calls with libseccomp, as Kubernetes' RuntimeDefault
            // profile requires.
            tags: "no_btrfs,seccomp",
            ldflags: format!(
                "-X github.com/containerd/containerd/v2/version.Version={CONTAINERD_VERSION}"
            ),
            packages: &[
                "github.com/containerd/containerd/v2/cmd/containerd",
                "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
                "github.com/containerd/containerd/v2/cmd/ctr",
                "github.com/opencontainers/runc",
            ],
            ..Recipe::default()
        },
    )
}

/// `crictl`.
pub(super) fn build_crictl(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/cri-tools\n\ngo 1.26.6\n\nrequire sigs.k8s.io/cri-tools v{CRI_TOOLS_VERSION}\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            packages: &["sigs.k8s.io/cri-tools/cmd/crictl"],
            ..Recipe::default()
        },
    )
}

/// `coredns` (its main package is the module root).
pub(super) fn build_coredns(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/coredns\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns v{COREDNS_VERSION}\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            packages: &["github.com/coredns/coredns"],
            env: &[("CGO_ENABLED", "0")],
            ..Recipe::default()
        },
    )
}

/// `workload`, static.
pub(super) fn build_workload(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/workload\n\ngo 1.26.0\n\nrequire github.com/spiffe/go-spiffe/v2 v{GO_SPIFFE_VERSION}\n"
    );
    build_into(
        dir,
        &Recipe {
            go_mod,
            files: &[
                ("cmd/workload/main.go", include_str!("workload.go")),
                ("cmd/workload/http.go", include_str!("workload_http.go")),
            ],
            packages: &["./cmd/workload"],
            env: &[("CGO_ENABLED", "0")],
            ..Recipe::default()
        },
    )
}
