//! Shared by the operator's process-level tests: the `tessera-operator run`
//! binary as a child process, and reading its metrics endpoint.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

use anyhow::Result;
use tessera_tests::procs::operator_run;
use tessera_tests::{ControlPlane, free_port};

/// A plain HTTP/1.1 GET over TCP; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    tessera_tests::http_get(port, path)
}

/// The value of a metric without labels, from /metrics.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    tessera_tests::metric(port, name)
}

pub struct RunningOperator {
    pub child: std::process::Child,
    pub port: u16,
}

impl RunningOperator {
    /// Starts `tessera-operator run`; its log is kept for [`Self::terminate`].
    pub fn start(cp: &ControlPlane, lease_seconds: u64) -> Result<RunningOperator> {
        Self::start_with(cp, lease_seconds, Stdio::piped())
    }

    /// Starts it with stderr going to `stderr` (not piped, for long runs
    /// whose log would fill a pipe nobody reads).
    pub fn start_with(
        cp: &ControlPlane,
        lease_seconds: u64,
        stderr: Stdio,
    ) -> Result<RunningOperator> {
        let port = free_port()?;
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tessera-operator"));
        let child = operator_run(bin, cp.kubeconfig(), "cluster.test")
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .arg(format!("--lease-duration={lease_seconds}"))
            .arg("--signer-addr=127.0.0.1:0")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()?;
        Ok(RunningOperator { child, port })
    }

    pub fn is_leader(&self) -> bool {
        metric(self.port, "tessera_operator_leader") == Some(1.0)
    }

    /// Sends SIGTERM and returns (exit success, stderr).
    pub async fn terminate(mut self) -> Result<(bool, String)> {
        use std::time::{Duration, Instant};
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let exit = loop {
            if let Some(exit) = self.child.try_wait()? {
                break exit;
            }
            assert!(Instant::now() < deadline, "the operator ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut log = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut err, &mut log)?;
        }
        Ok((exit.success(), log))
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod grants;
