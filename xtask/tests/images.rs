//! `cargo xtask images` writes OCI archives that a registry client reads,
//! with the same digests every time for the same binaries, and whose layer
//! alone runs the binary (no shell, no libraries from the host). Packages
//! the debug binaries `cargo xtask test` built before the tests (the
//! packaging is the same for release ones). Needs root (chroot) and skopeo (`cargo xtask deps`);
//! fails, never skips, without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const BINARIES: [&str; 3] = ["tessera-operator", "tessera-agent", "tessera-waypoint"];

fn images(out: &Path) -> Result<()> {
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["images", "--profile", "dev", "--no-build", "--out"])
        .arg(out)
        .status()
        .context("running xtask images")?;
    ensure!(status.success(), "xtask images failed: {status}");
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (installed by cargo xtask deps)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Unpacks `archive`'s image layer into a directory and runs the entrypoint
/// there with chroot: what it prints for `--version`.
fn run_from_layer(archive: &Path, work: &Path) -> Result<String> {
    let layout = work.join("layout");
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&layout)?;
    std::fs::create_dir_all(&rootfs)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&layout))?;
    let index = json(&layout.join("index.json"))?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .context("no manifest")?;
    let manifest = json(&blob(&layout, manifest))?;
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().context("no config")?,
    ))?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("no layer")?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(blob(&layout, layer))
        .arg("-C")
        .arg(&rootfs))?;
    ensure!(
        !rootfs.join("bin/sh").exists() && !rootfs.join("usr/bin").exists(),
        "the image holds more than the binary and its libraries"
    );
    let entrypoint = config["config"]["Entrypoint"][0]
        .as_str()
        .context("no entrypoint")?;
    run(Command::new("chroot")
        .arg(&rootfs)
        .arg(entrypoint)
        .arg("--version"))
}

#[test]
fn images_are_reproducible_readable_and_self_contained() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    images(&first)?;
    images(&second)?;
    for name in BINARIES {
        let archive = first.join(format!("{name}.oci.tar"));
        let again = second.join(format!("{name}.oci.tar"));
        ensure!(
            std::fs::read(&archive)? == std::fs::read(&again)?,
            "{name}: two builds of the same binaries differ"
        );
        let reference = format!("oci-archive:{}", archive.display());
        let inspected: serde_json::Value =
            serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &reference]))?)?;
        println!(
            "{name}: {} ({} layer)",
            inspected["Digest"],
            inspected["Layers"].as_array().map_or(0, Vec::len)
        );
        ensure!(inspected["Architecture"] == "amd64" && inspected["Os"] == "linux");
        let config: serde_json::Value = serde_json::from_str(&run(
            Command::new("skopeo").args(["inspect", "--config", &reference])
        )?)?;
        let user = config["config"]["User"].as_str().unwrap_or("");
        ensure!(
            user == "65532:65532" || name == "tessera-agent",
            "{name} runs as {user:?}, not as a non-root user"
        );
        // A copy reads every blob, layers included, and checks its digest.
        let copy = dir.path().join(format!("{name}.copy"));
        run(Command::new("skopeo").args(["copy", &reference, &format!("dir:{}", copy.display())]))?;
        let version = run_from_layer(&archive, &dir.path().join(name))?;
        ensure!(
            version.contains(name) && version.contains(env!("CARGO_PKG_VERSION")),
            "{name} --version in its image printed {version:?}"
        );
    }
    Ok(())
}

#[test]
fn the_bundle_image_holds_the_bundle_labelled_with_its_annotations() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    images(&first)?;
    images(&second)?;
    let archive = first.join("tessera-bundle.oci.tar");
    ensure!(
        std::fs::read(&archive)? == std::fs::read(second.join("tessera-bundle.oci.tar"))?,
        "two builds of the same bundle differ"
    );
    let reference = format!("oci-archive:{}", archive.display());
    let config: serde_json::Value = serde_json::from_str(&run(
        Command::new("skopeo").args(["inspect", "--config", &reference])
    )?)?;
    let labels = &config["config"]["Labels"];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../olm/bundle");
    let annotations: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("metadata/annotations.yaml"),
    )?)?;
    let annotations = annotations["annotations"]
        .as_mapping()
        .context("no annotations")?;
    ensure!(!annotations.is_empty());
    for (key, value) in annotations {
        let key = key.as_str().context("annotation key")?;
        ensure!(
            labels[key].as_str() == value.as_str(),
            "label {key} is {:?}, the annotation {value:?}",
            labels[key]
        );
    }
    // The layer holds the bundle's files, byte for byte, and nothing else.
    let unpacked = dir.path().join("unpacked");
    run(Command::new("skopeo").args(["copy", &reference, &format!("dir:{}", unpacked.display())]))?;
    let manifest = json(&unpacked.join("manifest.json"))?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("no layer")?;
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(unpacked.join(layer.trim_start_matches("sha256:")))
        .arg("-C")
        .arg(&rootfs))?;
    let mut found = 0;
    for sub in ["manifests", "metadata"] {
        for entry in std::fs::read_dir(root.join(sub))? {
            let path = entry?.path();
            let copy = rootfs.join(sub).join(path.file_name().unwrap());
            ensure!(
                std::fs::read(&path)? == std::fs::read(&copy)?,
                "{} differs in the image",
                copy.display()
            );
            found += 1;
        }
    }
    let in_image = ["manifests", "metadata"]
        .iter()
        .map(|sub| std::fs::read_dir(rootfs.join(sub)).map(Iterator::count))
        .sum::<std::io::Result<usize>>()?;
    ensure!(
        in_image == found,
        "the image holds {in_image} files, the bundle {found}"
    );
    ensure!(
        std::fs::read_dir(&rootfs)?.count() == 2,
        "more than the bundle at the image root"
    );
    Ok(())
}
