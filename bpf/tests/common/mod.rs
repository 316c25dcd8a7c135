//! What the tests that attach programs to a real cgroup share: a private
//! bpffs, a cgroup tree `<top>/pod/ctr`, and processes of that pod.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tessera_bpf::abi::consts::{TS_RULE_AUTH, TS_VERDICT_ALLOW};
use tessera_bpf::abi::{Endpoint, PolicyKey, PolicyValue};
use tessera_bpf::datapath::Datapath;
use tessera_bpf::pinning;

/// The pod the tests' processes belong to (mapped by its cgroup).
pub const POD: Endpoint = Endpoint {
    id: 300,
    node: 1,
    gen_: 4,
};
/// The pod serving on 127.0.0.1 in the tests.
pub const SERVER: Endpoint = Endpoint {
    id: 400,
    node: 1,
    gen_: 9,
};

/// A rule of SERVER's allowing TCP from numeric identity `from` to `port`,
/// authenticated when `auth`.
pub fn allow(from: u32, port: u16, auth: bool) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey {
            local: SERVER.id,
            remote: from,
            port,
            proto: 6,
            pad: 0,
        },
        PolicyValue {
            verdict: TS_VERDICT_ALLOW as u8,
            flags: if auth { TS_RULE_AUTH as u8 } else { 0 },
            pad: [0; 2],
        },
    )
}

pub fn cgroup2_root() -> PathBuf {
    std::env::var_os("TESSERA_CGROUP2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// A private bpffs mount and a cgroup tree `<top>/pod/ctr`, both removed on drop.
pub struct Fixture {
    pub bpffs: tempfile::TempDir,
    pub top: PathBuf,
}

impl Fixture {
    pub fn new(tag: &str) -> Result<Fixture> {
        let root = cgroup2_root();
        if !root.join("cgroup.procs").exists() {
            bail!(
                "no cgroup v2 hierarchy at {}; mount one or set TESSERA_CGROUP2_ROOT (this test needs root)",
                root.display()
            );
        }
        let bpffs = tempfile::tempdir()?;
        pinning::ensure_bpffs(bpffs.path()).context("mounting bpffs (needs root)")?;
        let top = root.join(format!("tessera-bpf-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(top.join("pod/ctr"))?;
        Ok(Fixture { bpffs, top })
    }

    pub fn pin_dir(&self) -> PathBuf {
        pinning::version_dir(&self.bpffs.path().join("tessera"))
    }

    /// Tries a TCP connect to `port` on 127.0.0.1 from a process in the
    /// container cgroup: Ok(()) or the shell's error text.
    pub fn connect_from_pod(&self, port: u16) -> Result<(), String> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/127.0.0.1/{port}",
            self.top.join("pod/ctr").display()
        );
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Datapath::remove_pins(&self.pin_dir());
        let _ = Command::new("umount").arg(self.bpffs.path()).status();
        for dir in ["pod/ctr", "pod", ""] {
            let _ = std::fs::remove_dir(self.top.join(dir));
        }
    }
}

/// A process of the pod (in `<top>/pod/ctr`) holding one TCP connection and
/// echoing what it receives; it prints `connected` once it holds it, and
/// `error <errno>` or `eof` when the connection ends.
pub struct PodConn {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

const POD_CONN: &str = r#"
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
mode, host, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "connect":
    s = socket.create_connection((host, port))
else:
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port))
    l.listen()
    print("listening", flush=True)
    s, _ = l.accept()
print("connected", flush=True)
try:
    while True:
        data = s.recv(100)
        if not data:
            print("eof", flush=True)
            break
        s.sendall(data)
except OSError as e:
    print("error", e.errno, flush=True)
"#;

impl PodConn {
    /// A pod process that connects to `to`.
    pub fn connect(fx: &Fixture, to: std::net::SocketAddr) -> Result<PodConn> {
        let mut conn = Self::spawn(fx, "connect", to)?;
        conn.expect("connected")?;
        Ok(conn)
    }

    /// A pod process listening on `at`, accepting one connection (wait for
    /// it with [`PodConn::expect`]`("connected")`).
    pub fn listen(fx: &Fixture, at: std::net::SocketAddr) -> Result<PodConn> {
        let mut conn = Self::spawn(fx, "listen", at)?;
        conn.expect("listening")?;
        Ok(conn)
    }

    fn spawn(fx: &Fixture, mode: &str, addr: std::net::SocketAddr) -> Result<PodConn> {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", POD_CONN])
            .arg(fx.top.join("pod/ctr"))
            .args([mode, &addr.ip().to_string(), &addr.port().to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running /usr/bin/python3")?;
        let out = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(PodConn { child, lines })
    }

    /// The next line the process prints (within 5 s); fails unless it
    /// starts with `want`.
    pub fn expect(&mut self, want: &str) -> Result<String> {
        let line = self
            .lines
            .recv_timeout(std::time::Duration::from_secs(5))
            .with_context(|| format!("the pod process did not say {want:?} within 5 s"))?;
        if !line.starts_with(want) {
            bail!("the pod process said {line:?}, expected {want:?}");
        }
        Ok(line.trim().to_owned())
    }
}

impl Drop for PodConn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
