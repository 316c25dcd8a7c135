//! The Go-built binaries the tests run for real: `kube-apiserver`, `kubectl`,
//! `etcd`, SPIRE's agent and server, and OLM's tools (`opm` and
//! `bundle-check`, a small program of ours around operator-framework/api's
//! bundle validators), built from the Go module proxy through wrapper modules
//! and cached by version outside the repository.
//!
//! Cache layout: `<cache>/kubernetes-v<K>/{kube-apiserver,kubectl}`,
//! `<cache>/etcd-v<E>/etcd`, `<cache>/spire-v<S>/{spire-agent,spire-server}`
//! and `<cache>/olm-v<R>-api-v<A>/{opm,bundle-check}`, where `<cache>` is `$TESSERA_TESTBIN_DIR`, else
//! `$XDG_CACHE_HOME/tessera/testbin`, else `$HOME/.cache/tessera/testbin`.
//! A directory exists only once its build finished (it is renamed into place).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Kubernetes release the tests run; matches the `v1_36` feature of k8s-openapi.
pub const KUBERNETES_VERSION: &str = "1.36.3";
/// SPIRE release whose agent the interop tests use as a Workload API client.
pub const SPIRE_VERSION: &str = "1.15.3";
/// etcd release, the one Kubernetes 1.36.3 requires in its go.mod.
pub const ETCD_VERSION: &str = "3.6.8";
/// operator-registry release whose `opm` renders and validates a catalog made
/// from the bundle.
pub const OPERATOR_REGISTRY_VERSION: &str = "1.73.0";
/// operator-framework/api release whose validators `bundle-check` runs (the
/// one operator-registry 1.73.0 requires).
pub const OPERATOR_API_VERSION: &str = "0.45.0";
/// Bumped whenever the build recipe changes, so cached builds of an older
/// recipe are rebuilt; written to a `recipe` file in each cache directory.
pub const RECIPE: &str = "2: version stamped with -X ldflags";
/// Oldest Go toolchain that builds both (Kubernetes 1.36 says `go 1.26.0`).
pub const MIN_GO_MINOR: u32 = 26;

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct TestBins {
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `kubectl` of the same release.
    pub kubectl: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `spire-agent`, a real SPIFFE Workload API client (`api fetch x509`)
    /// and a real SPIRE agent (Delegated Identity API).
    pub spire_agent: PathBuf,
    /// `spire-server`, a real SPIRE server (Entry API, federation).
    pub spire_server: PathBuf,
    /// `opm`, operator-registry's catalog tool.
    pub opm: PathBuf,
    /// `bundle-check <bundle-dir> <k8s-version>`: the results of
    /// operator-framework/api's bundle validators as JSON.
    pub bundle_check: PathBuf,
}

/// The cache root (see the module docs).
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TESSERA_TESTBIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("tessera/testbin"));
    }
    let home = std::env::var_os("HOME")
        .context("neither TESSERA_TESTBIN_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/tessera/testbin"))
}

fn kubernetes_dir(root: &Path) -> PathBuf {
    root.join(format!("kubernetes-v{KUBERNETES_VERSION}"))
}

fn etcd_dir(root: &Path) -> PathBuf {
    root.join(format!("etcd-v{ETCD_VERSION}"))
}

fn spire_dir(root: &Path) -> PathBuf {
    root.join(format!("spire-v{SPIRE_VERSION}"))
}

fn olm_dir(root: &Path) -> PathBuf {
    root.join(format!(
        "olm-v{OPERATOR_REGISTRY_VERSION}-api-v{OPERATOR_API_VERSION}"
    ))
}

impl TestBins {
    fn at(root: &Path) -> TestBins {
        TestBins {
            kube_apiserver: kubernetes_dir(root).join("kube-apiserver"),
            kubectl: kubernetes_dir(root).join("kubectl"),
            etcd: etcd_dir(root).join("etcd"),
            spire_agent: spire_dir(root).join("spire-agent"),
            spire_server: spire_dir(root).join("spire-server"),
            opm: olm_dir(root).join("opm"),
            bundle_check: olm_dir(root).join("bundle-check"),
        }
    }

    /// Finds the cached binaries; fails with what to run when any is missing.
    pub fn locate() -> Result<TestBins> {
        let bins = TestBins::at(&cache_root()?);
        for path in [
            &bins.kube_apiserver,
            &bins.kubectl,
            &bins.etcd,
            &bins.spire_agent,
            &bins.spire_server,
            &bins.opm,
            &bins.bundle_check,
        ] {
            if !path.is_file() {
                bail!(
                    "{} is missing: run `cargo xtask testbin` (or `cargo xtask test`, which builds it) to build the test control plane from the Go module proxy",
                    path.display()
                );
            }
        }
        Ok(bins)
    }

    /// Builds whatever is missing from the cache, then returns the paths.
    /// Concurrent callers serialize on a lock file; a finished build is reused.
    pub fn ensure_built() -> Result<TestBins> {
        let root = cache_root()?;
        fs::create_dir_all(&root)
            .with_context(|| format!("cannot create the cache directory {}", root.display()))?;
        let lock = File::create(root.join(".lock"))?;
        lock.lock()
            .with_context(|| format!("cannot lock {}", root.join(".lock").display()))?;
        check_go()?;
        let want = TestBins::at(&root);
        if !is_current(
            &kubernetes_dir(&root),
            &[&want.kube_apiserver, &want.kubectl],
        ) {
            build_kubernetes(&root)?;
        }
        if !is_current(&etcd_dir(&root), &[&want.etcd]) {
            build_etcd(&root)?;
        }
        if !is_current(&spire_dir(&root), &[&want.spire_agent, &want.spire_server]) {
            build_spire(&root)?;
        }
        if !is_current(&olm_dir(&root), &[&want.opm, &want.bundle_check]) {
            build_olm(&root)?;
        }
        TestBins::locate()
    }
}

/// True when `dir` holds a finished build of the current recipe with every
/// binary in `bins` (a binary added to a recipe later rebuilds the directory).
fn is_current(dir: &Path, bins: &[&Path]) -> bool {
    fs::read_to_string(dir.join("recipe")).is_ok_and(|r| r == RECIPE)
        && bins.iter().all(|b| b.is_file())
}

/// Fails unless `go` is on PATH and new enough.
fn check_go() -> Result<()> {
    let out = Command::new("go").arg("env").arg("GOVERSION").output().context(
        "`go` is not on PATH; install Go 1.26 or newer (it builds kube-apiserver and etcd for the tests)",
    )?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let minor = version
        .strip_prefix("go1.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m >= MIN_GO_MINOR => Ok(()),
        _ => bail!(
            "found Go {version:?}; building Kubernetes {KUBERNETES_VERSION} needs go1.{MIN_GO_MINOR} or newer"
        ),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
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

/// What one cache directory is built from: a wrapper module's `go.mod`, any
/// source files of its own (path in the module, text), build tags and
/// ldflags, the packages to build, and renames of what `go build` names
/// the binaries.
#[derive(Default)]
struct Recipe<'a> {
    go_mod: String,
    files: &'a [(&'a str, &'a str)],
    tags: &'a str,
    ldflags: String,
    packages: &'a [&'a str],
    renames: &'a [(&'a str, &'a str)],
}

/// Builds `recipe` into a scratch directory beside `dest`, then renames it
/// into place.
fn build_into(dest: &Path, recipe: &Recipe) -> Result<()> {
    let Recipe {
        go_mod,
        files,
        tags,
        ldflags,
        packages,
        renames,
    } = recipe;
    let root = dest.parent().context("cache directory has no parent")?;
    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(root)?;
    let module = scratch.path().join("module");
    let out = scratch.path().join("out");
    fs::create_dir_all(&module)?;
    fs::create_dir_all(&out)?;
    fs::write(module.join("go.mod"), go_mod)?;
    for (path, text) in *files {
        let path = module.join(path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, text)?;
    }
    eprintln!(
        "building {} (first time only; cached in {})",
        packages.join(" "),
        dest.display()
    );
    let mut cmd = Command::new("go");
    cmd.current_dir(&module)
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .arg("build")
        .arg(format!("-tags={tags}"))
        .arg(format!("-ldflags=-s -w {ldflags}"))
        .arg("-o")
        .arg(format!("{}/", out.display()))
        .args(*packages);
    run(&mut cmd, &format!("go build {}", packages.join(" ")))?;
    for (from, to) in *renames {
        fs::rename(out.join(from), out.join(to))
            .with_context(|| format!("go build produced no {from}"))?;
    }
    fs::write(out.join("recipe"), RECIPE)?;
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(&out, dest)?;
    Ok(())
}

fn build_kubernetes(root: &Path) -> Result<()> {
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
    build_into(
        &kubernetes_dir(root),
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

fn build_etcd(root: &Path) -> Result<()> {
    let go_mod = format!(
        "module tessera.dev/testbin/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v{ETCD_VERSION}\n"
    );
    // The main package is the module root, so go names the binary "server".
    build_into(
        &etcd_dir(root),
        &Recipe {
            go_mod,
            packages: &["go.etcd.io/etcd/server/v3"],
            renames: &[("server", "etcd")],
            ..Recipe::default()
        },
    )
}

/// See [`build_spire`].
const EJBCA_REPLACE: &str = "replace github.com/Keyfactor/ejbca-go-client-sdk => github.com/Keyfactor/ejbca-go-client-sdk v1.0.2";

fn build_spire(root: &Path) -> Result<()> {
    // SPIRE's go.mod has no replace directives, so requiring it is enough,
    // but for one module: the module proxy here does not serve the EJBCA
    // client SDK version SPIRE 1.15 requires (v1.1.0), only v1.0.2, the one
    // SPIRE 1.13 built its EJBCA plugin against; the plugin's code is the
    // same in both releases. The tests never load that plugin.
    // The server's sqlite datastore needs cgo (go's default when a C
    // compiler is installed; build_into does not turn it off).
    let go_mod = format!(
        "module tessera.dev/testbin/spire\n\ngo 1.26.0\n\nrequire github.com/spiffe/spire v{SPIRE_VERSION}\n\n{EJBCA_REPLACE}\n"
    );
    build_into(
        &spire_dir(root),
        &Recipe {
            go_mod,
            packages: &[
                "github.com/spiffe/spire/cmd/spire-agent",
                "github.com/spiffe/spire/cmd/spire-server",
            ],
            ..Recipe::default()
        },
    )
}

fn build_olm(root: &Path) -> Result<()> {
    // operator-registry's own build uses these tags: sqlite's JSON functions,
    // and image signatures checked in Go (no gpgme C library).
    let go_mod = format!(
        "module tessera.dev/testbin/olm\n\ngo 1.26.3\n\nrequire (\n\tgithub.com/operator-framework/api v{OPERATOR_API_VERSION}\n\tgithub.com/operator-framework/operator-registry v{OPERATOR_REGISTRY_VERSION}\n)\n"
    );
    let ldflags = format!(
        "-X github.com/operator-framework/operator-registry/cmd/opm/version.opmVersion=v{OPERATOR_REGISTRY_VERSION}"
    );
    build_into(
        &olm_dir(root),
        &Recipe {
            go_mod,
            files: &[(
                "cmd/bundle-check/main.go",
                include_str!("testbin/bundle_check.go"),
            )],
            tags: "json1,containers_image_openpgp",
            ldflags,
            packages: &[
                "./cmd/bundle-check",
                "github.com/operator-framework/operator-registry/cmd/opm",
            ],
            renames: &[],
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
