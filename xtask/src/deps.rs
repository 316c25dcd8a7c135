//! Debian packages the tasks need, installed idempotently with apt.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages `cargo xtask test` and `cargo xtask demo` need today. Go itself
/// comes with the machine (Debian's golang is too old for Kubernetes 1.36);
/// `testbin` checks its version.
/// `iproute2` builds the end-to-end tests' network namespaces and
/// `python3` runs the simulated pods' TCP clients and servers, and
/// `python3-scapy` crafts the packets an attacker would send.
/// `openssl` is the peer `cargo xtask bench identity` measures signing against;
/// `clang-16` and `libbpf-dev` build the eBPF programs in `bpf/` (every
/// crate that links them needs both to compile; xtask itself does not),
/// `bpftool` inspects them; `skopeo` reads the OCI archives
/// `cargo xtask images` writes, as a registry client would.
/// For the real node: `libseccomp-dev` to build runc with seccomp,
/// `containernetworking-plugins` (bridge, host-local, loopback: the pods'
/// network), `iptables` and `conntrack` for kube-proxy and the plugins,
/// and `busybox-static`, whose `cp` OLM's bundle unpack job runs.
/// `curl` and `nghttp2-client` (h2load) are the HTTP clients of the
/// waypoint's tests.
pub const PACKAGES: &[&str] = &[
    "ca-certificates",
    "openssl",
    "clang-16",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "python3",
    "python3-scapy",
    "skopeo",
    "libseccomp-dev",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "busybox-static",
    "curl",
    "nghttp2-client",
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn apt_get(args: &[&str]) -> Result<()> {
    println!("+ apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get; is this a Debian machine?")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// What `cargo xtask bench` needs besides [`PACKAGES`]: `haproxy` (2.6 on
/// Debian 12), the peer of `bench waypoint`.
pub const BENCH_PACKAGES: &[&str] = &["haproxy"];

/// Installs whatever in [`PACKAGES`] is missing; does nothing when all are there.
pub fn ensure() -> Result<()> {
    ensure_packages(PACKAGES)
}

/// [`ensure`], and [`BENCH_PACKAGES`] too.
pub fn ensure_bench() -> Result<()> {
    ensure_packages(&[PACKAGES, BENCH_PACKAGES].concat())
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !tessera_tests::is_root() {
        bail!(
            "missing Debian packages: {}; run `sudo apt-get install -y {}` or run this task as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    apt_get(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args)
}
