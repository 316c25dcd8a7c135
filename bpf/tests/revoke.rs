//! Revocation of established connections: real processes in a real cgroup
//! hold TCP connections the data path admitted (outbound through the
//! connect gate, inbound through the ingress check), the maps change, and
//! `ts_revoke` run over the namespace's sockets resets exactly those the
//! maps no longer allow: both ends see the connection end, and the others
//! still carry data. Needs root (and Linux >= 6.5 for bpf_sock_destroy);
//! fails, never skips, without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use tessera_bpf::abi::consts::{TS_DEFAULT_DENY, TS_SHAPE_EXACT, TS_SHAPE_PORT};
use tessera_bpf::abi::{AuthKey, AuthValue, Endpoint, Reason, Revoked, consts};
use tessera_bpf::datapath::{Datapath, cgroup_id};

mod common;
use common::{Fixture, POD, PodConn, SERVER, allow};

const OTHER: Endpoint = Endpoint {
    id: 500,
    node: 1,
    gen_: 2,
};

fn auth_key() -> AuthKey {
    AuthKey {
        local: POD.id,
        remote: SERVER.id,
        remote_node: SERVER.node,
        pad: 0,
    }
}

fn auth(expires_ns: u64, epoch: u64) -> AuthValue {
    AuthValue {
        local_gen: POD.gen_,
        remote_gen: SERVER.gen_,
        expires_ns,
        epoch,
    }
}

/// The data path attached to the fixture's cgroup, the pod's cgroup mapped
/// to POD, 127.0.0.1 to SERVER and 127.0.0.2 to OTHER (no policy).
fn datapath(fx: &Fixture) -> Result<Datapath> {
    let mut dp = Datapath::load()?;
    ensure!(
        dp.can_revoke(),
        "this kernel has no bpf_sock_destroy (Linux >= 6.5 needed)"
    );
    dp.set_endpoint_cgroup(cgroup_id(&fx.top.join("pod"))?, POD)?;
    dp.set_endpoint_ip([127, 0, 0, 1].into(), SERVER)?;
    dp.set_endpoint_ip([127, 0, 0, 2].into(), OTHER)?;
    dp.attach(&fx.top)?;
    Ok(dp)
}

/// A pod connection to `listener`, and the accepted end.
fn connect(fx: &Fixture, listener: &TcpListener) -> Result<(PodConn, TcpStream)> {
    let pod = PodConn::connect(fx, listener.local_addr()?)?;
    let (stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok((pod, stream))
}

/// Whether `stream` still carries data both ways (the pod end echoes).
fn alive(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// The connection ended at both ends: the pod process saw an error, and
/// this end a reset.
fn ended(pod: &mut PodConn, stream: &mut TcpStream) -> Result<()> {
    let said = pod.expect("error")?;
    let mut buf = [0u8; 4];
    let read = stream.read(&mut buf);
    ensure!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the accepted end should see a reset, got {read:?} (pod said {said})"
    );
    Ok(())
}

fn one(revoked: Vec<Revoked>, remote: SocketAddr, reason: Reason) -> Result<()> {
    ensure!(
        revoked.len() == 1,
        "one connection reset expected: {revoked:?}"
    );
    ensure!(revoked[0].remote == remote, "{revoked:?}");
    ensure!(revoked[0].reason == Some(reason), "{revoked:?}");
    ensure!(revoked[0].local_id == POD.id, "{revoked:?}");
    Ok(())
}

#[test]
fn a_connection_ends_with_the_allow_or_the_peer_it_began_with() -> Result<()> {
    let fx = Fixture::new("revoke")?;
    let mut dp = datapath(&fx)?;
    let server = TcpListener::bind("127.0.0.1:0")?;
    let other = TcpListener::bind("127.0.0.2:0")?;
    let (key, value) = allow(POD.id, server.local_addr()?.port(), false);
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_EXACT as u32)?;
    dp.set_rule(key, value)?;

    let (mut pod_a, mut a) = connect(&fx, &server)?;
    let (mut pod_b, mut b) = connect(&fx, &other)?;
    ensure!(alive(&mut a) && alive(&mut b));
    ensure!(
        dp.revoke_here()?.is_empty(),
        "nothing changed: nothing reset"
    );

    // The allow goes: the connection to the server ends, the other stays.
    dp.remove_rule(&key)?;
    one(dp.revoke_here()?, server.local_addr()?, Reason::DenyDefault)?;
    ended(&mut pod_a, &mut a)?;
    ensure!(alive(&mut b), "a connection whose allow holds survives");
    ensure!(dp.counter(Reason::Revoked)? == 1);

    // The peer's address goes to another generation (a deleted pod whose
    // address was reused): the connection to it ends too.
    dp.set_endpoint_ip(
        [127, 0, 0, 2].into(),
        Endpoint {
            gen_: OTHER.gen_ + 1,
            ..OTHER
        },
    )?;
    one(
        dp.revoke_here()?,
        other.local_addr()?,
        Reason::DenyEndpointChanged,
    )?;
    ended(&mut pod_b, &mut b)?;
    Ok(())
}

#[test]
fn a_connection_resting_on_an_authentication_ends_with_it() -> Result<()> {
    let fx = Fixture::new("revoke-auth")?;
    let mut dp = datapath(&fx)?;
    let server = TcpListener::bind("127.0.0.1:0")?;
    let other = TcpListener::bind("127.0.0.2:0")?;
    let (key, value) = allow(POD.id, server.local_addr()?.port(), true);
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_EXACT as u32)?;
    dp.set_rule(key, value)?;
    dp.set_auth(auth_key(), auth(u64::MAX, 0))?;

    let (mut pod_a, mut a) = connect(&fx, &server)?;
    let (_pod_b, mut b) = connect(&fx, &other)?;
    // A CA left the bundles: a new epoch, and the pair authenticated again
    // in it before the sweep. The connection rested on the old one.
    dp.set_epoch(1)?;
    dp.set_auth(auth_key(), auth(u64::MAX, 1))?;
    one(
        dp.revoke_here()?,
        server.local_addr()?,
        Reason::DenyAuthEpoch,
    )?;
    ended(&mut pod_a, &mut a)?;
    ensure!(
        alive(&mut b),
        "a connection resting on no authentication survives"
    );

    // A connection made in the new epoch ends when its authentication
    // expires, not before.
    let soon = tessera_bpf::monotonic_ns() + 300_000_000;
    dp.set_auth(auth_key(), auth(soon, 1))?;
    let (mut pod_c, mut c) = connect(&fx, &server)?;
    ensure!(dp.revoke_here()?.is_empty(), "not expired yet");
    ensure!(alive(&mut c));
    std::thread::sleep(Duration::from_millis(400));
    one(
        dp.revoke_here()?,
        server.local_addr()?,
        Reason::DenyAuthExpired,
    )?;
    ended(&mut pod_c, &mut c)?;
    Ok(())
}

#[test]
fn an_accepted_connection_ends_with_the_allow() -> Result<()> {
    let fx = Fixture::new("revoke-in")?;
    let mut dp = datapath(&fx)?;
    // The pod serves on 127.0.0.1 (SERVER's address; its process is in the
    // pod's cgroup, which is all the ingress check and sockops look at).
    let at: SocketAddr = "127.0.0.1:0".parse()?;
    let port = {
        let probe = TcpListener::bind(at)?;
        probe.local_addr()?.port()
    };
    let at = SocketAddr::new(at.ip(), port);
    let (key, value) = allow(consts::TS_ID_ANY as u32, port, false);
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_PORT as u32)?;
    dp.set_rule(key, value)?;
    let mut pod = PodConn::listen(&fx, at)?;
    let mut client = TcpStream::connect(at)?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    pod.expect("connected")?;
    ensure!(alive(&mut client));
    ensure!(dp.revoke_here()?.is_empty());

    dp.remove_rule(&key)?;
    let revoked = dp.revoke_here()?;
    ensure!(revoked.len() == 1, "{revoked:?}");
    ensure!(revoked[0].local == at, "{revoked:?}");
    ensure!(
        revoked[0].reason == Some(Reason::DenyDefault),
        "{revoked:?}"
    );
    ended(&mut pod, &mut client)?;
    Ok(())
}

#[test]
fn a_connection_the_agent_terminates_is_left_to_the_agent() -> Result<()> {
    let fx = Fixture::new("revoke-term")?;
    let mut dp = Datapath::load()?;
    // The pod serves on 127.0.0.2; clients connect from 127.0.0.1, which
    // is no endpoint: a peer outside the mesh.
    dp.set_endpoint_ip([127, 0, 0, 2].into(), SERVER)?;
    dp.attach(&fx.top)?;
    let port = TcpListener::bind("127.0.0.2:0")?.local_addr()?.port();
    let at = SocketAddr::new([127, 0, 0, 2].into(), port);
    let (key, value) = allow(consts::TS_ID_ANY as u32, port, false);
    dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32 | TS_SHAPE_PORT as u32)?;
    dp.set_rule(key, value)?;
    let hold = |fx: &Fixture| -> Result<(PodConn, TcpStream)> {
        let mut pod = PodConn::listen(fx, at)?;
        let client = TcpStream::connect(at)?;
        client.set_read_timeout(Some(Duration::from_secs(2)))?;
        pod.expect("connected")?;
        Ok((pod, client))
    };

    // The agent terminates that address and port (its socket is the one
    // ts_steer hands such connections to; the pod's process stands in for
    // it here, being in the cgroup the sockops program sees).
    let terminator = TcpListener::bind("127.0.0.3:0")?;
    let term_key = tessera_bpf::abi::TermKey::new(at.ip(), port);
    dp.set_terminator(term_key, &terminator, 77)?;
    let (pod, mut client) = hold(&fx)?;
    dp.remove_rule(&key)?;
    ensure!(
        dp.revoke_here()?.is_empty(),
        "the agent answers for connections it terminated"
    );
    ensure!(alive(&mut client));
    drop(pod);

    // Once it no longer terminates there, a connection the rule admitted
    // is the data path's again, and ends with the rule.
    dp.remove_terminator(&term_key, 77)?;
    dp.set_rule(key, value)?;
    let (mut pod, mut client) = hold(&fx)?;
    dp.remove_rule(&key)?;
    ensure!(dp.revoke_here()?.len() == 1);
    ended(&mut pod, &mut client)?;
    Ok(())
}
