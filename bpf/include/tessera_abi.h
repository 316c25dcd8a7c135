/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The map ABI shared by Tessera's eBPF programs and the node agent.
 *
 * Every struct here has a Rust twin in bpf/src/abi.rs; both sides assert the
 * same sizes and field offsets, so a change on one side that is not made on
 * the other fails to build. Bump TESSERA_ABI_VERSION on any change: maps are
 * pinned under a directory named after it, and an agent never reuses pinned
 * maps of another version.
 *
 * Byte order: IP addresses are in network order, as on the wire; every other
 * field is in host order.
 */
#ifndef TESSERA_ABI_H
#define TESSERA_ABI_H

#include <linux/types.h>

#define TESSERA_ABI_VERSION 8

/* Numeric identities below 256 are reserved (allocated ones start at 256). */
/* Any identity, in policy keys. */
#define TS_ID_ANY 0
/* A peer address the agent knows no endpoint for (outside the cluster, or
 * not yet known). Matches only "any peer" rules and never authenticates. */
#define TS_ID_UNKNOWN 1

/* An endpoint: who a pod address or pod cgroup belongs to.
 * Maps ts_ep_ip (struct ts_ip_key -> this) and ts_ep_cgroup (__u64 cgroup
 * id -> this). */
struct ts_endpoint {
	__u32 id;   /* numeric identity */
	__u32 node; /* index of the node the pod runs on */
	__u64 gen;  /* generation of the numeric identity */
};

/* An IPv6 address, or an IPv4 address mapped as ::ffff:a.b.c.d. */
struct ts_ip_key {
	__u8 addr[16];
};

/* ts_terminators (SOCKHASH): a local pod's address and TCP port whose
 * connections from peers outside the mesh (addresses without an endpoint)
 * the agent terminates: ts_steer hands them to the agent's socket.
 * ts_waypoints (SOCKHASH): a local pod's address and TCP port with HTTP
 * rules, every connection to which (from any peer) ts_steer hands to the
 * agent's waypoint socket; ts_waypointed (HASH, pinned) lists the same
 * keys for ts_ingress, which refuses connection starts to them that reach
 * any other socket, so that with the waypoint down the port refuses. The
 * agent's terminator and waypoint sockets are also listed by cookie in
 * ts_terminator_sk: ts_ingress lets connection starts reaching those
 * sockets through (the agent checks the peer itself). */
struct ts_term_key {
	__u8 addr[16];
	__u32 port; /* host order */
};

/* ts_veths (hash, ifindex -> __u32, 0): the host-side interfaces (veth
 * peers) of this node's pods, where ts_from_pod checks what each pod sends.
 * ts_veth_ips (hash, ts_veth_key -> __u32, 0): the addresses each of them
 * may send from. */
struct ts_veth_key {
	__u32 ifindex;
	__u8 addr[16]; /* as ts_ip_key */
};

/* ts_policy: the ingress decision of local identity `local` for traffic from
 * `remote` (TS_ID_ANY: any peer) to `port` (0: any port) over `proto`
 * (IPPROTO_TCP or IPPROTO_UDP; 0 with port 0). The programs look up, in this
 * order, (remote, port), (remote, any port), (any peer, port), (any peer,
 * any port), and the first entry found decides: the agent writes each entry
 * with the merged verdict of every rule that matches traffic reaching it
 * (a Deny wins; Allows add up their requirements), including an exact entry
 * wherever a (remote, any port) and an (any peer, port) rule overlap. */
struct ts_policy_key {
	__u32 local;
	__u32 remote;
	__u16 port;
	__u8 proto;
	__u8 pad; /* always 0 */
};

#define TS_VERDICT_ALLOW 1
#define TS_VERDICT_DENY 2

#define TS_RULE_AUTH 1 /* mutual authentication required */
#define TS_RULE_L7 2   /* HTTP rules apply: steer through the waypoint */

struct ts_policy_value {
	__u8 verdict; /* TS_VERDICT_* */
	__u8 flags;   /* TS_RULE_* */
	__u8 pad[2];  /* always 0 */
};

/* ts_selected: per local identity (__u32 key), which kinds of ts_policy keys
 * exist for it, so the programs look up only those, and whether an Allow
 * policy selects it (then traffic no rule allows is denied). An identity
 * with no entry has no policy: everything is allowed. */
#define TS_SHAPE_EXACT 1  /* remote and port */
#define TS_SHAPE_REMOTE 2 /* remote, any port */
#define TS_SHAPE_PORT 4   /* any remote, port */
#define TS_SHAPE_ANY 8    /* any remote, any port */
#define TS_DEFAULT_DENY 16

struct ts_selected {
	__u32 flags; /* TS_SHAPE_* | TS_DEFAULT_DENY */
};

/* ts_auth: the result of one mutual-TLS handshake between the agents of
 * `local`'s node and `remote_node`, for workload identities `local` and
 * `remote`. Valid only while both endpoints still carry the generations it
 * was made for, before `expires_ns` (CLOCK_MONOTONIC, read with the coarse clock: at most
 * one tick late) and while the global
 * epoch equals `epoch`. */
struct ts_auth_key {
	__u32 local;
	__u32 remote;
	__u32 remote_node;
	__u32 pad; /* always 0 */
};

struct ts_auth_value {
	__u64 local_gen;
	__u64 remote_gen;
	__u64 expires_ns;
	__u64 epoch;
};

/* ts_auth_failed (hash, struct ts_auth_key -> this): the agent's last
 * handshake for the pair failed (the peer refused it, or its agent could
 * not be reached). Until `until_ns` (CLOCK_MONOTONIC) the egress gate
 * refuses connections that need the authentication (EPERM,
 * TS_REASON_DENY_AUTH_FAILED) instead of holding them, and ts_revoke ends
 * the ones it holds. It counts only for the generations it was made for.
 * Not pinned: a restarted agent tries again. */
struct ts_auth_failure {
	__u64 local_gen;
	__u64 remote_gen;
	__u64 until_ns;
};

/* ts_events (ring buffer): a connection needed an authentication that was
 * missing or no longer valid. At most one per ts_auth_key per
 * TS_EVENT_INTERVAL_NS. */
#define TS_EVENT_INTERVAL_NS 100000000ULL

struct ts_auth_event {
	__u32 local;
	__u32 remote;
	__u32 remote_node;
	__u16 port;
	__u8 proto;
	__u8 reason; /* TS_REASON_DENY_AUTH_* */
	__u64 local_gen;
	__u64 remote_gen;
};

/* ts_verdicts4 / ts_verdicts6 (LRU): the ingress verdict cache. An allowed
 * connection start records its verdict under (source, destination,
 * destination port, protocol), with the version ts_version held when the
 * decision began; the next connection start of the same flow key reuses it
 * only while ts_version still holds that version and, for an authenticated
 * verdict, before the authentication's expiry. The agent writes a new version
 * after every change to any map the decision reads, so a cached verdict
 * never outlives a change of endpoint, generation, policy, authentication or
 * epoch. Denials are never cached. */
struct ts_flow4_key {
	__u32 src; /* network order */
	__u32 dst; /* network order */
	__u16 port;
	__u8 proto;
	__u8 pad; /* always 0 */
};

struct ts_flow6_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 port;
	__u8 proto;
	__u8 pad; /* always 0 */
};

/* An expiry that never comes (verdicts that need no authentication). */
#define TS_EXPIRES_NEVER 18446744073709551615ULL

struct ts_verdict {
	__u64 version;    /* ts_version when the decision began */
	__u64 expires_ns; /* the authentication's expiry, or TS_EXPIRES_NEVER */
	__u32 reason;     /* TS_REASON_ALLOW_* */
	__u32 pad;        /* always 0 */
};

/* ts_conns (socket storage): what a local pod's TCP connection was admitted
 * as, written when it is admitted (by the egress gate at connect(), for an
 * outbound one; when an inbound one is established, for the other), so that
 * ts_revoke can decide it again once the maps change: the connection stands
 * only while both endpoints are still the ones it began with and the
 * decision, made again with today's policy and authentications, allows. */
#define TS_CONN_OUTBOUND 1 /* the local pod connected (else it accepted) */
#define TS_CONN_AUTH 2     /* it rests on an authentication of epoch `epoch` */
/* Admitted by the egress gate to wait: while the authentication it needs is
 * pending (missing, stale, expired or of an older epoch), or while the
 * agent does not know the connecting pod yet (`local` has id
 * TS_ID_UNKNOWN; it takes the endpoint of its address once that is
 * known). Its connection starts are dropped (ts_from_pod, the
 * destination's ingress check) until the agents are ready. ts_revoke
 * leaves it alone for want of its authentication while it is connecting
 * and, once established, until `epoch` (CLOCK_MONOTONIC ns), when that
 * authentication must have arrived. */
#define TS_CONN_HELD 4

struct ts_conn {
	struct ts_endpoint local;  /* the local pod */
	struct ts_endpoint remote; /* the peer (id TS_ID_UNKNOWN: no endpoint) */
	__u64 cgroup; /* outbound: the pod cgroup the gate found (0: by address) */
	__u64 epoch;  /* TS_CONN_AUTH: the authentication's epoch; TS_CONN_HELD:
		       * the end of its grace once established (0: connecting) */
	__u16 port;   /* the destination port */
	__u8 flags;   /* TS_CONN_* */
	__u8 pad[5];  /* always 0 */
};

/* The call ts_revoke makes to the kfunc bpf_sock_destroy carries this
 * immediate in place of the kfunc's BTF id, which only the running kernel
 * knows: the agent writes the id there before loading the object. */
#define TS_KFUNC_SOCK_DESTROY 2119553879

/* What ts_revoke writes to its reader for each connection it resets. */
struct ts_revoked {
	__u8 local_addr[16];  /* as ts_ip_key */
	__u8 remote_addr[16]; /* as ts_ip_key */
	__u32 local_id;
	__u32 remote_id;
	__u16 local_port;  /* host order */
	__u16 remote_port; /* host order */
	__u32 reason;      /* the TS_REASON_DENY_* the decision gave */
};

/* ts_version (array of one __u64): the version of the decision inputs. 0
 * turns the verdict cache off (nothing is read from or written to it). */

/* Decision reasons: the index of each per-CPU counter in ts_counters, and
 * the reason field of events. */
enum ts_reason {
	TS_REASON_ALLOW_NO_POLICY = 0,
	TS_REASON_ALLOW_POLICY = 1,
	TS_REASON_ALLOW_AUTHENTICATED = 2,
	TS_REASON_PASS_UNMANAGED = 3, /* destination is not a known pod */
	TS_REASON_PASS_NOT_CHECKED = 4, /* not a connection start, or not TCP */
	TS_REASON_DENY_POLICY = 5,      /* a Deny rule matched */
	TS_REASON_DENY_DEFAULT = 6,     /* selected by an Allow, no rule allows */
	TS_REASON_DENY_AUTH_MISSING = 7,
	TS_REASON_DENY_AUTH_STALE = 8,  /* a generation changed */
	TS_REASON_DENY_AUTH_EXPIRED = 9,
	TS_REASON_DENY_AUTH_EPOCH = 10, /* revoked by an epoch bump */
	TS_REASON_DENY_MALFORMED = 11,
	/* to a pod a policy selects, a packet whose TCP header the program
	 * cannot reach: behind more than TS_IPV6_MAX_EXT IPv6 extension
	 * headers, or in a fragment other than the first */
	TS_REASON_DENY_UNPARSED = 12,
	/* from a pod, a packet with a source address (or an ARP or NDP claim)
	 * that is not the pod's own, or of a kind a pod has no reason to send */
	TS_REASON_DENY_SPOOFED = 13,
	/* an established connection whose endpoint changed since it began:
	 * the peer's address gone or given to another pod, or either side's
	 * identity or generation changed (ts_revoke only) */
	TS_REASON_DENY_ENDPOINT_CHANGED = 14,
	/* the authentication is missing and the agent's last handshake for
	 * the pair failed (see ts_auth_failed; egress gate and ts_revoke) */
	TS_REASON_DENY_AUTH_FAILED = 15,
	/* established connections ts_revoke reset (counted once each, beside
	 * nothing else: the reason is in its record) */
	TS_REASON_REVOKED = 16,
	TS_REASON_EVENTS_LOST = 17,     /* ring buffer full */
	/* connect() admitted by the egress gate while the authentication the
	 * destination's policy requires is pending: the connection start
	 * waits for it (TS_CONN_HELD) instead of failing */
	TS_REASON_HOLD_AUTH_PENDING = 18,
	/* connect() to a pod from a process in the pods' cgroups the agent
	 * has not mapped yet (a pod that has just started): admitted and
	 * held (TS_CONN_HELD); the destination's ingress check decides its
	 * connection starts, which are retried every few milliseconds */
	TS_REASON_HOLD_POD_PENDING = 19,
	/* a connection start to a pod address and port with HTTP rules
	 * (ts_waypointed) that did not reach the agent's waypoint socket:
	 * the waypoint is down or was never started, and nothing reaches
	 * the workload on that port unchecked; and (ts_revoke) a connection
	 * the workload accepted before its port had HTTP rules */
	TS_REASON_DENY_NO_WAYPOINT = 20,
	TS_REASON_COUNT = 21,
};

#define TS_MAX_ENDPOINTS 65536
#define TS_MAX_POLICY 262144
#define TS_MAX_SELECTED 65536
#define TS_MAX_AUTH 262144
#define TS_MAX_AUTH_FAILED 16384
#define TS_EVENTS_BYTES 262144 /* 256 KiB */
#define TS_MAX_EVENT_PAIRS 16384
#define TS_MAX_FLOWS 65536
#define TS_MAX_TERMINATORS 4096
/* Local pod addresses and ports with HTTP rules (ts_waypoints, ts_waypointed). */
#define TS_MAX_WAYPOINTED 65536
#define TS_MAX_VETHS 4096
#define TS_MAX_VETH_IPS 16384
/* Most IPv6 extension headers ts_ingress walks to reach the transport
 * header (a packet needs a handful at most; RFC 8200 asks each header to
 * appear once, the destination options header twice). */
#define TS_IPV6_MAX_EXT 8
/* Deepest cgroup level the connect gates search for a pod's cgroup. */
#define TS_CGROUP_DEPTH 16

/* Layout checks; bpf/src/abi.rs asserts the same numbers. */
#define TS_ASSERT_SIZE(t, n) _Static_assert(sizeof(struct t) == (n), #t " size")
#define TS_ASSERT_OFF(t, f, n) \
	_Static_assert(__builtin_offsetof(struct t, f) == (n), #t "." #f " offset")

TS_ASSERT_SIZE(ts_endpoint, 16);
TS_ASSERT_SIZE(ts_term_key, 20);
TS_ASSERT_SIZE(ts_veth_key, 20);
TS_ASSERT_OFF(ts_veth_key, addr, 4);
TS_ASSERT_OFF(ts_endpoint, node, 4);
TS_ASSERT_OFF(ts_endpoint, gen, 8);
TS_ASSERT_SIZE(ts_ip_key, 16);
TS_ASSERT_SIZE(ts_policy_key, 12);
TS_ASSERT_OFF(ts_policy_key, remote, 4);
TS_ASSERT_OFF(ts_policy_key, port, 8);
TS_ASSERT_OFF(ts_policy_key, proto, 10);
TS_ASSERT_SIZE(ts_policy_value, 4);
TS_ASSERT_OFF(ts_policy_value, flags, 1);
TS_ASSERT_SIZE(ts_selected, 4);
TS_ASSERT_SIZE(ts_auth_key, 16);
TS_ASSERT_OFF(ts_auth_key, remote_node, 8);
TS_ASSERT_SIZE(ts_auth_value, 32);
TS_ASSERT_OFF(ts_auth_value, remote_gen, 8);
TS_ASSERT_OFF(ts_auth_value, expires_ns, 16);
TS_ASSERT_OFF(ts_auth_value, epoch, 24);
TS_ASSERT_SIZE(ts_auth_failure, 24);
TS_ASSERT_OFF(ts_auth_failure, remote_gen, 8);
TS_ASSERT_OFF(ts_auth_failure, until_ns, 16);
TS_ASSERT_SIZE(ts_auth_event, 32);
TS_ASSERT_OFF(ts_auth_event, port, 12);
TS_ASSERT_OFF(ts_auth_event, proto, 14);
TS_ASSERT_OFF(ts_auth_event, reason, 15);
TS_ASSERT_OFF(ts_auth_event, local_gen, 16);
TS_ASSERT_OFF(ts_auth_event, remote_gen, 24);
TS_ASSERT_SIZE(ts_flow4_key, 12);
TS_ASSERT_OFF(ts_flow4_key, dst, 4);
TS_ASSERT_OFF(ts_flow4_key, port, 8);
TS_ASSERT_OFF(ts_flow4_key, proto, 10);
TS_ASSERT_SIZE(ts_flow6_key, 36);
TS_ASSERT_OFF(ts_flow6_key, dst, 16);
TS_ASSERT_OFF(ts_flow6_key, port, 32);
TS_ASSERT_OFF(ts_flow6_key, proto, 34);
TS_ASSERT_SIZE(ts_conn, 56);
TS_ASSERT_OFF(ts_conn, remote, 16);
TS_ASSERT_OFF(ts_conn, cgroup, 32);
TS_ASSERT_OFF(ts_conn, epoch, 40);
TS_ASSERT_OFF(ts_conn, port, 48);
TS_ASSERT_OFF(ts_conn, flags, 50);
TS_ASSERT_SIZE(ts_revoked, 48);
TS_ASSERT_OFF(ts_revoked, remote_addr, 16);
TS_ASSERT_OFF(ts_revoked, local_id, 32);
TS_ASSERT_OFF(ts_revoked, remote_id, 36);
TS_ASSERT_OFF(ts_revoked, local_port, 40);
TS_ASSERT_OFF(ts_revoked, remote_port, 42);
TS_ASSERT_OFF(ts_revoked, reason, 44);
TS_ASSERT_SIZE(ts_verdict, 24);
TS_ASSERT_OFF(ts_verdict, expires_ns, 8);
TS_ASSERT_OFF(ts_verdict, reason, 16);

#endif /* TESSERA_ABI_H */
