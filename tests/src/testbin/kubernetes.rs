//! Kubernetes' binaries and etcd, built from `k8s.io/kubernetes` through a
//! wrapper module that points its staging modules at their releases.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{ETCD_VERSION, KUBERNETES_VERSION, Recipe, build_into, run};

/// The control plane: `kube-apiserver` and `kubectl`.
pub(super) fn build_control_plane(dir: &Path) -> Result<()> {
    let (go_mod, ldflags) = wrapper()?;
    build_into(
        dir,
        &Recipe {
            go_mod,
            ldflags,
            packages: &[
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "k8s.io/kubernetes/cmd/kubectl",
            ],
            ..Recipe::default()
        },
    )
}

/// A node and the controllers it needs: `kubelet`, `kube-proxy`,
/// `kube-scheduler` and `kube-controller-manager`.
pub(super) fn build_node(dir: &Path) -> Result<()> {
    let (go_mod, ldflags) = wrapper()?;
    build_into(
        dir,
        &Recipe {
            go_mod,
            ldflags,
            packages: &[
                "k8s.io/kubernetes/cmd/kubelet",
                "k8s.io/kubernetes/cmd/kube-proxy",
                "k8s.io/kubernetes/cmd/kube-scheduler",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ],
            ..Recipe::default()
        },
    )
}

/// The wrapper module's go.mod and the version ldflags for
/// `k8s.io/kubernetes` binaries.
fn wrapper() -> Result<(String, String)> {
    let json = run(
        Command::new("go")
            .args(["mod", "download", "-json"])
            .arg(format!("k8s.io/kubernetes@v{KUBERNETES_VERSION}")),
        "go mod download k8s.io/kubernetes",
    )?;
    let info: serde_json::Value = serde_json::from_slice(&json)?;
    let go_mod_path = info["GoMod"]
        .as_str()
        .context("go mod download printed no GoMod path")?;
    let upstream = fs::read_to_string(go_mod_path)?;
    let replaces = staging_replaces(&upstream, KUBERNETES_VERSION);
    if replaces.len() < 20 {
        bail!(
            "found only {} staging modules in k8s.io/kubernetes's go.mod; the wrapper recipe needs updating",
            replaces.len()
        );
    }
    let go_mod = format!(
        "module tessera.dev/testbin/kubernetes\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v{KUBERNETES_VERSION}\n\n{}\n",
        replaces.join("\n")
    );
    // What Kubernetes' own build stamps, so both binaries report the release.
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or_default();
    let ldflags = ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
        .iter()
        .map(|pkg| {
            format!(
                "-X {pkg}.gitVersion=v{KUBERNETES_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    Ok((go_mod, ldflags))
}

/// The `replace` lines that point every `k8s.io/<staging> v0.0.0` requirement of
/// the kubernetes module at its published `v0.<minor>.<patch>` release.
pub fn staging_replaces(kubernetes_go_mod: &str, version: &str) -> Vec<String> {
    let staging_version = format!("v0.{}", version.split_once('.').map_or(version, |(_, r)| r));
    let mut lines: Vec<String> = kubernetes_go_mod
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (module, ver) = (words.next()?, words.next()?);
            (module.starts_with("k8s.io/") && ver == "v0.0.0")
                .then(|| format!("replace {module} => {module} {staging_version}"))
        })
        .collect();
    lines.sort();
    lines.dedup();
    lines
}

pub(super) fn build_etcd(dir: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v{ETCD_VERSION}\n"
    );
    // The main package is the module root, so go names the binary "server".
    build_into(
        dir,
        &Recipe {
            go_mod,
            packages: &["go.etcd.io/etcd/server/v3"],
            renames: &[("server", "etcd")],
            ..Recipe::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_unversioned_staging_modules() {
        let go_mod = "require (\n\tk8s.io/api v0.0.0\n\tk8s.io/utils v0.0.0-20250101000000-abcdef\n\tgithub.com/x/y v1.0.0\n\tk8s.io/client-go v0.0.0 // indirect\n)\nreplace k8s.io/api => ./staging/src/k8s.io/api\n";
        assert_eq!(
            staging_replaces(go_mod, "1.36.3"),
            [
                "replace k8s.io/api => k8s.io/api v0.36.3",
                "replace k8s.io/client-go => k8s.io/client-go v0.36.3"
            ]
        );
    }
}
