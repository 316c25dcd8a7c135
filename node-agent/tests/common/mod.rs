//! Helpers shared by the agent's root-only tests: pod cgroups (cgroup v2)
//! with a real client process inside.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn cgroup2_root() -> PathBuf {
    std::env::var_os("TESSERA_CGROUP2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// A pod cgroup `<root>/tessera-test-<pid>-<tag>/kubepods/pod<uid>`, removed on drop.
pub struct PodCgroup {
    top: PathBuf,
    leaf: PathBuf,
}

impl PodCgroup {
    pub fn create(tag: &str, uid: &str) -> PodCgroup {
        let root = cgroup2_root();
        assert!(
            root.join("cgroup.procs").exists(),
            "no cgroup v2 hierarchy at {}; mount one or set TESSERA_CGROUP2_ROOT (this test needs root)",
            root.display()
        );
        let top = root.join(format!("tessera-test-{}-{tag}", std::process::id()));
        let leaf = top.join("kubepods").join(format!("pod{uid}"));
        std::fs::create_dir_all(&leaf)
            .unwrap_or_else(|e| panic!("cannot create {} (run as root): {e}", leaf.display()));
        PodCgroup { top, leaf }
    }

    /// Starts the agent's fetch client inside this cgroup.
    pub fn spawn_client(&self, socket: &Path, extra: &[&str]) -> Child {
        let socket = socket.to_str().unwrap();
        let mut args = vec!["fetch-x509", "--socket", socket];
        args.extend_from_slice(extra);
        self.spawn(Path::new(env!("CARGO_BIN_EXE_tessera-agent")), &args)
    }

    /// Runs `program args...` inside this cgroup to completion: (success, stdout, stderr).
    pub fn run(&self, program: &Path, args: &[&str]) -> (bool, String, String) {
        let out = self.spawn(program, args).wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl PodCgroup {
    /// Starts `program args...` inside this cgroup.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            self.leaf.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Kill whatever a failed test left inside, then remove leaf first.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.leaf).is_ok() || !self.leaf.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(self.leaf.parent().unwrap());
        let _ = std::fs::remove_dir(&self.top);
    }
}

pub use tessera_tests::procs::KillOnDrop as Proc;

/// Starts `tessera-agent run` for `node` against the control plane at
/// `kubeconfig`, with a token file and a socket under `dir`.
pub fn spawn_agent(
    kubeconfig: &Path,
    node: &str,
    signer_port: u16,
    token: &str,
    dir: &Path,
) -> (Proc, PathBuf) {
    let token_file = dir.join(format!("{node}.token"));
    std::fs::write(&token_file, token).unwrap();
    let socket = dir.join(format!("{node}.sock"));
    let bin = Path::new(env!("CARGO_BIN_EXE_tessera-agent"));
    let child =
        tessera_tests::procs::agent_run(bin, kubeconfig, node, signer_port, &token_file, &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    (Proc(child), socket)
}

/// Retries `tessera-agent fetch-x509` in `cgroup` until it succeeds (the pod
/// needs an identity and the agent an SVID first); its stdout.
pub async fn first_fetch(cgroup: &PodCgroup, socket: &Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = cgroup.spawn_client(socket, &[]).wait_with_output().unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SVID within 60 s; last answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (installed by cargo xtask test): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test network: a bridge in the host namespace holding the simulated
/// nodes' addresses, and one network namespace per pod joined to it by a
/// veth pair. Addresses are from 198.18.0.0/15; no route leads elsewhere.
/// Everything is removed on drop.
pub struct Topology {
    tag: String,
    bridge: String,
    namespaces: std::sync::Mutex<Vec<String>>,
    next: std::sync::atomic::AtomicU32,
}

impl Topology {
    pub fn create(node_ips: &[&str]) -> Topology {
        let tag = format!("{}", std::process::id() % 100_000);
        let bridge = format!("tsbr{tag}");
        sh("ip", &["link", "add", &bridge, "type", "bridge"]);
        sh("ip", &["link", "set", &bridge, "up"]);
        for ip in node_ips {
            sh("ip", &["addr", "add", &format!("{ip}/15"), "dev", &bridge]);
        }
        Topology {
            tag,
            bridge,
            namespaces: Default::default(),
            next: 0.into(),
        }
    }

    /// A pod network namespace with `ip`; its name.
    pub fn pod(&self, ip: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("ts{}-{n}", self.tag);
        let (host, inner) = (
            format!("tsh{}x{n}", self.tag),
            format!("tsp{}x{n}", self.tag),
        );
        sh("ip", &["netns", "add", &ns]);
        self.namespaces.lock().unwrap().push(ns.clone());
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &inner],
        );
        sh("ip", &["link", "set", &host, "master", &self.bridge, "up"]);
        sh("ip", &["link", "set", &inner, "netns", &ns]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        exec(&["addr", "add", &format!("{ip}/15"), "dev", &inner]);
        exec(&["link", "set", &inner, "up"]);
        exec(&["link", "set", "lo", "up"]);
        ns
    }

    /// Removes a pod's namespace (and with it its veth pair).
    pub fn remove_pod(&self, ns: &str) {
        sh("ip", &["netns", "del", ns]);
        self.namespaces.lock().unwrap().retain(|n| n != ns);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.lock().unwrap().drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A cgroup (v2) directory removed, with whatever runs in it, on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn create(path: PathBuf) -> Cgroup {
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {} (run as root): {e}", path.display()));
        Cgroup(path)
    }

    /// Starts `program args...` in this cgroup and in network namespace `ns`.
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {ns} \"$0\" \"$@\"",
            self.0.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Leaves first: remove every directory below, deepest first.
        let mut dirs = vec![self.0.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(read) = std::fs::read_dir(&dirs[i]) {
                for e in read.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(e.path());
                    }
                }
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Lines a child writes to stderr, echoed to the test's stderr and kept.
pub fn collect_stderr(
    child: &mut Child,
    tag: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = lines.clone();
    let tag = tag.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[{tag}] {line}");
            keep.lock().unwrap().push(line);
        }
    });
    lines
}
