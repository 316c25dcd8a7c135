//! The Go-built binaries the tests run for real, built from the Go module
//! proxy through wrapper modules and cached by version outside the
//! repository: the control plane (`kube-apiserver`, `kubectl`, `etcd`),
//! SPIRE's server and agent, OLM's tools (`opm`, and `bundle-check` around
//! operator-framework/api's validators) and OLM v0 itself (`olm`,
//! `catalog`, `cpb` and its CRDs), and what a real node runs
//! (`kubelet`, `kube-proxy`, `kube-scheduler`, `kube-controller-manager`,
//! containerd and runc, `crictl`, CoreDNS, and `workload`, the static
//! program of the test images).
//!
//! Each source has a directory `<cache>/<name>-v<version>/` holding its
//! binaries, where `<cache>` is `$TESSERA_TESTBIN_DIR`, else
//! `$XDG_CACHE_HOME/tessera/testbin`, else `$HOME/.cache/tessera/testbin`.
//! A directory exists only once its build finished (it is renamed into
//! place).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

mod http;
mod kubernetes;
mod node;
mod olm;
mod spire;

pub use kubernetes::staging_replaces;

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
/// OLM (v0) release whose `olm` and `catalog` operators install the bundle
/// on the real node (it requires operator-registry 1.73.0 and
/// operator-framework/api 0.45.0, the versions above).
pub const OLM_VERSION: &str = "0.46.0";
/// containerd release of the real node.
pub const CONTAINERD_VERSION: &str = "2.4.2";
/// runc release of the real node.
pub const RUNC_VERSION: &str = "1.5.3";
/// cri-tools release (`crictl`).
pub const CRI_TOOLS_VERSION: &str = "1.37.0";
/// CoreDNS release, the real node's cluster DNS.
pub const COREDNS_VERSION: &str = "1.15.0";
/// go-spiffe release the `workload` program's Workload API client uses (the
/// one SPIRE 1.15.3 requires).
pub const GO_SPIFFE_VERSION: &str = "2.8.1";
/// fortio release: the HTTP load generator and upstream server of `cargo
/// xtask bench waypoint` (the last before fortio required grol.io/grol,
/// which the Go module proxy does not serve).
pub const FORTIO_VERSION: &str = "1.68.2";
/// grpcurl release: the gRPC client of the waypoint's tests.
pub const GRPCURL_VERSION: &str = "1.9.4";
/// Bumped whenever the build recipe changes, so cached builds of an older
/// recipe are rebuilt; written to a `recipe` file in each cache directory.
pub const RECIPE: &str = "2: version stamped with -X ldflags";
/// Oldest Go toolchain that builds them all (Kubernetes 1.36 says `go 1.26.0`).
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
    /// OLM's own operators, for installing through OLM.
    pub olm: OlmBins,
    /// What a real node runs.
    pub node: NodeBins,
    /// HTTP and gRPC clients and servers.
    pub http: HttpBins,
}

/// HTTP and gRPC tools built from the Go module proxy.
#[derive(Debug, Clone)]
pub struct HttpBins {
    /// `fortio`: load generator (HTTP/1.1, h2c, gRPC) and echo server
    /// (HTTP and gRPC with the health and reflection services).
    pub fortio: PathBuf,
    /// `grpcurl`: a gRPC client using server reflection.
    pub grpcurl: PathBuf,
}

/// OLM v0's operators and what their bundle unpacking runs.
#[derive(Debug, Clone)]
pub struct OlmBins {
    /// `olm`: the OLM operator (CSVs, OperatorGroups).
    pub olm: PathBuf,
    /// `catalog`: the catalog operator (CatalogSources, Subscriptions,
    /// InstallPlans, bundle unpacking).
    pub catalog: PathBuf,
    /// `cpb`, static: copies a bundle image's content in the unpack job.
    pub cpb: PathBuf,
    /// OLM's CRDs (`deploy/chart/crds` of the release).
    pub crds: PathBuf,
}

/// The binaries of a real node.
#[derive(Debug, Clone)]
pub struct NodeBins {
    /// `kubelet`.
    pub kubelet: PathBuf,
    /// `kube-proxy`.
    pub kube_proxy: PathBuf,
    /// `kube-scheduler`.
    pub kube_scheduler: PathBuf,
    /// `kube-controller-manager`.
    pub kube_controller_manager: PathBuf,
    /// `containerd`.
    pub containerd: PathBuf,
    /// `containerd-shim-runc-v2`, which containerd finds on its PATH.
    pub containerd_shim: PathBuf,
    /// `ctr`, to import image archives.
    pub ctr: PathBuf,
    /// `runc`.
    pub runc: PathBuf,
    /// `crictl`.
    pub crictl: PathBuf,
    /// `workload`, static: the test images' program.
    pub workload: PathBuf,
    /// `coredns`, the cluster DNS.
    pub coredns: PathBuf,
}

/// One cache directory: its name, its binaries and how to build them.
struct Source {
    dir: String,
    bins: &'static [&'static str],
    build: fn(&Path) -> Result<()>,
}

/// Every source, in build order.
fn sources() -> Vec<Source> {
    vec![
        Source {
            dir: format!("kubernetes-v{KUBERNETES_VERSION}"),
            bins: &["kube-apiserver", "kubectl"],
            build: kubernetes::build_control_plane,
        },
        Source {
            dir: format!("etcd-v{ETCD_VERSION}"),
            bins: &["etcd"],
            build: kubernetes::build_etcd,
        },
        Source {
            dir: format!("spire-v{SPIRE_VERSION}"),
            bins: &["spire-agent", "spire-server"],
            build: spire::build_spire,
        },
        Source {
            dir: format!("olm-v{OPERATOR_REGISTRY_VERSION}-api-v{OPERATOR_API_VERSION}"),
            bins: &["opm", "bundle-check"],
            build: olm::build_olm,
        },
        Source {
            dir: format!("olm-lifecycle-v{OLM_VERSION}"),
            bins: &[
                "olm",
                "catalog",
                "cpb",
                "crds/0000_50_olm_00-subscriptions.crd.yaml",
            ],
            build: olm::build_lifecycle,
        },
        Source {
            dir: format!("kubernetes-node-v{KUBERNETES_VERSION}"),
            bins: &[
                "kubelet",
                "kube-proxy",
                "kube-scheduler",
                "kube-controller-manager",
            ],
            build: kubernetes::build_node,
        },
        Source {
            dir: format!("containerd-v{CONTAINERD_VERSION}-runc-v{RUNC_VERSION}"),
            bins: &["containerd", "containerd-shim-runc-v2", "ctr", "runc"],
            build: node::build_runtime,
        },
        Source {
            dir: format!("cri-tools-v{CRI_TOOLS_VERSION}"),
            bins: &["crictl"],
            build: node::build_crictl,
        },
        Source {
            dir: format!("coredns-v{COREDNS_VERSION}"),
            bins: &["coredns"],
            build: node::build_coredns,
        },
        Source {
            dir: format!("http-fortio-v{FORTIO_VERSION}-grpcurl-v{GRPCURL_VERSION}"),
            bins: &["fortio", "grpcurl"],
            build: http::build_http_tools,
        },
        Source {
            // Named by its source, so an edit rebuilds it.
            dir: format!(
                "workload-{}",
                &hex(&Sha256::digest(
                    [
                        include_str!("testbin/workload.go"),
                        include_str!("testbin/workload_http.go"),
                    ]
                    .concat()
                ))[..16]
            ),
            bins: &["workload"],
            build: node::build_workload,
        },
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

impl TestBins {
    fn at(root: &Path) -> TestBins {
        let sources = sources();
        let bin = |name: &str| {
            let source = sources.iter().find(|s| s.bins.contains(&name));
            root.join(source.map_or("", |s| s.dir.as_str())).join(name)
        };
        TestBins {
            kube_apiserver: bin("kube-apiserver"),
            kubectl: bin("kubectl"),
            etcd: bin("etcd"),
            spire_agent: bin("spire-agent"),
            spire_server: bin("spire-server"),
            opm: bin("opm"),
            bundle_check: bin("bundle-check"),
            olm: OlmBins {
                olm: bin("olm"),
                catalog: bin("catalog"),
                cpb: bin("cpb"),
                crds: bin("crds/0000_50_olm_00-subscriptions.crd.yaml")
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            },
            node: NodeBins {
                kubelet: bin("kubelet"),
                kube_proxy: bin("kube-proxy"),
                kube_scheduler: bin("kube-scheduler"),
                kube_controller_manager: bin("kube-controller-manager"),
                containerd: bin("containerd"),
                containerd_shim: bin("containerd-shim-runc-v2"),
                ctr: bin("ctr"),
                runc: bin("runc"),
                crictl: bin("crictl"),
                workload: bin("workload"),
                coredns: bin("coredns"),
            },
            http: HttpBins {
                fortio: bin("fortio"),
                grpcurl: bin("grpcurl"),
            },
        }
    }

    /// Every binary, for listing.
    pub fn paths(&self) -> Vec<&Path> {
        let n = &self.node;
        [
            &self.kube_apiserver,
            &self.kubectl,
            &self.etcd,
            &self.spire_agent,
            &self.spire_server,
            &self.opm,
            &self.bundle_check,
            &self.olm.olm,
            &self.olm.catalog,
            &self.olm.cpb,
            &n.kubelet,
            &n.kube_proxy,
            &n.kube_scheduler,
            &n.kube_controller_manager,
            &n.containerd,
            &n.containerd_shim,
            &n.ctr,
            &n.runc,
            &n.crictl,
            &n.workload,
            &n.coredns,
            &self.http.fortio,
            &self.http.grpcurl,
        ]
        .into_iter()
        .map(PathBuf::as_path)
        .collect()
    }

    /// Finds the cached binaries; fails with what to run when any is missing.
    pub fn locate() -> Result<TestBins> {
        let root = cache_root()?;
        for source in sources() {
            for bin in source.bins {
                let path = root.join(&source.dir).join(bin);
                if !path.is_file() {
                    bail!(
                        "{} is missing: run `cargo xtask testbin` (or `cargo xtask test`, which builds it) to build the test binaries from the Go module proxy",
                        path.display()
                    );
                }
            }
        }
        Ok(TestBins::at(&root))
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
        for source in sources() {
            let dir = root.join(&source.dir);
            if !is_current(&dir, source.bins) {
                (source.build)(&dir)?;
            }
        }
        TestBins::locate()
    }
}

/// True when `dir` holds a finished build of the current recipe with every
/// binary in `bins` (a binary added to a recipe later rebuilds the directory).
fn is_current(dir: &Path, bins: &[&str]) -> bool {
    fs::read_to_string(dir.join("recipe")).is_ok_and(|r| r == RECIPE)
        && bins.iter().all(|b| dir.join(b).is_file())
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

/// What one cache directory is built from: a wrapper module's `go.mod`, any
/// source files of its own (path in the module, text), build tags and
/// ldflags, the packages to build, and renames of what `go build` names
/// the binaries, environment variables for `go build`, and directories of
/// a required module to keep beside the binaries (module, directory in it,
/// name in the cache directory; its files, not subdirectories).
#[derive(Default)]
struct Recipe<'a> {
    go_mod: String,
    files: &'a [(&'a str, &'a str)],
    tags: &'a str,
    ldflags: String,
    packages: &'a [&'a str],
    renames: &'a [(&'a str, &'a str)],
    env: &'a [(&'a str, &'a str)],
    module_dirs: &'a [(&'a str, &'a str, &'a str)],
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
        env,
        module_dirs,
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
        .envs(env.iter().copied())
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
    for (module_path, dir, name) in *module_dirs {
        let mut list = Command::new("go");
        list.current_dir(&module).env("GOFLAGS", "-mod=mod").args([
            "list",
            "-m",
            "-f",
            "{{.Dir}}",
            module_path,
        ]);
        let root = String::from_utf8_lossy(&run(&mut list, "go list -m")?)
            .trim()
            .to_owned();
        let (from, to) = (Path::new(&root).join(dir), out.join(name));
        fs::create_dir_all(&to)?;
        for entry in
            fs::read_dir(&from).with_context(|| format!("cannot list {}", from.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
        }
    }
    fs::write(out.join("recipe"), RECIPE)?;
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(&out, dest)?;
    Ok(())
}
