//! File-based catalogs of the bundle, as a release would publish them:
//! `opm init` for the package, `opm render` of the bundle directory (its
//! image set to where the bundle image is), and one channel.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tessera_api::install::olm::{CHANNEL, PACKAGE};

/// Runs `bin` with `args`; its standard output, or an error with both
/// streams.
pub fn output(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}):\n{}{}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Writes under `<dir>/<package>/` a catalog of the package whose channel
/// holds `channel_entry`, with the bundle of `bundle_dir` (its `image` set
/// to `image`). Fails when the rendered bundle lists no agent image.
pub fn write(
    opm: &Path,
    bundle_dir: &Path,
    image: &str,
    dir: &Path,
    channel_entry: &str,
) -> Result<()> {
    let package = dir.join(PACKAGE);
    std::fs::create_dir_all(&package)?;
    let init = output(
        opm,
        &[
            "init",
            PACKAGE,
            &format!("--default-channel={CHANNEL}"),
            "--output=yaml",
        ],
    )?;
    let bundle_dir = bundle_dir.to_str().context("bundle path")?;
    let rendered = output(opm, &["render", bundle_dir, "--output=yaml"])?;
    let mut bundle: serde_yaml::Value = serde_yaml::from_str(&rendered)?;
    if bundle["schema"] != "olm.bundle" {
        bail!("opm render gave no olm.bundle: {rendered}");
    }
    let related = bundle["relatedImages"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    if !related.iter().any(|i| i["name"] == "tessera-agent") {
        bail!("the rendered bundle lists no agent image: {rendered}");
    }
    bundle["image"] = image.into();
    let channel = format!(
        "schema: olm.channel\npackage: {PACKAGE}\nname: {CHANNEL}\nentries:\n- name: {channel_entry}\n"
    );
    std::fs::write(package.join("package.yaml"), init)?;
    std::fs::write(package.join("bundle.yaml"), serde_yaml::to_string(&bundle)?)?;
    std::fs::write(package.join("channel.yaml"), channel)?;
    Ok(())
}

/// The name of the CSV of the bundle in `bundle_dir`.
pub fn csv_name(bundle_dir: &Path) -> Result<String> {
    let path = bundle_dir.join("manifests/tessera.clusterserviceversion.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let csv: serde_yaml::Value = serde_yaml::from_str(&text)?;
    csv["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .context("the CSV has no name")
}
