//! Packets an attacker would craft, sent with scapy (Debian's
//! `python3-scapy`, run by Debian's interpreter) from inside a network
//! namespace, at the link layer: a pod with CAP_NET_RAW can do all of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// Debian's interpreter, where python3-scapy installs the module.
const PYTHON: &str = "/usr/bin/python3";

/// `sniff <iface> <sport> <seconds>`: prints `ready` once sniffing, then
/// `synack` if a SYN-ACK to port `sport` arrives within `seconds`, else
/// `none`.
pub const SNIFF_SYNACK: &str = r#"
import sys
from scapy.all import TCP, conf, sniff
conf.verb = 0
iface, sport, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def synack(p):
    return TCP in p and p[TCP].dport == sport and (p[TCP].flags & 0x12) == 0x12
got = sniff(iface=iface, timeout=seconds, count=1, lfilter=synack,
            started_callback=lambda: print("ready", flush=True))
print("synack" if got else "none", flush=True)
"#;

/// `send_syn <iface> <dst-mac> <src-ip> <dst-ip> <sport> <dport>`: one TCP
/// SYN, IPv4 or IPv6 as the addresses are written.
pub const SEND_SYN: &str = r#"
import sys
from scapy.all import IP, IPv6, TCP, Ether, conf, sendp
conf.verb = 0
iface, mac, src, dst, sport, dport = sys.argv[1:7]
ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
sendp(Ether(dst=mac) / ip / TCP(sport=int(sport), dport=int(dport), flags="S", seq=1000), iface=iface)
"#;

/// `claim <iface> <ip>`: two gratuitous ARP replies that say `ip` is at
/// this interface's MAC address (an address takeover).
pub const CLAIM_ARP: &str = r#"
import sys, time
from scapy.all import ARP, Ether, conf, get_if_hwaddr, sendp
conf.verb = 0
iface, ip = sys.argv[1], sys.argv[2]
mac = get_if_hwaddr(iface)
for _ in range(2):
    sendp(Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) /
          ARP(op=2, psrc=ip, hwsrc=mac, pdst=ip, hwdst="ff:ff:ff:ff:ff:ff"), iface=iface)
    time.sleep(0.1)
"#;

/// The name and MAC address of the one Ethernet link in namespace `ns`.
pub fn link(ns: &str) -> (String, String) {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("link/ether"))
        .unwrap_or_else(|| panic!("no Ethernet link in {ns}: {text}"));
    let name = line.split(':').nth(1).unwrap().trim();
    let name = name.split('@').next().unwrap().to_owned();
    let mac = line
        .split("link/ether ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap()
        .to_owned();
    (name, mac)
}

fn command(ns: &str, script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, PYTHON, "-c", script])
        .args(args);
    c
}

/// Runs `script` with `args` in namespace `ns` to the end: its output.
pub fn run(ns: &str, script: &str, args: &[&str]) -> String {
    let out = command(ns, script, args).output().unwrap();
    assert!(
        out.status.success(),
        "scapy (python3-scapy, installed by cargo xtask deps) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A sniffer for a SYN-ACK to `sport` on namespace `ns`'s link, already
/// sniffing when this returns; [`Sniffer::answered`] says what it saw.
#[derive(Debug)]
pub struct Sniffer(Child);

impl Sniffer {
    /// Starts sniffing in `ns` for `seconds`.
    pub fn start(ns: &str, sport: u16, seconds: f64) -> Sniffer {
        let (iface, _) = link(ns);
        let mut child = command(
            ns,
            SNIFF_SYNACK,
            &[&iface, &sport.to_string(), &seconds.to_string()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the sniffer did not start");
        Sniffer(child)
    }

    /// Whether the SYN-ACK came (waits for the sniffer to finish).
    pub fn answered(self) -> bool {
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("synack")
    }
}

/// Sends a TCP SYN from namespace `ns` (out of its link) to `dst`:`dport`
/// with source `src`:`sport`, framed to MAC `dst_mac`.
pub fn send_syn(ns: &str, dst_mac: &str, src: &str, dst: &str, sport: u16, dport: u16) {
    let (iface, _) = link(ns);
    run(
        ns,
        SEND_SYN,
        &[
            &iface,
            dst_mac,
            src,
            dst,
            &sport.to_string(),
            &dport.to_string(),
        ],
    );
}

/// Claims `ip` for namespace `ns`'s link with gratuitous ARP.
pub fn claim_arp(ns: &str, ip: &str) {
    let (iface, _) = link(ns);
    run(ns, CLAIM_ARP, &[&iface, ip]);
}
