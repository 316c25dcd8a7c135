//! Tessera's data path: the eBPF object built from `bpf/*.bpf.c` and the map
//! ABI it shares with the node agent (`include/tessera_abi.h`, mirrored in
//! [`abi`]).
// aya's `Pod` trait is unsafe to implement (it promises plain old data);
// only the ABI structs do, each with a comment. Nothing else may.
#![deny(unsafe_code)]

pub mod abi;
#[cfg(feature = "bench")]
pub mod cost;
pub mod datapath;
pub mod kfuncs;
pub mod packets;
pub mod pinning;

/// The compiled eBPF object (maps and programs), aligned for aya.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tessera.bpf.o"));

/// Program names in [`OBJECT`].
pub mod programs {
    /// cgroup_skb/ingress: checks TCP connection starts reaching local pods.
    pub const INGRESS: &str = "ts_ingress";
    /// cgroup/connect4: the IPv4 egress gate.
    pub const CONNECT4: &str = "ts_connect4";
    /// cgroup/connect6: the IPv6 egress gate.
    pub const CONNECT6: &str = "ts_connect6";
    /// sk_lookup: hands connections from outside the mesh to the agent's
    /// terminator sockets (attached per pod network namespace).
    pub const STEER: &str = "ts_steer";
    /// tc ingress on the host side of each local pod's veth: anti-spoofing
    /// and the egress gate for connection starts no connect() made.
    pub const FROM_POD: &str = "ts_from_pod";
    /// sockops on the pods' cgroup: records what each accepted connection
    /// was admitted as.
    pub const ESTABLISHED: &str = "ts_established";
    /// iter/tcp: resets the admitted connections the maps no longer allow
    /// (run by the agent in each network namespace it sweeps).
    pub const REVOKE: &str = "ts_revoke";
}

/// Map names in [`OBJECT`].
pub mod maps {
    /// Pod address -> endpoint.
    pub const EP_IP: &str = "ts_ep_ip";
    /// Pod cgroup id -> endpoint.
    pub const EP_CGROUP: &str = "ts_ep_cgroup";
    /// Ingress rules.
    pub const POLICY: &str = "ts_policy";
    /// Which rule kinds exist per identity, and default deny.
    pub const SELECTED: &str = "ts_selected";
    /// Authentications between identities.
    pub const AUTH: &str = "ts_auth";
    /// Pairs whose last handshake failed a moment ago (not pinned: a
    /// restarted agent tries them again).
    pub const AUTH_FAILED: &str = "ts_auth_failed";
    /// The global epoch (one u64).
    pub const EPOCH: &str = "ts_epoch";
    /// The version of the decision inputs (one u64; 0: verdict cache off).
    pub const VERSION: &str = "ts_version";
    /// The agent's auth cache MAC key (four u64 words; read by no program).
    pub const CACHE_KEY: &str = "ts_cache_key";
    /// Cached IPv4 ingress allow verdicts.
    pub const VERDICTS4: &str = "ts_verdicts4";
    /// Cached IPv6 ingress allow verdicts.
    pub const VERDICTS6: &str = "ts_verdicts6";
    /// Ring buffer of missing authentications.
    pub const EVENTS: &str = "ts_events";
    /// Rate limit of events per pair.
    pub const EVENT_LAST: &str = "ts_ev_last";
    /// Per-CPU decision counters, indexed by [`crate::abi::Reason`].
    pub const COUNTERS: &str = "ts_counters";
    /// Terminated pod address and port -> the agent's socket (not pinned:
    /// its sockets end with the agent, and with them the steering).
    pub const TERMINATORS: &str = "ts_terminators";
    /// The keys of [`TERMINATORS`] (not pinned, likewise): connections from
    /// outside the mesh to them are the agent's, which no sweep resets.
    pub const TERMINATED: &str = "ts_terminated";
    /// Pod address and port with HTTP rules -> the agent's waypoint socket
    /// (not pinned: its sockets end with the agent, and with them the
    /// steering).
    pub const WAYPOINTS: &str = "ts_waypoints";
    /// The pod addresses and ports with HTTP rules (pinned: while the agent
    /// is down, connection starts to them are refused).
    pub const WAYPOINTED: &str = "ts_waypointed";
    /// Cookies of the agent's terminator and waypoint sockets (not pinned,
    /// likewise).
    pub const TERMINATOR_SK: &str = "ts_terminator_sk";
    /// Host-side interfaces of local pods (ifindex -> 0).
    pub const VETHS: &str = "ts_veths";
    /// Addresses each of them may send from.
    pub const VETH_IPS: &str = "ts_veth_ips";
    /// What each admitted TCP connection was admitted as (socket storage;
    /// pinned, so a restarted agent still revokes connections made before).
    pub const CONNS: &str = "ts_conns";
    /// Every map, in the order the agent pins them.
    pub const ALL: &[&str] = &[
        EP_IP, EP_CGROUP, POLICY, SELECTED, AUTH, EPOCH, VERSION, VERDICTS4, VERDICTS6, EVENTS,
        EVENT_LAST, COUNTERS, CACHE_KEY, VETHS, VETH_IPS, CONNS, WAYPOINTED,
    ];
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of [`abi::AuthValue::expires_ns`]
/// (the programs read it with `bpf_ktime_get_coarse_ns`, at most one tick
/// behind).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64)
}
