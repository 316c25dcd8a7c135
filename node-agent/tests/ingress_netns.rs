//! The ingress program on real packets through real network namespaces, as
//! root: a TCP server in a pod's cgroup and network namespace, the program
//! attached to that cgroup, and IPv6 connection starts crafted with scapy
//! (Debian's `python3-scapy`) from another namespace, with and without
//! extension headers in front of the TCP header. A SYN-ACK back means the
//! SYN reached the server. Fails, never skips, without root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::process::Command;

use tessera_bpf::abi::consts::TS_DEFAULT_DENY;
use tessera_bpf::abi::{Endpoint, Reason};
use tessera_bpf::datapath::Datapath;
use tessera_tests::netns::{Cgroup, IPV6_PREFIX, Topology};

mod common;

const PORT: u16 = 7000;
const POD: u32 = 300;

/// Sends one SYN from `src` to `dst`:`port` (with the extension header
/// `kind` names in front of TCP) out of interface `iface` to MAC `mac`, and
/// prints `synack` when the SYN-ACK comes back within 2 s, else `none`.
/// (Sent at the link layer and matched by port: scapy's own ND resolution
/// and answer matching do not cover every extension header.)
const SEND: &str = r#"
import sys
from scapy.all import Ether, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, TCP, conf, sendp, sniff
conf.verb = 0
src, dst, port, kind, iface, mac = sys.argv[1:7]
kinds = ["plain", "dstopts", "hopbyhop", "fragment"]
ext = [None, IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(offset=0, m=0, id=0x7e55)][kinds.index(kind)]
sport = 41000 + kinds.index(kind)
ip = IPv6(src=src, dst=dst)
syn = TCP(sport=sport, dport=int(port), flags="S", seq=1000)
frame = Ether(dst=mac) / (ip / ext / syn if ext is not None else ip / syn)
def synack(p):
    return TCP in p and p[TCP].dport == sport and (p[TCP].flags & 0x12) == 0x12
got = sniff(iface=iface, timeout=2, count=1, lfilter=synack,
            started_callback=lambda: sendp(frame, iface=iface))
print("synack" if got else "none")
"#;

/// What came back for a SYN with `kind` from `from` (namespace, address)
/// to the pod at `to` (namespace, address).
fn send(from: (&str, &str), to: (&str, &str), kind: &str) -> String {
    let (iface, _) = tessera_tests::scapy::link(from.0);
    let (_, mac) = tessera_tests::scapy::link(to.0);
    // Debian's interpreter, where python3-scapy installs the module.
    let out = Command::new("ip")
        .args(["netns", "exec", from.0, "/usr/bin/python3", "-c", SEND])
        .args([from.1, to.1, &PORT.to_string(), kind, &iface, &mac])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scapy (python3-scapy, installed by cargo xtask deps) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn ipv6_syns_behind_extension_headers_are_checked_like_plain_ones() {
    assert!(
        tessera_tests::is_root(),
        "this test attaches eBPF programs and builds network namespaces: run it as root"
    );
    let topology = Topology::create(&[]);
    let (pod_ip, peer_ip) = (format!("{IPV6_PREFIX}::10"), format!("{IPV6_PREFIX}::20"));
    let pod_ns = topology.pod_with(&[&pod_ip]);
    let peer_ns = topology.pod_with(&[&peer_ip]);
    let cgroup = Cgroup::create(
        common::cgroup2_root().join(format!("tessera-ingress-{}", std::process::id())),
    );
    let _server = tessera_tests::procs::KillOnDrop(tessera_tests::netns::serve(
        &cgroup, &pod_ns, PORT, "pod",
    ));
    let mut dp = Datapath::load().unwrap();
    dp.attach(&cgroup.0).unwrap();
    dp.set_endpoint_ip(
        pod_ip.parse::<IpAddr>().unwrap(),
        Endpoint {
            id: POD,
            node: 1,
            gen_: 1,
        },
    )
    .unwrap();

    // No policy selects the pod: every kind of SYN reaches its server
    // (the path works, so a missing answer below is the program's doing).
    for kind in ["plain", "dstopts", "hopbyhop", "fragment"] {
        assert_eq!(
            send((&peer_ns, &peer_ip), (&pod_ns, &pod_ip), kind),
            "synack",
            "{kind} SYN to an unprotected pod"
        );
    }

    // Default deny: none does, and each is counted as denied by policy.
    dp.set_selected(POD, TS_DEFAULT_DENY as u32).unwrap();
    for kind in ["plain", "dstopts", "hopbyhop", "fragment"] {
        let before = dp.counter(Reason::DenyDefault).unwrap();
        let got = send((&peer_ns, &peer_ip), (&pod_ns, &pod_ip), kind);
        let after = dp.counter(Reason::DenyDefault).unwrap();
        assert_eq!(got, "none", "{kind} SYN to a default-deny pod was answered");
        assert!(
            after > before,
            "{kind} SYN: deny_default went {before} -> {after}"
        );
    }
}
