//! A connection start the destination drops while its maps catch up is
//! tried again within milliseconds: the sockops program gives connections
//! the egress gate admitted a SYN retransmission timeout of one jiffy
//! instead of the kernel's second. A connect() whose authentication is
//! still pending is held until it arrives rather than refused. Real
//! processes in a real cgroup; needs root; fails, never skips, without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tessera_bpf::abi::consts::{TS_DEFAULT_DENY, TS_SHAPE_EXACT};
use tessera_bpf::abi::{AuthFailure, AuthKey, AuthValue, Endpoint, Reason};
use tessera_bpf::datapath::{Datapath, cgroup_id};

mod common;
use common::{Fixture, POD, PodConn, SERVER, allow};

/// Connects from the pod's cgroup, once, and prints `ok <secs>` or
/// `errno <n> <secs>` (110, ETIMEDOUT, after 5 s): what connect() gave and
/// how long it took.
const TIMED_CONNECT: &str = r#"
import os, socket, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
s = socket.socket()
s.settimeout(5)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
t = time.monotonic()
try:
    s.connect((sys.argv[2], int(sys.argv[3])))
    print("ok %.6f" % (time.monotonic() - t), flush=True)
except socket.timeout:
    print("errno 110 %.6f" % (time.monotonic() - t), flush=True)
except OSError as e:
    print("errno %s %.6f" % (e.errno, time.monotonic() - t), flush=True)
"#;

/// Starts [`TIMED_CONNECT`] from the fixture's pod to 127.0.0.1:`port`.
fn timed_connect(fx: &Fixture, port: u16) -> Result<std::process::Child> {
    timed_connect_from(fx, port, &[])
}

/// [`timed_connect`], bound to `source` (none: the kernel's choice).
fn timed_connect_from(fx: &Fixture, port: u16, source: &[&str]) -> Result<std::process::Child> {
    Command::new("/usr/bin/python3")
        .args(["-c", TIMED_CONNECT])
        .arg(fx.top.join("pod/ctr"))
        .args(["127.0.0.1", &port.to_string()])
        .args(source)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running /usr/bin/python3")
}

/// What a [`timed_connect`] client printed: `Ok(secs)` if it connected,
/// else `Err((errno, secs))`.
fn outcome(client: std::process::Child) -> Result<Result<f64, (i32, f64)>> {
    let out = client.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["ok", secs] => Ok(secs.parse()?),
        ["errno", n, secs] => Err((n.parse()?, secs.parse()?)),
        _ => anyhow::bail!("the client printed {text:?} ({out:?})"),
    })
}

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
    let client = timed_connect(&fx, port)?;
    std::thread::sleep(Duration::from_millis(300));
    // The destination catches up.
    let (key, value) = allow(SERVER.id, port, false);
    dp.set_rule(key, value)?;
    let took = outcome(client)?
        .map_err(|(errno, _)| anyhow::anyhow!("the client did not connect: errno {errno}"))?;
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

fn auth_key(local: Endpoint) -> AuthKey {
    AuthKey {
        local: local.id,
        remote: SERVER.id,
        remote_node: SERVER.node,
        pad: 0,
    }
}

/// The authentication of `local` with SERVER (node 1), valid for ever.
fn authenticate(dp: &mut Datapath, local: Endpoint) -> Result<()> {
    let key = auth_key(local);
    let value = AuthValue {
        local_gen: local.gen_,
        remote_gen: SERVER.gen_,
        expires_ns: u64::MAX,
        epoch: 0,
    };
    Ok(dp.set_auth(key, value)?)
}

/// The pod serving on 127.0.0.1 (SERVER) and connecting to it, SERVER's
/// policy asking for authentication both of the pod (at the egress gate)
/// and of SERVER's own address (at the ingress check), neither recorded
/// yet: a new pair before its handshake. The port.
fn pending_pair(fx: &Fixture, dp: &mut Datapath) -> Result<(u16, PodConn)> {
    dp.set_endpoint_cgroup(cgroup_id(&fx.top.join("pod"))?, POD)?;
    dp.set_endpoint_ip([127, 0, 0, 1].into(), SERVER)?;
    dp.attach(&fx.top)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_EXACT as u32)?;
    for from in [POD.id, SERVER.id] {
        let (key, value) = allow(from, port, true);
        dp.set_rule(key, value)?;
    }
    let server = PodConn::listen(fx, SocketAddr::new([127, 0, 0, 1].into(), port))?;
    Ok((port, server))
}

#[test]
fn a_connection_waiting_for_its_authentication_is_held_not_refused() -> Result<()> {
    let fx = Fixture::new("held")?;
    let mut dp = Datapath::load()?;
    let (port, _server) = pending_pair(&fx, &mut dp)?;
    let client = timed_connect(&fx, port)?;
    std::thread::sleep(Duration::from_millis(150));
    ensure!(
        dp.counter(Reason::HoldAuthPending)? == 1,
        "the egress gate did not hold the connect()"
    );
    ensure!(
        dp.revoke_here()?.is_empty(),
        "a sweep while the connection waits leaves it waiting"
    );
    std::thread::sleep(Duration::from_millis(150));
    // The handshake completes: both nodes record it.
    authenticate(&mut dp, POD)?;
    authenticate(&mut dp, SERVER)?;
    let took = outcome(client)?.map_err(|(errno, secs)| {
        anyhow::anyhow!("the held connect() failed after {secs} s: errno {errno}")
    })?;
    println!(
        "held connect() took {:.1} ms, authenticated after about 300 ms",
        took * 1000.0
    );
    ensure!(
        took > 0.25,
        "connected after {took} s, before the handshake"
    );
    ensure!(took < 0.6, "connected {took} s after the handshake");
    ensure!(
        dp.revoke_here()?.is_empty(),
        "the connection rests on its authentication now"
    );
    Ok(())
}

#[test]
fn a_held_connection_ends_with_its_allow_or_without_its_authentication() -> Result<()> {
    let fx = Fixture::new("held-end")?;
    let mut dp = Datapath::load()?;
    let (port, _server) = pending_pair(&fx, &mut dp)?;

    // The rule goes while the connection waits: it fails at the next sweep.
    let client = timed_connect(&fx, port)?;
    std::thread::sleep(Duration::from_millis(150));
    let (key, _) = allow(POD.id, port, true);
    dp.remove_rule(&key)?;
    let revoked = dp.revoke_here()?;
    ensure!(revoked.len() == 1, "{revoked:?}");
    ensure!(
        revoked[0].reason == Some(Reason::DenyDefault),
        "{revoked:?}"
    );
    let errno = outcome(client)?.err().map(|(errno, _)| errno);
    ensure!(
        errno == Some(103),
        "the waiting connect() should fail with ECONNABORTED: {errno:?}"
    );

    // The handshake fails while a connection waits: it fails at the next
    // sweep, and the next connect() is refused at once.
    let (key, value) = allow(POD.id, port, true);
    dp.set_rule(key, value)?;
    let client = timed_connect(&fx, port)?;
    std::thread::sleep(Duration::from_millis(150));
    let failure = AuthFailure {
        local_gen: POD.gen_,
        remote_gen: SERVER.gen_,
        until_ns: tessera_bpf::monotonic_ns() + 1_000_000_000,
    };
    dp.set_auth_failed(auth_key(POD), failure)?;
    let revoked = dp.revoke_here()?;
    ensure!(revoked.len() == 1, "{revoked:?}");
    ensure!(
        revoked[0].reason == Some(Reason::DenyAuthFailed),
        "{revoked:?}"
    );
    let errno = outcome(client)?.err().map(|(errno, _)| errno);
    ensure!(errno == Some(103), "ECONNABORTED expected: {errno:?}");
    let refused = outcome(timed_connect(&fx, port)?)?;
    ensure!(
        matches!(refused, Err((1, secs)) if secs < 0.05),
        "refused at once (EPERM) after the failed handshake: {refused:?}"
    );
    dp.remove_auth_failed(&auth_key(POD))?;

    // The destination authenticated the pair, this node never did: the
    // connection gets through, and ends once its grace is over.
    authenticate(&mut dp, SERVER)?;
    let _held = PodConn::connect(&fx, SocketAddr::new([127, 0, 0, 1].into(), port))?;
    ensure!(dp.revoke_here()?.is_empty(), "within its grace");
    std::thread::sleep(Duration::from_millis(2100));
    let revoked = dp.revoke_here()?;
    ensure!(revoked.len() == 1, "{revoked:?}");
    ensure!(
        revoked[0].reason == Some(Reason::DenyAuthMissing),
        "{revoked:?}"
    );
    Ok(())
}

#[test]
fn a_connection_from_a_pod_not_known_yet_waits_for_the_destination() -> Result<()> {
    let fx = Fixture::new("unknown-pod")?;
    let mut dp = Datapath::load()?;
    // The pod (at 127.0.0.2) is not known: its status has not reached the
    // agents, neither its cgroup nor its address is mapped.
    dp.set_endpoint_ip([127, 0, 0, 1].into(), SERVER)?;
    dp.attach(&fx.top)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_EXACT as u32)?;
    let (key, value) = allow(POD.id, port, false);
    dp.set_rule(key, value)?;
    let _server = PodConn::listen(&fx, SocketAddr::new([127, 0, 0, 1].into(), port))?;
    let client = timed_connect_from(&fx, port, &["127.0.0.2"])?;
    std::thread::sleep(Duration::from_millis(150));
    ensure!(
        dp.counter(Reason::HoldPodPending)? == 1,
        "the egress gate did not hold the connect()"
    );
    ensure!(dp.revoke_here()?.is_empty(), "a waiting connection stays");
    std::thread::sleep(Duration::from_millis(150));
    // The pod becomes known: the destination admits its address.
    dp.set_endpoint_ip([127, 0, 0, 2].into(), POD)?;
    let took = outcome(client)?
        .map_err(|(errno, _)| anyhow::anyhow!("the held connect() failed: errno {errno}"))?;
    println!(
        "connect() from a pod not known yet took {:.1} ms",
        took * 1000.0
    );
    ensure!(took > 0.25 && took < 0.6, "connected after {took} s");
    ensure!(
        dp.revoke_here()?.is_empty(),
        "the connection is its address's pod's now, which the policy admits"
    );
    Ok(())
}
