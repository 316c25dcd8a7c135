//! The ingress program run by the kernel (BPF_PROG_TEST_RUN) on crafted
//! packets, with the real maps: allowed, stale generation, expired, missing,
//! epoch-revoked, the policy cases around them, and the verdict cache (used
//! until any input changes, never for denials). Needs root (CAP_BPF);
//! fails, never skips, without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use tessera_bpf::abi::consts::*;
use tessera_bpf::abi::{
    AuthEvent, AuthKey, AuthValue, Endpoint, PolicyKey, PolicyValue, Reason, Verdict,
};
use tessera_bpf::datapath::{Datapath, VERDICT_CACHE_SUPPORTED};
use tessera_bpf::packets::{ACK, SYN, TCP, UDP, ipv4 as packet, ipv6_syn as packet6};

fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1));
    if uid != Some("0") {
        bail!("these tests load eBPF programs and need root (CAP_BPF); run them as root");
    }
    Ok(())
}

const A: [u8; 4] = [198, 18, 1, 10]; // pod a (identity 300) on node 1, the destination
const B: [u8; 4] = [198, 18, 2, 10]; // pod b (identity 400) on node 2, the source
const STRANGER: [u8; 4] = [198, 18, 9, 9]; // not a known pod
const A6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a,
]; // an IPv6 pod
const B6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b,
]; // its peer

struct Harness {
    dp: Datapath,
}

impl Harness {
    fn new() -> Result<Harness> {
        require_root()?;
        let mut h = Harness {
            dp: Datapath::load().context("loading the data path")?,
        };
        h.endpoint(A, 300, 1, 5)?;
        h.endpoint(B, 400, 2, 7)?;
        Ok(h)
    }

    fn endpoint(&mut self, ip: [u8; 4], id: u32, node: u32, gen_: u64) -> Result<()> {
        Ok(self
            .dp
            .set_endpoint_ip(IpAddr::from(ip), Endpoint { id, node, gen_ })?)
    }

    fn select(&mut self, local: u32, flags: u64) -> Result<()> {
        Ok(self.dp.set_selected(local, flags as u32)?)
    }

    fn rule(&mut self, local: u32, remote: u32, port: u16, verdict: u64, flags: u64) -> Result<()> {
        let key = PolicyKey {
            local,
            remote,
            port,
            proto: if port == 0 { 0 } else { TCP },
            pad: 0,
        };
        let value = PolicyValue {
            verdict: verdict as u8,
            flags: flags as u8,
            pad: [0; 2],
        };
        Ok(self.dp.set_rule(key, value)?)
    }

    /// Records an authentication of a (300) with b (400 on node 2).
    fn authenticate(
        &mut self,
        local_gen: u64,
        remote_gen: u64,
        expires_ns: u64,
        epoch: u64,
    ) -> Result<()> {
        let value = AuthValue {
            local_gen,
            remote_gen,
            expires_ns,
            epoch,
        };
        Ok(self.dp.set_auth(auth_key(), value)?)
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<()> {
        Ok(self.dp.set_epoch(epoch)?)
    }

    /// Runs the ingress program on `packet`: true when it lets it through.
    fn run(&mut self, packet: &[u8]) -> Result<bool> {
        Ok(match self.dp.test_ingress(packet, 1)?.0 {
            1 => true,
            0 => false,
            other => bail!("unexpected return value {other}"),
        })
    }

    fn counters(&mut self) -> Result<Vec<u64>> {
        Reason::ALL
            .iter()
            .map(|r| Ok(self.dp.counter(*r)?))
            .collect()
    }

    /// Runs `packet` and checks the verdict and that exactly `reason`'s
    /// counter moved, by one.
    fn expect(&mut self, packet: &[u8], allowed: bool, reason: Reason, what: &str) -> Result<()> {
        let before = self.counters()?;
        let got = self.run(packet)?;
        let after = self.counters()?;
        let moved: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(r, (b, a))| (*r, a - b))
            .collect();
        assert_eq!(got, allowed, "{what}: verdict (counters moved: {moved:?})");
        assert_eq!(moved, vec![(reason, 1)], "{what}: reason");
        Ok(())
    }

    fn events(&mut self) -> Vec<AuthEvent> {
        self.dp.take_events().unwrap()
    }
}

/// Whether `fd` polls readable now.
fn readable(fd: &std::os::fd::OwnedFd) -> Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero))?;
    Ok(fds[0].revents().contains(PollFlags::IN))
}

fn auth_key() -> AuthKey {
    AuthKey {
        local: 300,
        remote: 400,
        remote_node: 2,
        pad: 0,
    }
}

/// a (300) admits b (400) on port 8080 only with authentication.
fn auth_policy(h: &mut Harness) -> Result<()> {
    h.select(300, TS_SHAPE_EXACT | TS_DEFAULT_DENY)?;
    h.rule(300, 400, 8080, TS_VERDICT_ALLOW, TS_RULE_AUTH)
}

#[test]
fn authenticated_pairs_pass_and_every_kind_of_invalid_authentication_is_refused() -> Result<()> {
    let mut h = Harness::new()?;
    auth_policy(&mut h)?;
    let syn = packet(B, A, TCP, 8080, SYN);
    let later = tessera_bpf::monotonic_ns() + 3_600_000_000_000;

    // Missing: refused, and the agent hears of it once, woken by the ring
    // buffer's descriptor (the agent waits on it with epoll).
    let ring = h.dp.events_fd()?;
    assert!(
        !readable(&ring)?,
        "the ring buffer is readable with no event"
    );
    h.expect(&syn, false, Reason::DenyAuthMissing, "missing")?;
    assert!(
        readable(&ring)?,
        "the event did not wake the ring buffer's reader"
    );
    let events = h.events();
    assert!(
        !readable(&ring)?,
        "the ring buffer stays readable once drained"
    );
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = events[0];
    assert_eq!(
        (
            ev.local,
            ev.remote,
            ev.remote_node,
            ev.port,
            ev.proto,
            ev.local_gen,
            ev.remote_gen
        ),
        (300, 400, 2, 8080, TCP, 5, 7)
    );
    assert_eq!(u64::from(ev.reason), TS_REASON_DENY_AUTH_MISSING);
    // A second miss right away is counted but not reported again (rate limit).
    h.expect(&syn, false, Reason::DenyAuthMissing, "missing again")?;
    assert!(h.events().is_empty(), "events are rate-limited per pair");

    // Valid: allowed.
    h.authenticate(5, 7, later, 0)?;
    h.expect(&syn, true, Reason::AllowAuthenticated, "authenticated")?;

    // Stale: b's identity got a new generation (reassigned); a's old
    // authentication must not carry over.
    h.endpoint(B, 400, 2, 8)?;
    h.expect(
        &syn,
        false,
        Reason::DenyAuthStale,
        "remote generation changed",
    )?;
    h.endpoint(B, 400, 2, 7)?;
    h.endpoint(A, 300, 1, 6)?;
    h.expect(
        &syn,
        false,
        Reason::DenyAuthStale,
        "local generation changed",
    )?;
    h.endpoint(A, 300, 1, 5)?;
    h.expect(&syn, true, Reason::AllowAuthenticated, "generations back")?;

    // Expired.
    h.authenticate(
        5,
        7,
        tessera_bpf::monotonic_ns().saturating_sub(1_000_000_000),
        0,
    )?;
    h.expect(&syn, false, Reason::DenyAuthExpired, "expired")?;

    // Epoch-revoked: valid entry, then a mass revocation.
    h.authenticate(5, 7, later, 0)?;
    h.expect(&syn, true, Reason::AllowAuthenticated, "valid again")?;
    h.set_epoch(1)?;
    h.expect(&syn, false, Reason::DenyAuthEpoch, "epoch bumped")?;
    h.authenticate(5, 7, later, 1)?;
    h.expect(
        &syn,
        true,
        Reason::AllowAuthenticated,
        "re-authenticated in the new epoch",
    )?;

    // Another node's pod with the same identity and generation does not
    // inherit node 2's authentication.
    h.endpoint(B, 400, 3, 7)?;
    h.expect(
        &syn,
        false,
        Reason::DenyAuthMissing,
        "same identity, other node",
    )?;
    Ok(())
}

#[test]
fn an_address_reused_by_another_identity_does_not_inherit_authentication() -> Result<()> {
    let mut h = Harness::new()?;
    auth_policy(&mut h)?;
    h.rule(300, 500, 8080, TS_VERDICT_ALLOW, TS_RULE_AUTH)?;
    h.authenticate(5, 7, tessera_bpf::monotonic_ns() + 3_600_000_000_000, 0)?;
    let syn = packet(B, A, TCP, 8080, SYN);
    h.expect(&syn, true, Reason::AllowAuthenticated, "b authenticated")?;
    // b goes; c (identity 500) gets b's address.
    h.endpoint(B, 500, 2, 11)?;
    h.expect(&syn, false, Reason::DenyAuthMissing, "c at b's address")?;
    Ok(())
}

/// The program looks up (peer, port), (peer, any), (any, port), (any, any),
/// only the kinds the destination's flags name, and the first entry found
/// decides (the agent writes each entry with the merged verdict of the rules
/// that reach it; that merge is tested with the agent's policy module).
#[test]
fn the_first_policy_entry_found_decides_most_specific_first() -> Result<()> {
    let mut h = Harness::new()?;
    let syn = packet(B, A, TCP, 8080, SYN);

    h.expect(&syn, true, Reason::AllowNoPolicy, "no policy selects a")?;

    // An Allow without authentication for b on any port.
    h.select(300, TS_SHAPE_REMOTE | TS_DEFAULT_DENY)?;
    h.rule(300, 400, 0, TS_VERDICT_ALLOW, 0)?;
    h.expect(&syn, true, Reason::AllowPolicy, "allowed, no auth needed")?;

    // A stranger is not allowed: a is selected by an Allow.
    let from_stranger = packet(STRANGER, A, TCP, 8080, SYN);
    h.expect(&from_stranger, false, Reason::DenyDefault, "stranger")?;

    // A Deny for anyone on 8080, with the exact entry the agent writes for
    // b on 8080 (the merge of both rules: deny).
    h.rule(300, TS_ID_ANY as u32, 8080, TS_VERDICT_DENY, 0)?;
    h.select(300, TS_SHAPE_REMOTE | TS_SHAPE_PORT | TS_DEFAULT_DENY)?;
    h.expect(
        &syn,
        true,
        Reason::AllowPolicy,
        "(b, any port) is found before (anyone, 8080)",
    )?;
    h.rule(300, 400, 8080, TS_VERDICT_DENY, 0)?;
    h.select(
        300,
        TS_SHAPE_EXACT | TS_SHAPE_REMOTE | TS_SHAPE_PORT | TS_DEFAULT_DENY,
    )?;
    h.expect(&syn, false, Reason::DenyPolicy, "(b, 8080) is found first")?;
    h.expect(
        &packet(B, A, TCP, 9090, SYN),
        true,
        Reason::AllowPolicy,
        "other port: (b, any port)",
    )?;
    h.expect(
        &from_stranger,
        false,
        Reason::DenyPolicy,
        "stranger on 8080: (anyone, 8080)",
    )?;
    h.expect(
        &packet(STRANGER, A, TCP, 9090, SYN),
        false,
        Reason::DenyDefault,
        "stranger elsewhere: nothing found",
    )?;

    // Entries whose kind is not flagged are not consulted.
    h.select(300, TS_SHAPE_REMOTE | TS_DEFAULT_DENY)?;
    h.expect(&syn, true, Reason::AllowPolicy, "exact and port kinds off")?;

    // A Deny-only policy does not make a default-deny.
    h.select(300, TS_SHAPE_ANY)?;
    h.rule(300, TS_ID_ANY as u32, 0, TS_VERDICT_DENY, 0)?;
    h.expect(&syn, false, Reason::DenyPolicy, "deny everyone")?;
    h.dp.remove_rule(&PolicyKey {
        local: 300,
        remote: 0,
        port: 0,
        proto: 0,
        pad: 0,
    })?;
    h.expect(
        &syn,
        true,
        Reason::AllowNoPolicy,
        "deny entry gone, no allow policy",
    )?;

    // A verdict the program does not know denies.
    h.rule(300, TS_ID_ANY as u32, 0, 7, 0)?;
    h.expect(&syn, false, Reason::DenyPolicy, "unknown verdict")?;
    Ok(())
}

#[test]
fn only_tcp_connection_starts_to_known_pods_are_checked() -> Result<()> {
    let mut h = Harness::new()?;
    h.select(300, TS_DEFAULT_DENY)?;
    h.expect(
        &packet(B, A, TCP, 8080, SYN),
        false,
        Reason::DenyDefault,
        "syn",
    )?;
    h.expect(
        &packet(B, A, TCP, 8080, SYN | ACK),
        true,
        Reason::PassNotChecked,
        "syn-ack",
    )?;
    h.expect(
        &packet(B, A, TCP, 8080, ACK),
        true,
        Reason::PassNotChecked,
        "ack",
    )?;
    h.expect(
        &packet(B, A, UDP, 53, 0),
        true,
        Reason::PassNotChecked,
        "udp",
    )?;
    h.expect(
        &packet(B, STRANGER, TCP, 8080, SYN),
        true,
        Reason::PassUnmanaged,
        "not a pod",
    )?;
    // Truncated TCP header: refused.
    let mut short = packet(B, A, TCP, 8080, SYN);
    short.truncate(14 + 20 + 8);
    h.expect(&short, false, Reason::DenyMalformed, "truncated")?;

    // IPv6 endpoints are looked up by their full address.
    let (a6, b6) = (A6, B6);
    h.dp.set_endpoint_ip(
        IpAddr::from(a6),
        Endpoint {
            id: 300,
            node: 1,
            gen_: 5,
        },
    )?;
    h.expect(
        &packet6(b6, a6, 8080),
        false,
        Reason::DenyDefault,
        "ipv6 syn",
    )?;
    Ok(())
}

/// A harness whose maps are pinned on a private bpffs (removed on drop), so a
/// test can also reach them the way another process would.
struct Pinned {
    h: Harness,
    bpffs: tempfile::TempDir,
}

impl Pinned {
    fn new() -> Result<Pinned> {
        require_root()?;
        let bpffs = tempfile::tempdir()?;
        tessera_bpf::pinning::ensure_bpffs(bpffs.path()).context("mounting bpffs (needs root)")?;
        let dp = Datapath::open(Some(bpffs.path())).context("loading the data path")?;
        let mut h = Harness { dp };
        h.endpoint(A, 300, 1, 5)?;
        h.endpoint(B, 400, 2, 7)?;
        Ok(Pinned { h, bpffs })
    }

    /// Removes the a-b authentication behind the data path's back: straight
    /// from the pinned map, with no new inputs version.
    fn remove_auth_unversioned(&self) -> Result<()> {
        let data = aya::maps::MapData::from_pin(self.bpffs.path().join("ts_auth"))?;
        let mut map: aya::maps::HashMap<_, AuthKey, AuthValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
        map.remove(&auth_key())?;
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.bpffs.path())
            .status();
    }
}

fn in_an_hour() -> u64 {
    tessera_bpf::monotonic_ns() + 3_600_000_000_000
}

/// The cached IPv4 verdict of b -> a:8080, if any.
fn cached_b_to_a(h: &mut Harness) -> Result<Option<Verdict>> {
    Ok(h.dp
        .cached_verdicts4()?
        .into_iter()
        .find(|(k, _)| k.src == B && k.dst == A && k.port == 8080 && k.proto == TCP)
        .map(|(_, v)| v))
}

#[test]
fn a_cached_verdict_counts_until_the_inputs_version_changes() -> Result<()> {
    if !VERDICT_CACHE_SUPPORTED {
        bail!("the verdict cache is off on this architecture; this test needs x86-64");
    }
    let mut p = Pinned::new()?;
    auth_policy(&mut p.h)?;
    p.h.authenticate(5, 7, in_an_hour(), 0)?;
    let syn = packet(B, A, TCP, 8080, SYN);
    p.h.expect(&syn, true, Reason::AllowAuthenticated, "decided")?;
    let version = p.h.dp.inputs_version()?;
    assert_ne!(version, 0);
    let cached = cached_b_to_a(&mut p.h)?.context("the allow was not cached")?;
    assert_eq!(
        (cached.version, cached.reason),
        (version, TS_REASON_ALLOW_AUTHENTICATED as u32)
    );
    // With the authentication gone but no new version the cached verdict is
    // what lets the SYN through: the cache is really consulted.
    p.remove_auth_unversioned()?;
    p.h.expect(&syn, true, Reason::AllowAuthenticated, "cached")?;
    // Any change through the data path writes a new version; the same
    // connection start now gets the full decision.
    p.h.endpoint(STRANGER, 900, 3, 1)?;
    assert!(p.h.dp.inputs_version()? > version);
    p.h.expect(&syn, false, Reason::DenyAuthMissing, "after a new version")?;
    Ok(())
}

#[test]
fn every_change_to_a_decision_input_retires_cached_allows() -> Result<()> {
    type Change = fn(&mut Harness) -> Result<()>;
    let changes: [(&str, Change, Reason); 9] = [
        (
            "authentication removed",
            |h| Ok(h.dp.remove_auth(&auth_key())?),
            Reason::DenyAuthMissing,
        ),
        (
            "remote generation",
            |h| h.endpoint(B, 400, 2, 8),
            Reason::DenyAuthStale,
        ),
        (
            "local generation",
            |h| h.endpoint(A, 300, 1, 6),
            Reason::DenyAuthStale,
        ),
        (
            "address reassigned",
            |h| h.endpoint(B, 500, 2, 11),
            Reason::DenyDefault,
        ),
        (
            "source address removed",
            |h| Ok(h.dp.remove_endpoint_ip(IpAddr::from(B))?),
            Reason::DenyDefault,
        ),
        ("epoch", |h| h.set_epoch(1), Reason::DenyAuthEpoch),
        (
            "rule removed",
            |h| {
                Ok(h.dp.remove_rule(&PolicyKey {
                    local: 300,
                    remote: 400,
                    port: 8080,
                    proto: TCP,
                    pad: 0,
                })?)
            },
            Reason::DenyDefault,
        ),
        (
            "deny rule",
            |h| h.rule(300, 400, 8080, TS_VERDICT_DENY, 0),
            Reason::DenyPolicy,
        ),
        (
            "selection changed",
            |h| {
                h.select(300, TS_SHAPE_ANY | TS_DEFAULT_DENY)?;
                h.rule(300, TS_ID_ANY as u32, 0, TS_VERDICT_DENY, 0)
            },
            Reason::DenyPolicy,
        ),
    ];
    for (what, change, reason) in changes {
        let mut h = Harness::new()?;
        auth_policy(&mut h)?;
        h.authenticate(5, 7, in_an_hour(), 0)?;
        let syn = packet(B, A, TCP, 8080, SYN);
        h.expect(&syn, true, Reason::AllowAuthenticated, what)?;
        h.expect(&syn, true, Reason::AllowAuthenticated, what)?;
        if VERDICT_CACHE_SUPPORTED {
            assert!(cached_b_to_a(&mut h)?.is_some(), "{what}: not cached");
        }
        change(&mut h)?;
        h.expect(&syn, false, reason, what)?;
    }
    Ok(())
}

#[test]
fn a_cached_authenticated_verdict_ends_with_its_authentication() -> Result<()> {
    let mut h = Harness::new()?;
    auth_policy(&mut h)?;
    h.authenticate(5, 7, tessera_bpf::monotonic_ns() + 300_000_000, 0)?;
    let syn = packet(B, A, TCP, 8080, SYN);
    h.expect(&syn, true, Reason::AllowAuthenticated, "fresh")?;
    h.expect(&syn, true, Reason::AllowAuthenticated, "cached")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Nothing changed in the maps: only the cached expiry can refuse.
    h.expect(&syn, false, Reason::DenyAuthExpired, "expired")?;
    Ok(())
}

#[test]
fn denials_are_never_cached_and_ipv6_verdicts_are() -> Result<()> {
    let mut h = Harness::new()?;
    auth_policy(&mut h)?;
    let syn = packet(B, A, TCP, 8080, SYN);
    h.expect(&syn, false, Reason::DenyAuthMissing, "missing")?;
    assert!(h.dp.cached_verdicts4()?.is_empty(), "a denial was cached");
    // A destination no policy selects: allowed, cached as such.
    let (a6, b6) = (A6, B6);
    h.dp.set_endpoint_ip(
        IpAddr::from(a6),
        Endpoint {
            id: 600,
            node: 1,
            gen_: 1,
        },
    )?;
    h.expect(&packet6(b6, a6, 9000), true, Reason::AllowNoPolicy, "v6")?;
    h.expect(
        &packet6(b6, a6, 9000),
        true,
        Reason::AllowNoPolicy,
        "v6 again",
    )?;
    let cached = h.dp.cached_verdicts6()?;
    if VERDICT_CACHE_SUPPORTED {
        assert_eq!(cached.len(), 1, "{cached:?}");
        let (k, v) = cached[0];
        assert_eq!((k.src, k.dst, k.port, k.proto), (b6, a6, 9000, TCP));
        assert_eq!(
            (v.reason, v.expires_ns),
            (TS_REASON_ALLOW_NO_POLICY as u32, TS_EXPIRES_NEVER)
        );
    }
    // Policy now selects it: the cached allow no longer counts.
    h.select(600, TS_DEFAULT_DENY)?;
    h.expect(
        &packet6(b6, a6, 9000),
        false,
        Reason::DenyDefault,
        "v6 selected",
    )?;

    // With the cache off nothing is read or written.
    h.dp.set_verdict_cache(false)?;
    assert_eq!(h.dp.inputs_version()?, 0);
    h.select(600, 0)?;
    h.dp.remove_selected(600)?;
    let before = h.dp.cached_verdicts6()?;
    h.expect(
        &packet6(b6, a6, 9001),
        true,
        Reason::AllowNoPolicy,
        "cache off",
    )?;
    assert_eq!(h.dp.cached_verdicts6()?, before);
    Ok(())
}

/// IPv6 connection starts behind extension headers: the program walks
/// hop-by-hop, routing, destination options and fragment headers to the
/// TCP header and decides as for a plain SYN.
#[test]
fn ipv6_extension_headers_hide_no_connection_start() -> Result<()> {
    use tessera_bpf::packets::{Ext, ipv6_with};
    let mut h = Harness::new()?;
    h.dp.set_endpoint_ip(
        IpAddr::from(A6),
        Endpoint {
            id: 300,
            node: 1,
            gen_: 5,
        },
    )?;
    h.select(300, TS_DEFAULT_DENY)?;
    let syn = |exts: &[Ext]| ipv6_with(B6, A6, exts, TCP, 8080, SYN);
    let atomic = Ext::Fragment {
        offset: 0,
        more: false,
    };
    for (exts, what) in [
        (vec![Ext::DestOpts(0)], "destination options"),
        (vec![Ext::HopByHop(0)], "hop-by-hop"),
        (vec![Ext::Routing(1)], "routing"),
        (vec![atomic], "an atomic fragment"),
        (
            vec![Ext::HopByHop(1), Ext::Routing(0), Ext::DestOpts(2), atomic],
            "four headers",
        ),
    ] {
        h.expect(&syn(&exts), false, Reason::DenyDefault, what)?;
    }
    // The first fragment of a SYN carries its TCP header: checked.
    let first = Ext::Fragment {
        offset: 0,
        more: true,
    };
    h.expect(
        &syn(&[first]),
        false,
        Reason::DenyDefault,
        "a first fragment",
    )?;
    // Out of reach: a later fragment, or more extension headers than the
    // bound. Dropped on the way to a pod a policy selects...
    let later = Ext::Fragment {
        offset: 2,
        more: false,
    };
    let too_many = vec![Ext::DestOpts(0); TS_IPV6_MAX_EXT as usize + 1];
    let at_bound = vec![Ext::DestOpts(0); TS_IPV6_MAX_EXT as usize];
    h.expect(
        &syn(&[later]),
        false,
        Reason::DenyUnparsed,
        "a later fragment",
    )?;
    h.expect(
        &syn(&too_many),
        false,
        Reason::DenyUnparsed,
        "past the bound",
    )?;
    h.expect(&syn(&at_bound), false, Reason::DenyDefault, "at the bound")?;
    let mut later4 = packet(B, A, TCP, 8080, SYN);
    later4[14 + 6] = 0x00;
    later4[14 + 7] = 0x03; // fragment offset 3 (24 octets)
    h.select(300, TS_DEFAULT_DENY)?;
    h.expect(
        &later4,
        false,
        Reason::DenyUnparsed,
        "a later IPv4 fragment",
    )?;
    // ...and not checked to one no policy selects.
    h.select(300, 0)?;
    h.dp.remove_selected(300)?;
    h.expect(&syn(&too_many), true, Reason::PassNotChecked, "unprotected")?;
    h.expect(&later4, true, Reason::PassNotChecked, "unprotected v4")?;
    // A non-SYN behind headers, and ICMPv6, pass unchecked (no connection
    // starts with them).
    h.select(300, TS_DEFAULT_DENY)?;
    let ack = ipv6_with(B6, A6, &[Ext::DestOpts(0)], TCP, 8080, ACK);
    h.expect(&ack, true, Reason::PassNotChecked, "ack")?;
    let icmp = ipv6_with(B6, A6, &[Ext::DestOpts(0)], 58, 0, 0);
    h.expect(&icmp, true, Reason::PassNotChecked, "icmpv6")?;
    // A header cut short: malformed.
    let mut cut = syn(&[Ext::DestOpts(4)]);
    cut.truncate(14 + 40 + 2);
    h.expect(&cut, false, Reason::DenyMalformed, "cut short")?;
    Ok(())
}

/// ts_from_pod (tc, where a pod's traffic enters the node), run on frames
/// as if received on interface 1: an interface the agent did not register
/// passes everything; a registered one passes only its own addresses
/// (IPv4, IPv6, the sender of ARP, the target of neighbour advertisements;
/// link-local and unspecified IPv6 sources for neighbour discovery), only
/// ARP and IP, and its TCP connection starts get the egress gate's
/// decision.
#[test]
fn a_pod_sends_only_from_its_own_addresses() -> Result<()> {
    use tessera_bpf::packets::{arp, ipv6_with, neighbor_advert};
    const PASS: u32 = 0;
    const DROP: u32 = 2;
    let mut h = Harness::new()?;
    let from_pod = |h: &mut Harness, packet: &[u8], want: u32, what: &str| -> Result<()> {
        let before = h.dp.counter(Reason::DenySpoofed)?;
        let got = h.dp.test_from_pod(packet)?;
        let after = h.dp.counter(Reason::DenySpoofed)?;
        assert_eq!(got, want, "{what}");
        let counted = if want == DROP { 1 } else { 0 };
        assert_eq!(after - before, counted, "{what}: deny_spoofed");
        Ok(())
    };
    // Not registered: not checked.
    from_pod(&mut h, &packet(B, A, TCP, 8080, ACK), PASS, "unregistered")?;
    // Interface 1 belongs to the pod at B (and B6).
    h.dp.set_veth(1, &[IpAddr::from(B), IpAddr::from(B6)])?;
    from_pod(&mut h, &packet(B, A, TCP, 8080, ACK), PASS, "own IPv4")?;
    from_pod(
        &mut h,
        &packet(STRANGER, A, TCP, 8080, ACK),
        DROP,
        "foreign IPv4",
    )?;
    from_pod(
        &mut h,
        &packet(A, A, UDP, 53, 0),
        DROP,
        "a neighbour's IPv4",
    )?;
    from_pod(&mut h, &arp(B), PASS, "ARP for its own address")?;
    from_pod(&mut h, &arp([0; 4]), PASS, "ARP probe")?;
    from_pod(&mut h, &arp(A), DROP, "ARP claiming a neighbour's address")?;
    let v6 = |src: [u8; 16]| ipv6_with(src, A6, &[], TCP, 8080, ACK);
    from_pod(&mut h, &v6(B6), PASS, "own IPv6")?;
    from_pod(&mut h, &v6(A6), DROP, "a neighbour's IPv6")?;
    let mut link_local = [0u8; 16];
    link_local[0] = 0xfe;
    link_local[1] = 0x80;
    link_local[15] = 7;
    from_pod(&mut h, &v6(link_local), PASS, "link-local")?;
    from_pod(&mut h, &v6([0; 16]), PASS, "unspecified (DAD)")?;
    from_pod(
        &mut h,
        &neighbor_advert(link_local, B6),
        PASS,
        "NA for its own",
    )?;
    from_pod(
        &mut h,
        &neighbor_advert(link_local, A6),
        DROP,
        "NA claiming a neighbour's",
    )?;
    let mut vlan = packet(B, A, TCP, 8080, ACK);
    vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes()); // 802.1Q
    from_pod(&mut h, &vlan, DROP, "neither ARP nor IP")?;
    // Its connection start to a pod whose policy does not admit it: the
    // egress gate's decision, counted under its reason.
    h.select(300, TS_DEFAULT_DENY)?;
    let before = h.dp.counter(Reason::DenyDefault)?;
    assert_eq!(h.dp.test_from_pod(&packet(B, A, TCP, 8080, SYN))?, DROP);
    assert_eq!(h.dp.counter(Reason::DenyDefault)? - before, 1);
    // Admitted: passes.
    h.rule(300, 400, 8080, TS_VERDICT_ALLOW, 0)?;
    h.select(300, TS_DEFAULT_DENY | TS_SHAPE_EXACT)?;
    assert_eq!(h.dp.test_from_pod(&packet(B, A, TCP, 8080, SYN))?, PASS);
    // Removed: everything passes again.
    h.dp.remove_veth(1)?;
    assert!(h.dp.veths()?.is_empty() && h.dp.veth_ips()?.is_empty());
    from_pod(
        &mut h,
        &packet(STRANGER, A, TCP, 8080, ACK),
        PASS,
        "removed",
    )?;
    Ok(())
}
