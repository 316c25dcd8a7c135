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

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

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
    let mut files = BTreeMap::new();
    files.insert(entrypoint.clone(), read(binary)?);
    for lib in linked_libraries(binary)? {
        // Read through symlinks: the image holds the file at the path the
        // loader asks for.
        let bytes = read(Path::new(&lib))?;
        files.insert(lib, bytes);
    }
    let layer = tar(&files, 0o755);
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
    let layer = tar(&files, 0o644);
    let config = json!({ "Labels": labels });
    write_layout(&name, BUNDLE_IMAGE, &layer, config, opts)
}

/// Writes `<out>/<file>.oci.tar`: an OCI layout of one image named `name`
/// with the single `layer` and the runtime `config`.
fn write_layout(
    name: &str,
    file: &str,
    layer: &[u8],
    config: serde_json::Value,
    opts: &Options,
) -> Result<Built> {
    let version = env!("CARGO_PKG_VERSION");
    let labels = config["Labels"].clone();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [sha256(layer)] },
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
        "annotations": labels,
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["annotations"] = json!({
        "org.opencontainers.image.ref.name": version,
        "io.containerd.image.name": name,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry],
    }))?;
    let mut layout = BTreeMap::new();
    layout.insert(
        "oci-layout".to_owned(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    layout.insert("index.json".to_owned(), index);
    for blob in [layer, &config, &manifest] {
        let hex = hex_sha256(blob);
        layout.insert(format!("blobs/sha256/{hex}"), blob.to_vec());
    }
    let archive = opts.out.join(format!("{file}.oci.tar"));
    std::fs::write(&archive, tar(&layout, 0o644))
        .with_context(|| format!("cannot write {}", archive.display()))?;
    Ok(Built {
        archive,
        name: name.to_owned(),
        digest: sha256(&manifest),
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

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256(blob), "size": blob.len() })
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(bytes))
}

/// The absolute paths of the shared libraries `binary` loads, the dynamic
/// loader included, as `ldd` reports them.
fn linked_libraries(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd (Debian package libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output (`name => /path (addr)` or
/// `/path (addr)`; the vDSO has none).
fn parse_ldd(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// A tar stream (ustar) of `files` (path, leading `/` dropped -> bytes),
/// each with `mode`, and the directories above them, in sorted order;
/// owner 0, time 0.
fn tar(files: &BTreeMap<String, Vec<u8>>, mode: u32) -> Vec<u8> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let path = path.trim_start_matches('/');
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            at += i + 1;
            dirs.insert(path[..at].to_owned());
        }
    }
    let mut out = Vec::new();
    for dir in &dirs {
        out.extend(header(dir, 0o755, 0, b'5'));
    }
    for (path, bytes) in files {
        out.extend(header(
            path.trim_start_matches('/'),
            mode,
            bytes.len(),
            b'0',
        ));
        out.extend(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// One ustar header block. Paths longer than 100 bytes are split into
/// prefix and name at a `/`.
fn header(path: &str, mode: u32, size: usize, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let (prefix, name) = if path.len() > 100 {
        let cut = path[..path.len().min(155)].rfind('/').unwrap_or(0);
        (&path[..cut], &path[cut + 1..])
    } else {
        ("", path)
    };
    h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size as u64);
    octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len().min(155)]
        .copy_from_slice(&prefix.as_bytes()[..prefix.len().min(155)]);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let field = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(field.as_bytes());
    h
}

/// Writes `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(&text.as_bytes()[text.len() - field.len()..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_paths_to_copy() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn tar_headers_carry_a_valid_checksum_and_no_owner_or_time() {
        let mut files = BTreeMap::new();
        files.insert("/usr/local/bin/x".to_owned(), b"hello".to_vec());
        let t = tar(&files, 0o755);
        // usr/, usr/local/, usr/local/bin/, the file (one block of data),
        // and two zero blocks.
        assert_eq!(t.len(), 512 * 7);
        let file = &t[512 * 3..512 * 4];
        assert_eq!(&file[..16], b"usr/local/bin/x\0");
        assert_eq!(&file[124..136], b"00000000005\0");
        assert_eq!(&file[136..148], b"00000000000\0");
        let mut blank = file.to_vec();
        blank[148..156].copy_from_slice(b"        ");
        let sum: u32 = blank.iter().map(|b| u32::from(*b)).sum();
        let stored = std::str::from_utf8(&file[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&t[512 * 4..512 * 4 + 5], b"hello");
    }
}
