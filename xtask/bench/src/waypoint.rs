//! `cargo xtask bench waypoint` (root): the waypoint against haproxy 2.6
//! (Debian's) placed the same way, and the direct path, in one run on one
//! machine. etcd and kube-apiserver, the release operator and agents with
//! their eBPF programs, a client pod on node-a and a server pod on node-b
//! (network namespaces); the upstream is fortio's echo server in the server
//! pod, answering 1 KiB bodies; the load is fortio's, from the client pod.
//!
//! - direct: the upstream's own port, with no HTTP rules (the L4 data path
//!   and its mutual authentication only, as for the others);
//! - haproxy: in the server pod's namespace and cgroup (as a sidecar),
//!   listening on the pod's address and forwarding over loopback, with an
//!   ACL admitting only the client's address (HTTP/1.1 and h2c frontends,
//!   the backend in the client's protocol, as the waypoint does);
//! - waypoint: a port with HTTP rules (the client may GET `/echo`): node-b's
//!   agent's waypoint takes every connection and forwards over loopback.
//!
//! Processes are pinned: the load generator to CPU 0, the proxies and the
//! upstream to CPU 1. Figures: latency at a fixed 1,000 requests/s over 16
//! connections (p50 and p99, and what each proxy adds to the direct path),
//! CPU per request (user + system of the proxy process; the agent's
//! includes its own once-a-second passes), closed-loop requests per second
//! with the proxy on one core, RSS growth with 1,000 idle keep-alive
//! connections, and the time from an AuthPolicy change to the waypoint
//! enforcing it on a kept-alive connection.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_tests::cluster::{SimCluster, SimPod};
use tessera_tests::procs::KillOnDrop;
use tessera_tests::resources;

use crate::datapath::{agent_launch, start_agent};
use crate::report::{Figure, percentile};
use crate::system::{cpu_seconds, start_operator};

const NODES: [(&str, &str); 2] = [("node-a", "198.18.0.1"), ("node-b", "198.18.0.2")];
const CLIENT_IP: &str = "198.18.1.10";
const SERVER_IP: &str = "198.18.2.10";
/// The upstream behind the waypoint (the port with HTTP rules).
const WAYPOINT_PORT: u16 = 8080;
/// The upstream reached directly, and behind haproxy over loopback.
const DIRECT_PORT: u16 = 8081;
const HAPROXY_H1_PORT: u16 = 8082;
const HAPROXY_H2_PORT: u16 = 8083;
/// Fixed rate, connections, duration of each latency run.
const RATE: &str = "1000";
const CONNECTIONS: &str = "16";
const RUN: &str = "20s";
const CLOSED_LOOP_RUN: &str = "10s";
/// fortio's histogram resolution, seconds. Its buckets are this times
/// 1, 2, ... 11, 12, 14, ... 20, 25, ... 50, 60, ... 100, 120, ... 200, 250,
/// ... 500, 600, ... 1000: with 10 us, 10 us wide up to 110 us, 50 us
/// around 300 us, 100 us up to 1 ms, 200 us up to 2 ms, 500 us up to 5 ms
/// (a percentile is interpolated within its bucket).
const HISTOGRAM_RESOLUTION: &str = "0.00001";
/// Response body size.
const BODY: usize = 1024;
/// Idle keep-alive connections for the memory figure.
const IDLE: usize = 1000;
/// Policy changes timed.
const CHANGES: usize = 40;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: bench}
"#;

/// The server's rules: the client may GET /echo on the waypoint's port
/// (the upstream answers on any path, so a refused request would show as
/// 403 rather than a 200), and reach the other ports at L4; mutual
/// authentication everywhere.
fn policy(allowed: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: AuthPolicy
metadata: {{name: server, namespace: bench}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules:
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: {WAYPOINT_PORT}}}]
    http: [{{methods: [GET], paths: [{{type: Prefix, value: {allowed}}}]}}]
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: {DIRECT_PORT}}}, {{port: {HAPROXY_H1_PORT}}}, {{port: {HAPROXY_H2_PORT}}}]
"
    )
}

/// haproxy's configuration: one thread, an ACL on the client's address,
/// HTTP/1.1 and h2c frontends with a backend in the same protocol.
fn haproxy_config() -> String {
    format!(
        "global
  nbthread 1
  maxconn 5000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend h1
  bind {SERVER_IP}:{HAPROXY_H1_PORT}
  acl from_client src {CLIENT_IP}
  http-request deny unless from_client
  default_backend upstream_h1
frontend h2
  bind {SERVER_IP}:{HAPROXY_H2_PORT} proto h2
  acl from_client src {CLIENT_IP}
  http-request deny unless from_client
  default_backend upstream_h2
backend upstream_h1
  server up 127.0.0.1:{DIRECT_PORT}
backend upstream_h2
  server up 127.0.0.1:{DIRECT_PORT} proto h2
"
    )
}

/// Runs the benchmark; its figures.
pub async fn run(operator: &Path, agent: &Path) -> Result<Vec<Figure>> {
    let Some(cgroup_root) = tessera_tests::cluster::pod_cgroup_root("the waypoint benchmark")
    else {
        bail!("the waypoint benchmark needs root and cgroup v2 (run as root)");
    };
    tessera_bpf::pinning::ensure_bpffs(Path::new(tessera_tests::cluster::BPFFS))?;
    let bins = tessera_tests::TestBins::ensure_built()?;
    let haproxy = which("haproxy")?;
    let (cp, client) = resources::control_plane_with_crds().await?;
    resources::apply_manifest(&client, resources::TWO_NODES).await?;
    resources::apply_manifest(&client, OBJECTS).await?;
    let (_operator, signer_port, _) =
        start_operator(operator, &cp, &client, "waypoint-operator.log").await?;
    let tag = format!("tessera-waypoint-{}", std::process::id());
    let mut cluster = SimCluster::create(client.clone(), cgroup_root, &tag, &NODES).await;
    let dir = tempfile::tempdir()?;
    let launch = agent_launch(agent, &cp, signer_port, dir.path());
    start_agent(&mut cluster, &launch, "node-a").await?;
    let agent_pid = start_agent(&mut cluster, &launch, "node-b").await?;
    pin(agent_pid, 1)?;
    let pods = Pods {
        client: pod(&cluster, "client", "node-a", CLIENT_IP).await,
        server: pod(&cluster, "server", "node-b", SERVER_IP).await,
    };
    let fortio = bins.http.fortio.clone();
    let _upstreams = [WAYPOINT_PORT, DIRECT_PORT].map(|port| {
        let child = pods.server.cgroup.spawn_in(
            &pods.server.ns,
            "taskset",
            &[
                "-c",
                "1",
                &fortio.to_string_lossy(),
                "server",
                "-http-port",
                &port.to_string(),
                "-grpc-port",
                "disabled",
                "-redirect-port",
                "disabled",
                "-loglevel",
                "Error",
            ],
        );
        KillOnDrop(child)
    });
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, haproxy_config())?;
    let haproxy_proc = KillOnDrop(pods.server.cgroup.spawn_in(
        &pods.server.ns,
        "taskset",
        &[
            "-c",
            "1",
            &haproxy.to_string_lossy(),
            "-db",
            "-f",
            &config.to_string_lossy(),
        ],
    ));
    let haproxy_pid = child_pid(haproxy_proc.0.id())?;
    resources::server_side_apply(&client, &policy("/echo")).await?;
    cluster
        .agent("node-b")
        .wait_for("checking the port's HTTP requests", 1)
        .await;
    let bench = Bench {
        fortio,
        pods: &pods,
        waypoint_pid: agent_pid,
        haproxy_pid,
    };
    bench.until_ready().await?;
    let mut figures = vec![bench.idle_cpu()?];
    for http2 in [false, true] {
        figures.extend(bench.latency_and_cpu(http2)?);
    }
    figures.extend(bench.closed_loop()?);
    figures.extend(bench.idle_memory()?);
    figures.push(bench.policy_changes(&client).await?);
    drop(haproxy_proc);
    drop(cluster);
    drop(cp);
    Ok(figures)
}

struct Pods {
    client: SimPod,
    server: SimPod,
}

async fn pod(cluster: &SimCluster, name: &str, node: &str, ip: &str) -> SimPod {
    cluster.app_pod("bench", name, (node, ip), None).await
}

fn which(program: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{program} is not installed (cargo xtask bench installs it)");
    }
    Ok(PathBuf::from(path))
}

/// Pins every thread of `pid` to `core`.
fn pin(pid: u32, core: usize) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("cannot run taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset could not pin pid {pid} to core {core}");
    }
    Ok(())
}

/// The pid of the program a `sh -c 'exec ...'` wrapper with `pid` became
/// (the wrapper execs `ip netns exec`, which execs taskset, which execs
/// the program: the same pid throughout).
fn child_pid(pid: u32) -> Result<u32> {
    std::thread::sleep(Duration::from_millis(300));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("process {pid} is gone"))?;
    if comm.trim() != "haproxy" {
        bail!("process {pid} is {comm:?}, not haproxy");
    }
    Ok(pid)
}

/// One fortio run's results.
struct Run {
    p50: Duration,
    p99: Duration,
    requests: f64,
    ok: f64,
    qps: f64,
}

struct Bench<'a> {
    fortio: PathBuf,
    pods: &'a Pods,
    waypoint_pid: u32,
    haproxy_pid: u32,
}

/// The three ways to the upstream.
#[derive(Clone, Copy, PartialEq)]
enum Path3 {
    Direct,
    Haproxy,
    Waypoint,
}

impl Path3 {
    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Haproxy => "haproxy",
            Path3::Waypoint => "waypoint",
        }
    }

    fn port(self, http2: bool) -> u16 {
        match (self, http2) {
            (Path3::Direct, _) => DIRECT_PORT,
            (Path3::Haproxy, false) => HAPROXY_H1_PORT,
            (Path3::Haproxy, true) => HAPROXY_H2_PORT,
            (Path3::Waypoint, _) => WAYPOINT_PORT,
        }
    }
}

impl Bench<'_> {
    fn url(&self, path: Path3, http2: bool) -> String {
        format!("http://{SERVER_IP}:{}/echo?size={BODY}", path.port(http2))
    }

    /// One fortio load run from the client pod, pinned to CPU 0.
    fn load(&self, path: Path3, http2: bool, qps: &str, duration: &str) -> Result<Run> {
        let out_file = std::env::temp_dir().join(format!(
            "tessera-bench-fortio-{}-{}.json",
            std::process::id(),
            path.name()
        ));
        let fortio = self.fortio.to_string_lossy();
        let out_arg = out_file.to_string_lossy();
        let url = self.url(path, http2);
        let mut args = vec![
            "-c",
            "0",
            &fortio,
            "load",
            "-qps",
            qps,
            "-c",
            CONNECTIONS,
            "-t",
            duration,
            "-p",
            "50,99",
            // By default its first bucket is 0 to 1 ms: every latency below
            // 1 ms would be interpolated within it.
            "-r",
            HISTOGRAM_RESOLUTION,
            "-json",
            &out_arg,
            "-loglevel",
            "Error",
            "-a=false",
        ];
        if http2 {
            args.push("-h2");
        }
        args.push(&url);
        let out = self
            .pods
            .client
            .cgroup
            .spawn_in(&self.pods.client.ns, "taskset", &args)
            .wait_with_output()?;
        if !out.status.success() {
            bail!(
                "fortio load {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_file)?)?;
        let _ = std::fs::remove_file(&out_file);
        read_run(&json)
    }

    /// Waits until each path answers 200.
    async fn until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for path in [Path3::Direct, Path3::Haproxy, Path3::Waypoint] {
            loop {
                match self.load(path, false, "10", "1s") {
                    Ok(run) if run.ok > 0.0 && run.ok == run.requests => break,
                    _ if Instant::now() > deadline => {
                        bail!("{} does not answer 200 within 60 s", path.name())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        Ok(())
    }

    /// Latency at the fixed rate and CPU per request, for one protocol.
    fn latency_and_cpu(&self, http2: bool) -> Result<Vec<Figure>> {
        let proto = if http2 { "h2c" } else { "HTTP/1.1" };
        let direct = self.load(Path3::Direct, http2, RATE, RUN)?;
        let (haproxy, haproxy_cpu) = self.with_cpu(self.haproxy_pid, || {
            self.load(Path3::Haproxy, http2, RATE, RUN)
        })?;
        let (waypoint, waypoint_cpu) = self.with_cpu(self.waypoint_pid, || {
            self.load(Path3::Waypoint, http2, RATE, RUN)
        })?;
        for (name, run) in [
            ("direct", &direct),
            ("haproxy", &haproxy),
            ("waypoint", &waypoint),
        ] {
            println!(
                "{proto} {name}: p50 {:.3} ms, p99 {:.3} ms, {} requests, {} ok, {:.0}/s",
                ms(run.p50),
                ms(run.p99),
                run.requests,
                run.ok,
                run.qps
            );
        }
        if waypoint.ok != waypoint.requests || haproxy.ok != haproxy.requests {
            bail!(
                "a proxied request failed ({proto}): the figures would not compare like for like"
            );
        }
        let added = |run: &Run, p: fn(&Run) -> Duration| ms(p(run)) - ms(p(&direct));
        let at = format!("{proto}, {RATE} requests/s, {CONNECTIONS} connections, 1 KiB bodies");
        let per_request = |cpu: f64, run: &Run| cpu / run.requests * 1e6;
        Ok(vec![
            Figure::new(
                &format!("waypoint added latency p50 ({at})"),
                added(&waypoint, |r| r.p50),
                "ms",
            )
            .with_peer("haproxy", added(&haproxy, |r| r.p50))
            .with_target("<= 0.10"),
            Figure::new(
                &format!("waypoint added latency p99 ({at})"),
                added(&waypoint, |r| r.p99),
                "ms",
            )
            .with_peer("haproxy", added(&haproxy, |r| r.p99))
            .with_target("<= 0.30"),
            Figure::new(
                &format!("waypoint p99 latency ({at})"),
                ms(waypoint.p99),
                "ms",
            )
            .with_peer("haproxy", ms(haproxy.p99))
            .with_target("<= 1x peer"),
            Figure::new(&format!("direct p99 latency ({at})"), ms(direct.p99), "ms"),
            Figure::new(
                &format!("waypoint CPU per request, utime + stime of the agent ({at})"),
                per_request(waypoint_cpu, &waypoint),
                "us",
            )
            .with_peer("haproxy", per_request(haproxy_cpu, &haproxy))
            .with_target("<= 1.2x peer"),
        ])
    }

    /// The agent's own CPU use with no request to serve (its passes, the
    /// event poll): part of the waypoint's CPU per request at a fixed rate.
    fn idle_cpu(&self) -> Result<Figure> {
        let ((), cpu) = self.with_cpu(self.waypoint_pid, || {
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        })?;
        let per_second = cpu / 10.0 * 1000.0;
        println!("agent with no request to serve: {per_second:.1} ms CPU per second");
        Ok(Figure::new(
            "agent CPU with no request to serve (included in the waypoint's CPU per request)",
            per_second,
            "ms/s",
        ))
    }

    /// `f`'s result and the CPU seconds process `pid` used meanwhile.
    fn with_cpu<T>(&self, pid: u32, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        let before = cpu_seconds(pid)?;
        let out = f()?;
        Ok((out, cpu_seconds(pid)? - before))
    }

    /// Closed-loop requests per second, the proxy on one core (CPU 1).
    fn closed_loop(&self) -> Result<Vec<Figure>> {
        let mut figures = Vec::new();
        for http2 in [false, true] {
            let proto = if http2 { "h2c" } else { "HTTP/1.1" };
            let haproxy = self.load(Path3::Haproxy, http2, "0", CLOSED_LOOP_RUN)?;
            let waypoint = self.load(Path3::Waypoint, http2, "0", CLOSED_LOOP_RUN)?;
            println!(
                "{proto} closed loop: waypoint {:.0}/s, haproxy {:.0}/s",
                waypoint.qps, haproxy.qps
            );
            figures.push(
                Figure::new(
                    &format!("waypoint closed-loop requests/s, proxy on one core ({proto}, {CONNECTIONS} connections)"),
                    waypoint.qps,
                    "requests/s",
                )
                .with_peer("haproxy", haproxy.qps)
                .with_target(">= 1x peer"),
            );
        }
        Ok(figures)
    }

    /// RSS growth of each proxy with [`IDLE`] idle keep-alive connections
    /// (each made one request first).
    fn idle_memory(&self) -> Result<Vec<Figure>> {
        let waypoint = self.idle_growth(self.waypoint_pid, WAYPOINT_PORT)?;
        let haproxy = self.idle_growth(self.haproxy_pid, HAPROXY_H1_PORT)?;
        println!(
            "RSS growth with {IDLE} idle connections: waypoint {waypoint:.1} MiB, haproxy {haproxy:.1} MiB"
        );
        Ok(vec![
            Figure::new(
                &format!("waypoint RSS growth with {IDLE} idle keep-alive connections"),
                waypoint,
                "MiB",
            )
            .with_peer("haproxy", haproxy)
            .with_target("<= 15"),
        ])
    }

    fn idle_growth(&self, pid: u32, port: u16) -> Result<f64> {
        let before = rss_mib(pid)?;
        let mut holder = KillOnDrop(self.pods.client.cgroup.spawn_in(
            &self.pods.client.ns,
            "python3",
            &[
                "-c",
                IDLE_CLIENTS,
                SERVER_IP,
                &port.to_string(),
                &IDLE.to_string(),
            ],
        ));
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.0.stdout.take().context("no stdout")?),
            &mut line,
        )?;
        if line.trim() != format!("holding {IDLE}") {
            bail!("the idle clients did not connect: {line}");
        }
        std::thread::sleep(Duration::from_secs(1));
        let after = rss_mib(pid)?;
        drop(holder);
        Ok(after - before)
    }

    /// Time from an AuthPolicy change (the API server's answer) to the
    /// first request on a kept-alive connection that gets the new decision.
    async fn policy_changes(&self, client: &kube::Client) -> Result<Figure> {
        let mut prober = KillOnDrop(self.pods.client.cgroup.spawn_in(
            &self.pods.client.ns,
            "python3",
            &["-c", PROBE, SERVER_IP, &WAYPOINT_PORT.to_string()],
        ));
        let stdout = prober.0.stdout.take().context("no stdout")?;
        let (tx, statuses) = std::sync::mpsc::channel::<(Instant, u16)>();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                if let Ok(code) = line.trim().parse::<u16>()
                    && tx.send((Instant::now(), code)).is_err()
                {
                    break;
                }
            }
        });
        // The prober's first answer (allowed): it is up and connected, so
        // its start-up is not counted in the first change.
        match statuses.recv_timeout(Duration::from_secs(10)) {
            Ok((_, 200)) => {}
            other => bail!("the prober got no 200 before the first change: {other:?}"),
        }
        let mut took = Vec::new();
        for i in 0..CHANGES {
            // Alternately refuse and allow /echo.
            let (allowed, want) = if i % 2 == 0 {
                ("/other", 403)
            } else {
                ("/echo", 200)
            };
            while statuses.try_recv().is_ok() {}
            resources::server_side_apply(client, &policy(allowed)).await?;
            let applied = Instant::now();
            let seen = loop {
                match statuses.recv_timeout(Duration::from_secs(10)) {
                    Ok((at, code)) if code == want => break at,
                    Ok(_) => {}
                    Err(_) => bail!("the waypoint did not enforce policy change {i} within 10 s"),
                }
            };
            took.push(seen.saturating_duration_since(applied));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(prober);
        println!(
            "policy change to enforced, in order (ms): {:?}",
            took.iter()
                .map(|d| (ms(*d) * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        took.sort();
        println!(
            "policy change to enforced, sorted (ms): {:?}",
            took.iter()
                .map(|d| (ms(*d) * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        println!(
            "policy change to enforced: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({CHANGES} changes)",
            ms(percentile(&took, 50.0)),
            ms(percentile(&took, 99.0)),
            ms(*took.last().unwrap_or(&Duration::ZERO))
        );
        Ok(Figure::new(
            "AuthPolicy change to enforced by the waypoint on a kept-alive connection, p99",
            ms(percentile(&took, 99.0)),
            "ms",
        )
        .with_target("<= 100"))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads fortio's JSON result.
fn read_run(json: &serde_json::Value) -> Result<Run> {
    let hist = &json["DurationHistogram"];
    let pct = |p: f64| -> Result<Duration> {
        hist["Percentiles"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| e["Percentile"].as_f64() == Some(p))
                    .and_then(|e| e["Value"].as_f64())
            })
            .map(Duration::from_secs_f64)
            .with_context(|| format!("no p{p} in fortio's result"))
    };
    let requests = hist["Count"]
        .as_f64()
        .context("no count in fortio's result")?;
    let ok = json["RetCodes"]["200"].as_f64().unwrap_or(0.0);
    Ok(Run {
        p50: pct(50.0)?,
        p99: pct(99.0)?,
        requests,
        ok,
        qps: json["ActualQPS"].as_f64().unwrap_or(0.0),
    })
}

/// Resident set of `pid`, MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// `python3 -c IDLE_CLIENTS <ip> <port> <n>`: opens n connections, makes
/// one HTTP/1.1 request on each (keep-alive), prints `holding <n>` and
/// keeps them open until killed.
const IDLE_CLIENTS: &str = r#"
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    s = socket.create_connection((ip, port), timeout=10)
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: server\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    conns.append(s)
print("holding", len(conns), flush=True)
while True:
    time.sleep(60)
"#;

/// `python3 -c PROBE <ip> <port>`: one kept-alive HTTP/1.1 connection,
/// a GET /echo every millisecond; prints each status code.
const PROBE: &str = r#"
import http.client, sys, time
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
while True:
    c.request("GET", "/echo")
    r = c.getresponse()
    r.read()
    print(r.status, flush=True)
    time.sleep(0.001)
"#;
