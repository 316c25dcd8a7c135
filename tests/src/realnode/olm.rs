//! OLM v0 on the real node, as a cluster runs it: its CRDs, the `olm` and
//! `catalog` operators (host processes with the admin kubeconfig), the
//! images its bundle unpack job runs (`opm`, and a util image with
//! busybox's `cp` and OLM's `cpb`), and a catalog of the bundle served by
//! `opm serve` on the bridge's address, which a CatalogSource names by
//! address (no registry pod, nothing pulled).
//!
//! Both operators serve metrics on :8080 unless given a certificate, so
//! the catalog operator gets a self-signed one and serves on :8443.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::{GATEWAY, LOGS, RealNode};
use crate::procs::KillOnDrop;
use crate::testbin::{OLM_VERSION, OPERATOR_REGISTRY_VERSION};
use crate::{ControlPlane, TestBins, free_port};

/// OLM's namespace: its catalog sources and bundle unpack jobs.
pub const OLM_NAMESPACE: &str = "olm";
/// The CatalogSource of Tessera's catalog.
pub const CATALOG_SOURCE: &str = "tessera-catalog";
/// The bundle image's repository (`cargo xtask images`).
const BUNDLE_REPOSITORY: &str = "localhost/tessera/tessera-bundle";
/// Where busybox-static (Debian) installs busybox.
const BUSYBOX: &str = "/bin/busybox";

/// OLM running against a control plane, for a real node. Dropping it stops
/// its processes and keeps their logs in [`LOGS`].
#[derive(Debug)]
pub struct Olm {
    dir: PathBuf,
    procs: Vec<KillOnDrop>,
}

impl Olm {
    /// Installs OLM's CRDs, imports the images its unpack jobs run into
    /// `node`, and starts `olm` and `catalog`.
    pub fn start(cp: &ControlPlane, node: &RealNode) -> Result<Olm> {
        let bins = TestBins::locate()?;
        let dir = cp.dir().join("olm");
        std::fs::create_dir_all(&dir)?;
        let crds = bins.olm.crds.to_str().context("CRD path")?;
        cp.kubectl_output(&["apply", "--server-side", "-f", crds])?;
        cp.kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ])?;
        cp.kubectl_output(&["create", "namespace", OLM_NAMESPACE])?;
        let (opm_image, util_image) = import_unpack_images(&bins, node, &dir)?;
        let mut olm = Olm {
            dir,
            procs: Vec::new(),
        };
        let kubeconfig = cp.kubeconfig();
        olm.spawn(
            "olm",
            Command::new(&bins.olm.olm)
                .env("KUBECONFIG", kubeconfig)
                .args([
                    "--namespace",
                    OLM_NAMESPACE,
                    "--writeStatusName=",
                    "--writePackageServerStatusName=",
                ]),
        )?;
        let (cert, key) = olm.self_signed()?;
        olm.spawn(
            "catalog",
            Command::new(&bins.olm.catalog)
                .env("KUBECONFIG", kubeconfig)
                .args(["--namespace", OLM_NAMESPACE, "--writeStatusName="])
                .args(["--opmImage", &opm_image, "--util-image", &util_image])
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key),
        )?;
        Ok(olm)
    }

    /// Writes a catalog of the bundle in `bundle_dir` whose bundle image is
    /// the imported archive's digest (OLM pulls tags always, digests only
    /// when absent), serves it with `opm serve` on all addresses (the
    /// catalog operator reaches it at [`GATEWAY`]), and returns the
    /// CatalogSource naming it by address.
    pub fn serve_catalog(&mut self, bundle_dir: &Path, bundle_digest: &str) -> Result<String> {
        let bins = TestBins::locate()?;
        let configs = self.dir.join("catalog");
        let image = format!("{BUNDLE_REPOSITORY}@{bundle_digest}");
        let entry = crate::olm::catalog::csv_name(bundle_dir)?;
        crate::olm::catalog::write(&bins.opm, bundle_dir, &image, &configs, &entry)?;
        let port = free_port()?;
        let termination = self.dir.join("opm-termination.log");
        self.spawn(
            "opm-serve",
            Command::new(&bins.opm)
                .arg("serve")
                .arg(&configs)
                .args(["--port", &port.to_string(), "--pprof-addr", "127.0.0.1:0"])
                .arg("--termination-log")
                .arg(termination),
        )?;
        Ok(format!(
            "apiVersion: operators.coreos.com/v1alpha1\nkind: CatalogSource\n\
             metadata: {{name: {CATALOG_SOURCE}, namespace: {OLM_NAMESPACE}}}\n\
             spec:\n  sourceType: grpc\n  address: \"{GATEWAY}:{port}\"\n  displayName: Tessera (test)\n  publisher: Tessera\n"
        ))
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.push(KillOnDrop(child));
        Ok(())
    }

    /// A self-signed serving certificate and key for the catalog operator's
    /// metrics.
    fn self_signed(&self) -> Result<(PathBuf, PathBuf)> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let (cert, key) = (self.dir.join("tls.crt"), self.dir.join("tls.key"));
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.signing_key.serialize_pem())?;
        Ok((cert, key))
    }
}

impl Drop for Olm {
    fn drop(&mut self) {
        self.procs.clear();
        let logs = std::env::temp_dir().join(LOGS);
        let _ = std::fs::create_dir_all(&logs);
        for name in ["olm", "catalog", "opm-serve"] {
            let file = format!("{name}.log");
            let _ = std::fs::copy(self.dir.join(&file), logs.join(file));
        }
    }
}

/// Builds and imports the images OLM's bundle unpack job runs: `opm` (with
/// the libraries it links; OLM runs it by name) and the util image
/// (`/bin/cp`, busybox; `/bin/cpb`). Returns their names.
fn import_unpack_images(bins: &TestBins, node: &RealNode, dir: &Path) -> Result<(String, String)> {
    let opm_image = format!("localhost/tessera-test/opm:v{OPERATOR_REGISTRY_VERSION}");
    let util_image = format!("localhost/tessera-test/olm-util:v{OLM_VERSION}");
    let opm_files = crate::oci::binary_files(&bins.opm, "/bin/opm")?;
    let mut util_files = crate::oci::binary_files(&bins.olm.cpb, "/bin/cpb")?;
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("cannot read {BUSYBOX} (Debian package busybox-static)"))?;
    util_files.insert("/bin/cp".to_owned(), busybox);
    for (file, name, files) in [
        ("opm", &opm_image, opm_files),
        ("olm-util", &util_image, util_files),
    ] {
        let layer = crate::oci::tar(&files, 0o755);
        let config = serde_json::json!({ "Env": ["PATH=/bin"] });
        let archive = dir.join(format!("{file}.oci.tar"));
        crate::oci::write_archive(&archive, name, &layer, config)?;
        node.import(&archive)?;
    }
    Ok((opm_image, util_image))
}
