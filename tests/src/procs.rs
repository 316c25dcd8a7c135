//! Tessera's own binaries as child processes, started the same way by the
//! tests, the demo and the benchmarks: `tessera-operator run` and
//! `tessera-agent run` against a test control plane, and a guard that kills a
//! child when dropped.

use std::path::Path;
use std::process::{Child, Command};

/// The name on the signer's certificate that agents check.
pub const SIGNER_NAME: &str = "tessera-signer.tessera-system.svc";
/// The namespace the operator runs in and agents read the bundle from.
pub const NAMESPACE: &str = "tessera-system";

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tessera-operator run` for `trust_domain` in [`NAMESPACE`] against
/// `kubeconfig`; callers add the rest (`--metrics-addr`, `--signer-addr`,
/// `--lease-duration`, ...) and where its output goes.
pub fn operator_run(bin: &Path, kubeconfig: &Path, trust_domain: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--trust-domain",
        trust_domain,
        "--namespace",
        NAMESPACE,
    ])
    .arg("--kubeconfig")
    .arg(kubeconfig);
    cmd
}

/// `tessera-agent run` for `node` against `kubeconfig`, asking the signer on
/// loopback `signer_port` with the token in `token_file`, serving `socket`.
pub fn agent_run(
    bin: &Path,
    kubeconfig: &Path,
    node: &str,
    signer_port: u16,
    token_file: &Path,
    socket: &Path,
) -> Command {
    // For memory investigations: TESSERA_AGENT_HEAPTRACK=<dir> runs every
    // agent under heaptrack, writing <dir>/heaptrack.<node>.*.
    let mut cmd = match std::env::var_os("TESSERA_AGENT_HEAPTRACK") {
        Some(dir) => {
            let mut cmd = Command::new("heaptrack");
            cmd.arg("-o")
                .arg(Path::new(&dir).join(format!("heaptrack.{node}")))
                .arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.args(["run", "--node-name", node, "--namespace", NAMESPACE])
        .args(["--signer-name", SIGNER_NAME])
        .arg(format!("--signer=https://127.0.0.1:{signer_port}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--token-file")
        .arg(token_file)
        .arg("--socket")
        .arg(socket)
        .arg("--metrics-addr=127.0.0.1:0");
    cmd
}
