//! The data path as the agent runs it: maps and links pinned on a real bpffs,
//! the connect gate attached to a real cgroup and exercised by real processes
//! doing connect(). Enforcement outlives the process that set it up, a second
//! load reuses the pinned maps with their entries, and pinned maps of another
//! layout are refused. Needs root; fails, never skips, without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, TcpListener};

use anyhow::Result;
use tessera_bpf::abi::consts::TS_DEFAULT_DENY;
use tessera_bpf::abi::{AuthKey, AuthValue};
use tessera_bpf::datapath::{Datapath, DatapathError, cgroup_id};
use tessera_bpf::pinning::PinningError;

mod common;
use common::{Fixture, POD, SERVER};

fn denied(result: Result<(), String>) -> bool {
    matches!(result, Err(e) if e.contains("Operation not permitted"))
}

#[test]
fn enforcement_outlives_the_loader_and_a_reload_reuses_the_pinned_maps() -> Result<()> {
    let fx = Fixture::new("reuse")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);

    assert!(fx.connect_from_pod(port).is_ok(), "nothing attached yet");
    {
        let mut dp = Datapath::open(Some(&fx.pin_dir()))?;
        assert!(dp.reused_maps().is_empty(), "a fresh bpffs has no pins");
        dp.set_endpoint_cgroup(cgroup_id(&fx.top.join("pod"))?, POD)?;
        dp.set_endpoint_ip(loopback, SERVER)?;
        // The server's identity is selected by an Allow policy with no rule.
        dp.set_selected(SERVER.id, TS_DEFAULT_DENY as u32)?;
        dp.set_auth(
            AuthKey {
                local: POD.id,
                remote: SERVER.id,
                remote_node: SERVER.node,
                pad: 0,
            },
            AuthValue {
                local_gen: POD.gen_,
                remote_gen: SERVER.gen_,
                expires_ns: u64::MAX,
                epoch: 0,
            },
        )?;
        dp.attach(&fx.top)?;
        // The container's cgroup is below the pod's: the gate finds the pod.
        let first = fx.connect_from_pod(port);
        assert!(
            denied(first.clone()),
            "connect() should fail with EPERM: {first:?}"
        );
    }
    // The loader is gone; the pinned links and maps still enforce.
    let after = fx.connect_from_pod(port);
    assert!(
        denied(after.clone()),
        "enforcement stopped with the loader: {after:?}"
    );
    assert!(fx.pin_dir().join("links/ts_connect4").exists());

    let key = Datapath::open(Some(&fx.pin_dir()))?.cache_key()?;
    assert_ne!(key, [0; 32], "a key is made on first use");

    // A new load (an agent restart) finds every map with its entries.
    let mut dp = Datapath::open(Some(&fx.pin_dir()))?;
    assert_eq!(dp.reused_maps().len(), tessera_bpf::maps::ALL.len());
    assert_eq!(
        dp.cache_key()?,
        key,
        "the auth cache key outlives the loader"
    );
    assert_ne!(
        Datapath::open(None)?.cache_key()?,
        key,
        "unpinned maps get a key of their own"
    );
    assert_eq!(dp.selected()?, vec![(SERVER.id, TS_DEFAULT_DENY as u32)]);
    assert_eq!(dp.auths()?.len(), 1, "the authentication survived");
    dp.attach(&fx.top)?; // replaces the previous links without a gap
    assert!(denied(fx.connect_from_pod(port)));
    dp.remove_selected(SERVER.id)?;
    let open = fx.connect_from_pod(port);
    assert!(open.is_ok(), "no policy: connect() should pass: {open:?}");
    // Still one program per hook (ingress, connect4, connect6, sockops): the
    // old links went when the new ones were pinned.
    let links = std::fs::read_dir(fx.pin_dir().join("links"))?.count();
    assert_eq!(links, 4);
    Ok(())
}

#[test]
fn pinned_maps_of_another_layout_are_refused() -> Result<()> {
    let fx = Fixture::new("layout")?;
    let dir = fx.pin_dir();
    std::fs::create_dir_all(&dir)?;
    // A map of another shape where ts_auth belongs (the rate-limit map:
    // same key, 8-byte values).
    let mut other = aya::Ebpf::load(tessera_bpf::OBJECT)?;
    let wrong = other.map_mut(tessera_bpf::maps::EVENT_LAST).unwrap();
    let wrong: aya::maps::HashMap<_, AuthKey, u64> = aya::maps::HashMap::try_from(wrong)?;
    wrong.pin(dir.join(tessera_bpf::maps::AUTH))?;
    let err = Datapath::open(Some(&dir)).unwrap_err();
    match &err {
        DatapathError::Pinning(PinningError::Layout { path, .. }) => {
            assert_eq!(path, &dir.join(tessera_bpf::maps::AUTH))
        }
        other => panic!("expected a layout error, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("value 8 B") && message.contains("value 32 B"),
        "{message}"
    );
    Ok(())
}
