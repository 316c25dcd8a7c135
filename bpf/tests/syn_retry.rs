//! A connection start the destination drops while its maps catch up is
//! tried again within milliseconds: the sockops program gives connections
//! the egress gate admitted a SYN retransmission timeout of one jiffy
//! instead of the kernel's second. Real processes in a real cgroup; needs
//! root; fails, never skips, without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tessera_bpf::abi::consts::{TS_DEFAULT_DENY, TS_SHAPE_EXACT};
use tessera_bpf::datapath::{Datapath, cgroup_id};

mod common;
use common::{Fixture, POD, PodConn, SERVER, allow};

/// Connects from the pod's cgroup and prints the seconds connect() took.
const TIMED_CONNECT: &str = r#"
import os, socket, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
s = socket.socket()
s.settimeout(5)
t = time.monotonic()
s.connect((sys.argv[2], int(sys.argv[3])))
print("%.6f" % (time.monotonic() - t), flush=True)
"#;

#[test]
fn a_dropped_connection_start_is_tried_again_within_milliseconds() -> Result<()> {
    let fx = Fixture::new("syn-retry")?;
    let mut dp = Datapath::load()?;
    dp.set_endpoint_cgroup(cgroup_id(&fx.top.join("pod"))?, POD)?;
    dp.set_endpoint_ip([127, 0, 0, 1].into(), SERVER)?;
    dp.attach(&fx.top)?;
    // The pod serves on 127.0.0.1 (SERVER's address) and connects to it:
    // the egress gate sees the pod (POD, by cgroup), which the policy
    // admits; the ingress check sees the source address (SERVER's), which
    // it does not admit yet, as when the destination's agent has not yet
    // learnt a new pod's address.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let at = SocketAddr::new([127, 0, 0, 1].into(), port);
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_EXACT as u32)?;
    let (key, value) = allow(POD.id, port, false);
    dp.set_rule(key, value)?;
    let _server = PodConn::listen(&fx, at)?;
    let client = Command::new("/usr/bin/python3")
        .args(["-c", TIMED_CONNECT])
        .arg(fx.top.join("pod/ctr"))
        .args(["127.0.0.1", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running /usr/bin/python3")?;
    std::thread::sleep(Duration::from_millis(300));
    // The destination catches up.
    let (key, value) = allow(SERVER.id, port, false);
    dp.set_rule(key, value)?;
    let out = client.wait_with_output()?;
    let took: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("the client did not connect: {out:?}"))?;
    println!(
        "connect() took {:.1} ms, the destination admitting it after about 300 ms",
        took * 1000.0
    );
    ensure!(
        took > 0.1,
        "the first connection start was not dropped ({took} s): the test tests nothing"
    );
    ensure!(
        took < 0.6,
        "connect() took {took} s: the dropped SYN was not tried again within milliseconds"
    );
    Ok(())
}
