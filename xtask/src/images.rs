//! `cargo xtask images`: OCI images of the operator, the agent and the
//! waypoint, and the OLM bundle image, written as OCI image layouts and
//! archived (`oci-archive`) without a registry or a container engine.
//!
//! The bundle image holds `olm/bundle/manifests/` and `metadata/` at its
//! root, labelled with the bundle's annotations, as `bundle.Dockerfile`
//! would build it.
//!
//! Each image has one uncompressed layer holding the binary at
//! `/usr/local/bin/<name>` and the shared libraries it links (as `ldd`
//! lists them, at the paths the dynamic loader looks for): no shell, no
//! package manager. Every entry has owner 0, time 0 and a fixed mode, in
//! sorted order, and no field of the config or index carries a date, so
//! the same binaries give the same digests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::json;

/// One image: its binary, and the user it runs as.
struct Spec {
    binary: &'static str,
    /// `uid:gid`. The agent loads eBPF programs, joins network namespaces
    /// and writes cgroups: root (its DaemonSet narrows its capabilities).
    user: &'static str,
}

const SPECS: [Spec; 3] = [
    Spec {
        binary: "tessera-operator",
        user: "65532:65532",
    },
    Spec {
        binary: "tessera-agent",
        user: "0:0",
    },
    Spec {
        binary: "tessera-waypoint",
        user: "65532:65532",
    },
];

/// Where the binaries come from and where the archives go.
#[derive(Debug)]
pub struct Options {
    /// Cargo profile the binaries are built with (`release` for images a
    /// cluster runs; the tests use `dev`).
    pub profile: String,
    /// Directory the `<binary>.oci.tar` archives are written to.
    pub out: PathBuf,
    /// Repository prefix of the image names (`<prefix>/<binary>:<version>`).
    pub registry: String,
    /// Package the binaries already in the profile's target directory
    /// instead of building them first.
    pub no_build: bool,
}

/// An archive written, and the digest of its image manifest.
#[derive(Debug)]
pub struct Built {
    /// The `oci-archive` file.
    pub archive: PathBuf,
    /// `<registry>/<binary>:<version>`.
    pub name: String,
    /// `sha256:<hex>` of the manifest: the image's digest.
    pub digest: String,
}

/// Builds the binaries with `opts.profile` (unless `opts.no_build`) and
/// writes one archive per image.
pub fn build(repo: &Path, opts: &Options) -> Result<Vec<Built>> {
    if !opts.no_build {
        let mut args = vec!["build", "--profile", opts.profile.as_str()];
        for spec in &SPECS {
            args.extend(["--bin", spec.binary]);
        }
        crate::cargo(&args, &[])?;
    }
    let dir = if opts.profile == "dev" {
        "debug"
    } else {
        opts.profile.as_str()
    };
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let revision = git_revision(repo);
    let mut built = Vec::new();
    for spec in &SPECS {
        let binary = repo.join("target").join(dir).join(spec.binary);
        let image = write_image(spec, &binary, opts, &revision)?;
        println!(
            "{} {} -> {}",
            image.name,
            image.digest,
            image.archive.display()
        );
        built.push(image);
    }
    let bundle = write_bundle_image(&repo.join("olm/bundle"), opts, &revision)?;
    println!(
        "{} {} -> {}",
        bundle.name,
        bundle.digest,
        bundle.archive.display()
    );
    built.push(bundle);
    Ok(built)
}

/// The name of the bundle image and of its archive.
pub const BUNDLE_IMAGE: &str = "tessera-bundle";

fn git_revision(repo: &Path) -> String {
    Command::new("git")
        .current_dir(repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn write_image(spec: &Spec, binary: &Path, opts: &Options, revision: &str) -> Result<Built> {
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("{}/{}:{version}", opts.registry, spec.binary);
    let entrypoint = format!("/usr/local/bin/{}", spec.binary);
    let files = tessera_tests::oci::binary_files(binary, &entrypoint)?;
    let layer = tessera_tests::oci::tar(&files, 0o755);
    let config = json!({
        "Entrypoint": [entrypoint],
        "User": spec.user,
        "Env": ["PATH=/usr/local/bin"],
        "Labels": labels(spec.binary, revision),
    });
    write_layout(&name, spec.binary, &layer, config, opts)
}

/// The bundle image of the bundle in `dir` (generated, `cargo xtask
/// generate`): its files at the root, its annotations as labels.
fn write_bundle_image(dir: &Path, opts: &Options, revision: &str) -> Result<Built> {
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("{}/{BUNDLE_IMAGE}:{version}", opts.registry);
    let mut files = BTreeMap::new();
    for sub in ["manifests", "metadata"] {
        let from = dir.join(sub);
        for entry in std::fs::read_dir(&from)
            .with_context(|| format!("cannot list {} (run cargo xtask generate)", from.display()))?
        {
            let path = entry?.path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .context("bad file name")?;
            files.insert(format!("/{sub}/{file}"), read(&path)?);
        }
    }
    let annotations = dir.join("metadata/annotations.yaml");
    let annotations: serde_yaml::Value = serde_yaml::from_slice(&read(&annotations)?)
        .with_context(|| format!("{} is not YAML", annotations.display()))?;
    let mut labels = labels(BUNDLE_IMAGE, revision);
    for (key, value) in annotations["annotations"]
        .as_mapping()
        .into_iter()
        .flatten()
    {
        if let (Some(key), Some(value)) = (key.as_str(), value.as_str()) {
            labels[key] = json!(value);
        }
    }
    let layer = tessera_tests::oci::tar(&files, 0o644);
    let config = json!({ "Labels": labels });
    write_layout(&name, BUNDLE_IMAGE, &layer, config, opts)
}

/// Writes `<out>/<file>.oci.tar` (see [`tessera_tests::oci::write_archive`]).
fn write_layout(
    name: &str,
    file: &str,
    layer: &[u8],
    config: serde_json::Value,
    opts: &Options,
) -> Result<Built> {
    let archive = opts.out.join(format!("{file}.oci.tar"));
    let digest = tessera_tests::oci::write_archive(&archive, name, layer, config)?;
    Ok(Built {
        archive,
        name: name.to_owned(),
        digest,
    })
}

fn labels(title: &str, revision: &str) -> serde_json::Value {
    json!({
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.licenses": "Apache-2.0",
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
