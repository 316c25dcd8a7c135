//! Simulated nodes and pods for root-only tests and the demo: a bridge in
//! the host namespace holding the nodes' addresses, a network namespace per
//! pod joined to it by a veth pair (addresses from 198.18.0.0/15, the range
//! reserved for network testing; no route leads anywhere else), a cgroup
//! (v2) per pod, and Python's socket module as the pods' real TCP server and
//! client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A TCP server on both families: `python3 -c SERVER <port> <banner>`
/// prints `listening`, then answers every connection with the banner and
/// echoes what the client sends until the client ends it.
pub const SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
def echo(c):
    try:
        while True:
            data = c.recv(100)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    try:
        c.sendall(sys.argv[2].encode())
    except OSError:
        c.close()
        continue
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// A connection held open: `python3 -c HOLD <ip> <port> [<cert> <key>
/// <ca>]` connects (over TLS 1.3 with that client certificate, verifying
/// the server against `ca`, when they are given), prints
/// `connected <banner>`, sends each line of its stdin and prints
/// `echo <line>` for each answer, and `eof` or `error <errno>` when the
/// connection ends.
pub const HOLD: &str = r#"
import socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if len(sys.argv) > 5:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(sys.argv[5])
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    s = ctx.wrap_socket(s)
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    banner = s.recv(64).decode()
except OSError as e:
    print("error", e.errno, flush=True)
    sys.exit(0)
s.settimeout(None)
print("connected", banner, flush=True)
def watch():
    try:
        while True:
            data = s.recv(100)
            if not data:
                print("eof", flush=True)
                return
            print("echo", data.decode().strip(), flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
threading.Thread(target=watch, daemon=True).start()
for line in sys.stdin:
    try:
        s.sendall(line.encode())
    except OSError as e:
        print("error", e.errno, flush=True)
"#;

/// A connection a pod holds open (see [`HOLD`]).
#[derive(Debug)]
pub struct Held {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    /// What the client said once connected (`connected <banner>`), or why
    /// it could not connect.
    pub first: String,
}

impl Held {
    /// Opens a connection to `ip`:`port` from a process in `cgroup` and
    /// network namespace `ns`.
    pub fn open(cgroup: &Path, ns: Option<&str>, ip: &str, port: u16) -> Held {
        Self::spawn(cgroup, ns, &[ip, &port.to_string()])
    }

    /// Opens a TLS connection to `ip`:`port` from a process in `cgroup` and
    /// network namespace `ns`, presenting `cert` (with `key`) and verifying
    /// the server against `ca` (PEM files).
    pub fn open_tls(
        (cgroup, ns): (&Path, Option<&str>),
        (ip, port): (&str, u16),
        [cert, key, ca]: [&Path; 3],
    ) -> Held {
        let [cert, key, ca] = [cert, key, ca].map(|p| p.to_string_lossy().into_owned());
        Self::spawn(cgroup, ns, &[ip, &port.to_string(), &cert, &key, &ca])
    }

    fn spawn(cgroup: &Path, ns: Option<&str>, args: &[&str]) -> Held {
        let mut child = spawn_in_cgroup(cgroup, ns, "python3", &[&["-c", HOLD], args].concat());
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(out).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "nothing".to_owned());
        Held {
            child,
            stdin,
            lines,
            first,
        }
    }

    /// Whether the connection was made.
    pub fn connected(&self) -> bool {
        self.first.starts_with("connected")
    }

    /// Whether the connection still carries data both ways (within 2 s).
    pub fn alive(&mut self) -> bool {
        use std::io::Write;
        if writeln!(self.stdin, "ping").is_err() {
            return false;
        }
        matches!(self.lines.recv_timeout(Duration::from_secs(2)), Ok(l) if l == "echo ping")
    }

    /// Waits up to `limit` for the connection to end: how it ended
    /// (`eof`, `error <errno>`) and when, or None if it did not.
    pub fn ended_within(&mut self, limit: Duration) -> Option<(String, Duration)> {
        let start = std::time::Instant::now();
        while let Some(left) = limit.checked_sub(start.elapsed()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l == "eof" || l.starts_with("error") => return Some((l, start.elapsed())),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection attempt (IPv4 or IPv6, as `ip` is written):
/// `python3 -c CLIENT <ip> <port> <timeout>` prints
/// `ok <secs> <banner>`, `errno <n> <secs>` or `timeout <secs>`.
pub const CLIENT: &str = r#"
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    data = s.recv(64).decode()
    print("ok %.6f %s" % (time.monotonic() - t, data))
except socket.timeout:
    print("timeout %.6f" % (time.monotonic() - t))
except OSError as e:
    print("errno %d %.6f" % (e.errno, time.monotonic() - t))
"#;

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

/// The IPv6 /64 of the test topology (a unique local prefix: no route
/// leads anywhere else).
pub const IPV6_PREFIX: &str = "fd18:7e55";

/// A test network: a bridge in the host namespace holding the simulated
/// nodes' addresses, and one network namespace per pod joined to it by a
/// veth pair. Addresses are from 198.18.0.0/15; no route leads elsewhere.
/// Everything is removed on drop.
#[derive(Debug)]
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
        self.pod_with(&[ip])
    }

    /// A pod network namespace with every address of `ips` (IPv4 ones in
    /// 198.18.0.0/15, IPv6 ones in one /64 shared by the topology, such as
    /// [`IPV6_PREFIX`]`::10`); its name.
    pub fn pod_with(&self, ips: &[&str]) -> String {
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
        for ip in ips {
            if ip.contains(':') {
                // No duplicate address detection: usable at once.
                let cidr = format!("{ip}/64");
                exec(&["-6", "addr", "add", &cidr, "dev", &inner, "nodad"]);
            } else {
                exec(&["addr", "add", &format!("{ip}/15"), "dev", &inner]);
            }
        }
        exec(&["link", "set", &inner, "up"]);
        exec(&["link", "set", "lo", "up"]);
        ns
    }

    /// Makes every namespace of the topology (and the host) forget the
    /// link-layer address of `ip`, as a gratuitous ARP from its new owner
    /// would: the next packet asks again.
    pub fn forget_neighbor(&self, ip: &str) {
        let _ = Command::new("ip")
            .args(["neigh", "flush", "to", ip])
            .status();
        for ns in self.namespaces.lock().unwrap().iter() {
            let _ = Command::new("ip")
                .args(["-n", ns, "neigh", "flush", "to", ip])
                .status();
        }
    }

    /// Cuts a pod's namespace off the bridge (its veth's host side down), as
    /// a node that died is: nothing it sends, a FIN or a reset included,
    /// reaches anyone any more.
    pub fn cut_off(&self, ns: &str) {
        if let Some(n) = ns.rsplit_once('-').map(|(_, n)| n) {
            sh(
                "ip",
                &["link", "set", &format!("tsh{}x{n}", self.tag), "down"],
            );
        }
    }

    /// Removes a pod's namespace and its veth pair (at once, even while
    /// something still holds the namespace open).
    pub fn remove_pod(&self, ns: &str) {
        if let Some(n) = ns.rsplit_once('-').map(|(_, n)| n) {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("tsh{}x{n}", self.tag)])
                .status();
        }
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
#[derive(Debug)]
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn create(path: PathBuf) -> Cgroup {
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {} (run as root): {e}", path.display()));
        Cgroup(path)
    }

    /// Starts `program args...` in this cgroup and in network namespace `ns`
    /// (the host's when `ns` is empty).
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        spawn_in_cgroup(&self.0, Some(ns).filter(|n| !n.is_empty()), program, args)
    }
}

/// Starts `program args...` (stdin, stdout and stderr piped) as a member of the
/// cgroup at `cgroup` and, when given, inside network namespace `ns`.
pub fn spawn_in_cgroup(cgroup: &Path, ns: Option<&str>, program: &str, args: &[&str]) -> Child {
    let netns = ns.map_or(String::new(), |ns| format!("ip netns exec {ns} "));
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {netns}\"$0\" \"$@\"",
        cgroup.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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

/// Lines a child writes to stderr, kept, and echoed to this process's
/// stderr under `tag` when `echo`.
pub fn collect_stderr(
    child: &mut Child,
    tag: &str,
    echo: bool,
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
            if echo {
                eprintln!("[{tag}] {line}");
            }
            keep.lock().unwrap().push(line);
        }
    });
    lines
}

/// One TCP connection attempt from a process in `cgroup` and network
/// namespace `ns` to `ip`:`port`, as [`CLIENT`] reports it.
pub fn connect(cgroup: &Cgroup, ns: &str, ip: &str, port: u16, timeout: Duration) -> String {
    let out = cgroup
        .spawn_in(
            ns,
            "python3",
            &[
                "-c",
                CLIENT,
                ip,
                &port.to_string(),
                &timeout.as_secs_f64().to_string(),
            ],
        )
        .wait_with_output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts [`SERVER`] in `cgroup` and `ns` on `port` answering `banner`, and
/// waits until it listens.
pub fn serve(cgroup: &Cgroup, ns: &str, port: u16, banner: &str) -> Child {
    let mut server = cgroup.spawn_in(ns, "python3", &["-c", SERVER, &port.to_string(), banner]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        "listening",
        "the server for {banner} did not start"
    );
    server
}
