// SPDX-License-Identifier: GPL-2.0-only
/*
 * Tessera's data path.
 *
 * ts_ingress (cgroup_skb/ingress, attached to the pods' cgroup): checks every
 * TCP connection start (SYN without ACK) that reaches a local pod against
 * that pod's policy and, where the policy requires it, against the
 * authentication the agents recorded for the pair. IPv6 extension headers
 * are walked (at most TS_IPV6_MAX_EXT) to the TCP header; a packet to a pod
 * a policy selects whose TCP header cannot be reached that way is dropped.
 * Everything else passes.
 *
 * ts_from_pod (tc ingress on the host side of each local pod's veth, where
 * everything a pod sends enters the node, raw and packet sockets included):
 * a pod sends only from its own addresses (IPv4, IPv6 other than link-local
 * and unspecified ones for neighbour discovery, the sender of its ARP
 * packets, the target of its neighbour advertisements), only ARP, IPv4 and
 * IPv6, and its TCP connection starts get the egress gate's decision even
 * when no connect() made them.
 *
 * ts_connect4 / ts_connect6 (cgroup/connect4|6): the egress gate. A pod's
 * TCP connect() to a pod the destination's policy does not admit fails at
 * once with EPERM instead of timing out. One the policy admits once the
 * pair is authenticated, while that authentication is missing, stale,
 * expired or of an older epoch, is reported to the agent through ts_events
 * and held: connect() goes ahead, its SYNs are dropped (ts_from_pod, the
 * destination's ts_ingress) and retried every few milliseconds (ts_established)
 * until the agents have authenticated the pair, so a new pod's first
 * connection waits for its handshake instead of failing.
 *
 * An authentication allows only while both endpoints carry the generations
 * it was made for, before it expires, and while the global epoch is the one
 * it was made in: a reused address, cgroup or numeric identity never
 * inherits another workload's authentication.
 *
 * ts_ingress caches allow verdicts per flow key (ts_verdicts4/6): a cached
 * verdict counts only while ts_version is unchanged, and the agent writes a
 * new version after every change to the maps a decision reads, so the cache
 * saves the lookups without ever outliving a change.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "tessera_abi.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_ENDPOINTS);
	__type(key, struct ts_ip_key);
	__type(value, struct ts_endpoint);
} ts_ep_ip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_ENDPOINTS);
	__type(key, __u64);
	__type(value, struct ts_endpoint);
} ts_ep_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_POLICY);
	__type(key, struct ts_policy_key);
	__type(value, struct ts_policy_value);
} ts_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_SELECTED);
	__type(key, __u32);
	__type(value, struct ts_selected);
} ts_selected SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_AUTH);
	__type(key, struct ts_auth_key);
	__type(value, struct ts_auth_value);
} ts_auth SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_AUTH_FAILED);
	__type(key, struct ts_auth_key);
	__type(value, struct ts_auth_failure);
} ts_auth_failed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ts_epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ts_version SEC(".maps");

/* The auth cache's MAC key (four words), kept here so it outlives the agent
 * (pinned) yet never lives in the agent's state directory. No program reads
 * it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} ts_cache_key SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(max_entries, TS_MAX_FLOWS);
	__type(key, struct ts_flow4_key);
	__type(value, struct ts_verdict);
} ts_verdicts4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(max_entries, TS_MAX_FLOWS);
	__type(key, struct ts_flow6_key);
	__type(value, struct ts_verdict);
} ts_verdicts6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TS_EVENTS_BYTES);
} ts_events SEC(".maps");

/* When an event was last sent for a pair (rate limit). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TS_MAX_EVENT_PAIRS);
	__type(key, struct ts_auth_key);
	__type(value, __u64);
} ts_ev_last SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TS_REASON_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} ts_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, TS_MAX_TERMINATORS);
	__type(key, struct ts_term_key);
	__type(value, __u32);
} ts_terminators SEC(".maps");

/* The addresses and ports of ts_terminators, as plain keys: a connection
 * from outside the mesh to one of them is the agent's, not the pod's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_TERMINATORS);
	__type(key, struct ts_term_key);
	__type(value, __u32);
} ts_terminated SEC(".maps");

/* Ports with HTTP rules: the agent's waypoint socket for each (see
 * ts_steer), and the same keys, pinned, for ts_ingress (ts_waypointed). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, TS_MAX_WAYPOINTED);
	__type(key, struct ts_term_key);
	__type(value, __u32);
} ts_waypoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_WAYPOINTED);
	__type(key, struct ts_term_key);
	__type(value, __u32);
} ts_waypointed SEC(".maps");

/* Cookies of the agent's terminator and waypoint sockets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_TERMINATORS + TS_MAX_WAYPOINTED);
	__type(key, __u64);
	__type(value, __u32);
} ts_terminator_sk SEC(".maps");

/* What each local pod's TCP connection was admitted as (see ts_revoke). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ts_conn);
} ts_conns SEC(".maps");

/* The host-side interfaces of this node's pods (see ts_from_pod). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_VETHS);
	__type(key, __u32);
	__type(value, __u32);
} ts_veths SEC(".maps");

/* The addresses each of them may send from. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TS_MAX_VETH_IPS);
	__type(key, struct ts_veth_key);
	__type(value, __u32);
} ts_veth_ips SEC(".maps");

static __always_inline void count(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&ts_counters, &reason);

	if (n)
		*n += 1;
}

static __always_inline int is_deny(__u32 reason)
{
	return (reason >= TS_REASON_DENY_POLICY && reason <= TS_REASON_DENY_AUTH_FAILED) ||
	       reason == TS_REASON_DENY_NO_WAYPOINT;
}

/* Whether a denial is only for want of an authentication a handshake can
 * give (missing, for other generations, expired, of an older epoch). */
static __always_inline int auth_pending(__u32 reason)
{
	return reason >= TS_REASON_DENY_AUTH_MISSING && reason <= TS_REASON_DENY_AUTH_EPOCH;
}

/* The ts_policy entry for one key shape, if any. */
static __always_inline struct ts_policy_value *rule(__u32 local, __u32 remote, __u16 port,
						    __u8 proto)
{
	struct ts_policy_key key = {
		.local = local,
		.remote = remote,
		.port = port,
		.proto = proto,
		.pad = 0,
	};

	return bpf_map_lookup_elem(&ts_policy, &key);
}

/* The policy flags of identity `local` (its ts_selected entry; 0: no policy
 * selects it). */
static __always_inline __u32 shapes_of(__u32 local)
{
	struct ts_selected *sel = bpf_map_lookup_elem(&ts_selected, &local);

	return sel ? sel->flags : 0;
}

/* The ingress policy of identity `local` (whose flags are `shapes`) for
 * traffic from `remote` to port/proto: a TS_REASON_*; *flags gets the
 * TS_RULE_* the allowing entry requires. The agent writes every entry with
 * the merged verdict of all rules that match its traffic, so the first entry
 * found, most specific first, decides. */
static __always_inline __u32 policy(__u32 shapes, __u32 local, __u32 remote, __u16 port,
				    __u8 proto, __u8 *flags)
{
	struct ts_policy_value *v = 0;

	*flags = 0;
	if (shapes & TS_SHAPE_EXACT)
		v = rule(local, remote, port, proto);
	if (!v && (shapes & TS_SHAPE_REMOTE))
		v = rule(local, remote, 0, 0);
	if (!v && (shapes & TS_SHAPE_PORT))
		v = rule(local, TS_ID_ANY, port, proto);
	if (!v && (shapes & TS_SHAPE_ANY))
		v = rule(local, TS_ID_ANY, 0, 0);
	if (!v)
		return (shapes & TS_DEFAULT_DENY) ? TS_REASON_DENY_DEFAULT
						  : TS_REASON_ALLOW_NO_POLICY;
	if (v->verdict != TS_VERDICT_ALLOW)
		return TS_REASON_DENY_POLICY;
	*flags = v->flags;
	return TS_REASON_ALLOW_POLICY;
}

/* The ts_auth / ts_auth_failed / ts_ev_last key of `local` with `remote`. */
static __always_inline struct ts_auth_key auth_key_of(const struct ts_endpoint *local,
						      const struct ts_endpoint *remote)
{
	struct ts_auth_key key = {
		.local = local->id,
		.remote = remote->id,
		.remote_node = remote->node,
		.pad = 0,
	};

	return key;
}

/* Whether the agents authenticated `local` with `remote` (on remote->node)
 * for the endpoints' current generations, and not expired at `now`
 * (CLOCK_MONOTONIC ns): a TS_REASON_*. */
static __always_inline __u32 authenticated(const struct ts_endpoint *local,
					   const struct ts_endpoint *remote, __u64 now,
					   __u64 *expires)
{
	struct ts_auth_key key = auth_key_of(local, remote);
	struct ts_auth_value *a;
	__u32 zero = 0;
	__u64 *epoch;

	if (remote->id == TS_ID_UNKNOWN)
		return TS_REASON_DENY_AUTH_MISSING;
	a = bpf_map_lookup_elem(&ts_auth, &key);
	if (!a)
		return TS_REASON_DENY_AUTH_MISSING;
	epoch = bpf_map_lookup_elem(&ts_epoch, &zero);
	if (!epoch || a->epoch != *epoch)
		return TS_REASON_DENY_AUTH_EPOCH;
	if (a->local_gen != local->gen || a->remote_gen != remote->gen)
		return TS_REASON_DENY_AUTH_STALE;
	if (a->expires_ns <= now)
		return TS_REASON_DENY_AUTH_EXPIRED;
	*expires = a->expires_ns;
	return TS_REASON_ALLOW_AUTHENTICATED;
}

/* Whether the agent's last handshake of `local` with `remote` failed, for
 * these generations, less than its retry interval before `now`. */
static __always_inline int handshake_failed(const struct ts_endpoint *local,
					    const struct ts_endpoint *remote, __u64 now)
{
	struct ts_auth_key key = auth_key_of(local, remote);
	struct ts_auth_failure *f = bpf_map_lookup_elem(&ts_auth_failed, &key);

	return f && f->local_gen == local->gen && f->remote_gen == remote->gen &&
	       now < f->until_ns;
}

/* Tells the agent (rate-limited) that `local`'s node needs an authentication
 * with `remote`. */
static __always_inline void report(const struct ts_endpoint *local,
				   const struct ts_endpoint *remote, __u16 port, __u8 proto,
				   __u32 reason)
{
	struct ts_auth_key key = auth_key_of(local, remote);
	struct ts_auth_event ev = {
		.local = local->id,
		.remote = remote->id,
		.remote_node = remote->node,
		.port = port,
		.proto = proto,
		.reason = (__u8)reason,
		.local_gen = local->gen,
		.remote_gen = remote->gen,
	};
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 *last = bpf_map_lookup_elem(&ts_ev_last, &key);

	if (remote->id == TS_ID_UNKNOWN)
		return;
	if (last && now - *last < TS_EVENT_INTERVAL_NS)
		return;
	bpf_map_update_elem(&ts_ev_last, &key, &now, BPF_ANY);
	if (bpf_ringbuf_output(&ts_events, &ev, sizeof(ev), 0))
		count(TS_REASON_EVENTS_LOST);
}

/* The full decision for a connection from `src` to `dst`: dst's policy, then
 * the authentication of the pair as seen from `me` (the endpoint whose node
 * is deciding) toward `peer`. *expires gets when an allow ends
 * (TS_EXPIRES_NEVER unless it rests on an authentication). */
static __always_inline __u32 decide(__u32 shapes, const struct ts_endpoint *dst,
				    const struct ts_endpoint *src, const struct ts_endpoint *me,
				    const struct ts_endpoint *peer, __u16 port, __u8 proto,
				    __u64 *expires)
{
	__u8 flags = 0;
	__u32 reason = policy(shapes, dst->id, src->id, port, proto, &flags);

	*expires = TS_EXPIRES_NEVER;
	if (is_deny(reason) || !(flags & TS_RULE_AUTH))
		return reason;
	reason = authenticated(me, peer, bpf_ktime_get_coarse_ns(), expires);
	if (reason != TS_REASON_ALLOW_AUTHENTICATED)
		report(me, peer, port, proto, reason);
	return reason;
}

static __always_inline void ip4_key(struct ts_ip_key *k, __u32 addr)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &addr, 4);
}

/* The endpoint of an address, or the unknown peer. */
static __always_inline struct ts_endpoint lookup_ip(const struct ts_ip_key *k, int *known)
{
	struct ts_endpoint unknown = { .id = TS_ID_UNKNOWN, .node = 0, .gen = 0 };
	struct ts_endpoint *ep = bpf_map_lookup_elem(&ts_ep_ip, k);

	*known = ep != 0;
	return ep ? *ep : unknown;
}

/* Reads `len` bytes at `off` of the packet: straight from the linear data
 * when it is there (the usual case), else through bpf_skb_load_bytes. The
 * headers are read as if 4-byte aligned (wide loads instead of byte loads);
 * on the architectures the agent supports (x86-64, arm64) unaligned loads
 * are valid, and the verifier only checks alignment where they are not. */
static __always_inline int read_packet(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= 64 && data + off + len <= end) {
		__builtin_memcpy(to, __builtin_assume_aligned(data + off, 4), len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline int ip6_is_ext(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	       next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
}

/* Walks the IPv6 extension headers from offset *off, where a header of type
 * *next begins, to the transport header: 0 with *next and *off naming it;
 * TS_L4_UNREACHABLE when it cannot be reached (more than TS_IPV6_MAX_EXT
 * extension headers, or a fragment other than the first); -1 when the
 * packet ends inside a header. */
#define TS_L4_UNREACHABLE 1
static __always_inline int ip6_transport(struct __sk_buff *skb, __u8 *next, __u32 *off)
{
	__u8 hdr[4];
	int i;

	for (i = 0; i < TS_IPV6_MAX_EXT; i++) {
		if (!ip6_is_ext(*next))
			return 0;
		if (read_packet(skb, *off, hdr, sizeof(hdr)))
			return -1;
		if (*next == IPPROTO_FRAGMENT) {
			/* Fragment offset (13 bits, in 8-octet units): only the
			 * first fragment carries the transport header. */
			if ((((__u16)hdr[2] << 8) | hdr[3]) & 0xfff8)
				return TS_L4_UNREACHABLE;
			*off += 8;
		} else if (*next == IPPROTO_AH) {
			*off += ((__u32)hdr[1] + 2) * 4;
		} else {
			*off += ((__u32)hdr[1] + 1) * 8;
		}
		*next = hdr[0];
	}
	return ip6_is_ext(*next) ? TS_L4_UNREACHABLE : 0;
}

/* A packet whose transport header cannot be reached: dropped when it goes
 * to a pod a policy selects (counted as TS_REASON_DENY_UNPARSED), passed
 * otherwise. */
static __always_inline int unparsed(const struct ts_ip_key *dst_key)
{
	int known;
	struct ts_endpoint dst = lookup_ip(dst_key, &known);

	if (known && shapes_of(dst.id)) {
		count(TS_REASON_DENY_UNPARSED);
		return 0;
	}
	count(TS_REASON_PASS_NOT_CHECKED);
	return 1;
}

/* The version of the decision inputs (0: the verdict cache is off). */
static __always_inline __u64 inputs_version(void)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&ts_version, &zero);

	return v ? *v : 0;
}

/* Whether `v` is a verdict made at `version` that has not expired; counts
 * it if so. */
static __always_inline int still_valid(const struct ts_verdict *v, __u64 version)
{
	if (!v || v->version != version)
		return 0;
	if (v->expires_ns != TS_EXPIRES_NEVER && v->expires_ns <= bpf_ktime_get_coarse_ns())
		return 0;
	count(v->reason);
	return 1;
}

/* Whether `addr`:`port` is a local pod's port with HTTP rules (see
 * ts_waypointed). */
static __always_inline int waypointed(const struct ts_ip_key *addr, __u16 port)
{
	struct ts_term_key key = { .port = port };

	__builtin_memcpy(key.addr, addr->addr, 16);
	return bpf_map_lookup_elem(&ts_waypointed, &key) != 0;
}

SEC("cgroup_skb/ingress")
int ts_ingress(struct __sk_buff *skb)
{
	struct ts_flow4_key f4 = {};
	struct ts_flow6_key f6 = {};
	struct ts_ip_key src_key, dst_key;
	struct ts_endpoint src, dst;
	struct ts_verdict verdict = {};
	struct tcphdr tcp;
	__u32 l4_off, reason, shapes;
	int src_known, dst_known, v6 = 0;
	__u64 version, expires = TS_EXPIRES_NEVER;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (read_packet(skb, 0, &ip, sizeof(ip)))
			goto malformed;
		/* The kernel reassembles fragments before this hook; a later
		 * fragment seen here anyway carries no TCP header to check. */
		if (ip.frag_off & bpf_htons(0x1fff)) {
			ip4_key(&dst_key, ip.daddr);
			return unparsed(&dst_key);
		}
		if (ip.protocol != IPPROTO_TCP) {
			count(TS_REASON_PASS_NOT_CHECKED);
			return 1;
		}
		l4_off = ip.ihl * 4;
		if (l4_off < sizeof(ip))
			goto malformed;
		f4.src = ip.saddr;
		f4.dst = ip.daddr;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		__u8 next;
		int walked;

		if (read_packet(skb, 0, &ip6, sizeof(ip6)))
			goto malformed;
		next = ip6.nexthdr;
		l4_off = sizeof(ip6);
		walked = ip6_transport(skb, &next, &l4_off);
		if (walked < 0)
			goto malformed;
		if (walked == TS_L4_UNREACHABLE) {
			__builtin_memcpy(dst_key.addr, &ip6.daddr, 16);
			return unparsed(&dst_key);
		}
		if (next != IPPROTO_TCP) {
			count(TS_REASON_PASS_NOT_CHECKED);
			return 1;
		}
		__builtin_memcpy(f6.src, &ip6.saddr, 16);
		__builtin_memcpy(f6.dst, &ip6.daddr, 16);
		v6 = 1;
	} else {
		count(TS_REASON_PASS_NOT_CHECKED);
		return 1;
	}
	if (read_packet(skb, l4_off, &tcp, sizeof(tcp)))
		goto malformed;
	if (!tcp.syn || tcp.ack) {
		count(TS_REASON_PASS_NOT_CHECKED);
		return 1;
	}
	/* Read before any input: a change made during this decision leaves the
	 * verdict cached under the old version, which no longer counts. */
	version = inputs_version();
	if (v6) {
		f6.port = bpf_ntohs(tcp.dest);
		f6.proto = IPPROTO_TCP;
		if (version && still_valid(bpf_map_lookup_elem(&ts_verdicts6, &f6), version))
			return 1;
		__builtin_memcpy(src_key.addr, f6.src, 16);
		__builtin_memcpy(dst_key.addr, f6.dst, 16);
	} else {
		f4.port = bpf_ntohs(tcp.dest);
		f4.proto = IPPROTO_TCP;
		if (version && still_valid(bpf_map_lookup_elem(&ts_verdicts4, &f4), version))
			return 1;
		ip4_key(&src_key, f4.src);
		ip4_key(&dst_key, f4.dst);
	}
	dst = lookup_ip(&dst_key, &dst_known);
	if (!dst_known) {
		count(TS_REASON_PASS_UNMANAGED);
		return 1;
	}
	/* A port with HTTP rules: only the agent's waypoint socket (ts_steer
	 * handed the connection there) may take a connection start; never
	 * cached, so a waypoint gone leaves nothing admitted behind it. The
	 * agent bumps the version when it adds a key, which drops verdicts
	 * cached before. */
	if (waypointed(&dst_key, bpf_ntohs(tcp.dest))) {
		__u64 cookie = bpf_get_socket_cookie(skb);

		if (bpf_map_lookup_elem(&ts_terminator_sk, &cookie)) {
			count(TS_REASON_PASS_UNMANAGED);
			return 1;
		}
		count(TS_REASON_DENY_NO_WAYPOINT);
		return 0;
	}
	shapes = shapes_of(dst.id);
	if (!shapes) {
		/* No policy selects the destination: who the source is does not
		 * matter. */
		reason = TS_REASON_ALLOW_NO_POLICY;
	} else {
		src = lookup_ip(&src_key, &src_known);
		/* A peer outside the mesh whose connection start reaches one of
		 * the agent's terminator sockets (ts_steer handed it there): the
		 * agent authenticates it. A cookie is never reused, so a socket
		 * that closed lets nothing through to whoever listens next. */
		if (!src_known) {
			__u64 cookie = bpf_get_socket_cookie(skb);

			if (bpf_map_lookup_elem(&ts_terminator_sk, &cookie)) {
				count(TS_REASON_PASS_UNMANAGED);
				return 1;
			}
		}
		reason = decide(shapes, &dst, &src, &dst, &src, bpf_ntohs(tcp.dest), IPPROTO_TCP,
				&expires);
	}
	count(reason);
	if (is_deny(reason))
		return 0;
	if (version) {
		verdict.version = version;
		verdict.expires_ns = expires;
		verdict.reason = reason;
		if (v6)
			bpf_map_update_elem(&ts_verdicts6, &f6, &verdict, BPF_ANY);
		else
			bpf_map_update_elem(&ts_verdicts4, &f4, &verdict, BPF_ANY);
	}
	return 1;
malformed:
	count(TS_REASON_DENY_MALFORMED);
	return 0;
}

/* The pod the calling process belongs to: its cgroup's entry, or the entry
 * of the nearest ancestor (containers' cgroups sit below their pod's);
 * *found gets the cgroup whose entry it is. */
static __always_inline struct ts_endpoint *current_pod(__u64 *found)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct ts_endpoint *ep = bpf_map_lookup_elem(&ts_ep_cgroup, &cgroup);
	int level;

	*found = cgroup;
	if (ep)
		return ep;
	for (level = TS_CGROUP_DEPTH; level > 0; level--) {
		cgroup = bpf_get_current_ancestor_cgroup_id(level);
		if (!cgroup)
			continue;
		*found = cgroup;
		ep = bpf_map_lookup_elem(&ts_ep_cgroup, &cgroup);
		if (ep)
			return ep;
	}
	return 0;
}

/* The global epoch now. */
static __always_inline __u64 current_epoch(void)
{
	__u32 zero = 0;
	__u64 *epoch = bpf_map_lookup_elem(&ts_epoch, &zero);

	return epoch ? *epoch : 0;
}

/* Records what socket `sk` was admitted as (see ts_conns); `reason` is the
 * decision that admitted it. */
static __always_inline void stamp(void *sk, const struct ts_endpoint *local,
				  const struct ts_endpoint *remote, __u64 cgroup, __u16 port,
				  __u8 flags, __u32 reason)
{
	struct ts_conn *c = bpf_sk_storage_get(&ts_conns, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!c)
		return;
	c->local = *local;
	c->remote = *remote;
	c->cgroup = cgroup;
	c->port = port;
	c->epoch = 0;
	if (reason == TS_REASON_ALLOW_AUTHENTICATED) {
		flags |= TS_CONN_AUTH;
		c->epoch = current_epoch();
	}
	c->flags = flags;
}

/* The egress gate for a connect() of socket `sk` to `dst_key`:`port`. */
static __always_inline int gate(struct bpf_sock *sk, const struct ts_ip_key *dst_key, __u16 port,
				__u32 proto)
{
	__u64 cgroup = 0;
	struct ts_endpoint *me = current_pod(&cgroup);
	struct ts_endpoint src, dst;
	__u64 expires;
	int dst_known;
	__u32 reason;

	if (proto != IPPROTO_TCP) {
		count(TS_REASON_PASS_NOT_CHECKED);
		return 1;
	}
	dst = lookup_ip(dst_key, &dst_known);
	if (!dst_known) {
		count(TS_REASON_PASS_UNMANAGED);
		return 1;
	}
	if (!me) {
		/* In the pods' cgroups, not a pod the agent knows yet (one that
		 * has just started, before its status reached the agent; or the
		 * agent itself): not decided here. Its connection starts wait
		 * for the destination's ingress check (see TS_CONN_HELD). */
		struct ts_endpoint unknown = { .id = TS_ID_UNKNOWN };

		count(TS_REASON_HOLD_POD_PENDING);
		if (sk)
			stamp(sk, &unknown, &dst, 0, port, TS_CONN_OUTBOUND | TS_CONN_HELD, 0);
		return 1;
	}
	src = *me;
	reason = decide(shapes_of(dst.id), &dst, &src, &src, &dst, port, IPPROTO_TCP, &expires);
	if (auth_pending(reason) && handshake_failed(&src, &dst, bpf_ktime_get_coarse_ns()))
		reason = TS_REASON_DENY_AUTH_FAILED;
	if (auth_pending(reason) && sk) {
		/* decide() asked the agent for the handshake: the connection
		 * waits for it rather than failing (see TS_CONN_HELD). */
		count(TS_REASON_HOLD_AUTH_PENDING);
		stamp(sk, &src, &dst, cgroup, port, TS_CONN_OUTBOUND | TS_CONN_HELD, reason);
		return 1;
	}
	count(reason);
	if (is_deny(reason))
		return 0;
	if (sk)
		stamp(sk, &src, &dst, cgroup, port, TS_CONN_OUTBOUND, reason);
	return 1;
}

SEC("cgroup/connect4")
int ts_connect4(struct bpf_sock_addr *ctx)
{
	struct ts_ip_key key;

	ip4_key(&key, ctx->user_ip4);
	return gate(ctx->sk, &key, bpf_ntohs((__u16)ctx->user_port), ctx->protocol);
}

SEC("cgroup/connect6")
int ts_connect6(struct bpf_sock_addr *ctx)
{
	struct ts_ip_key key;
	__u32 *words = (__u32 *)key.addr;

	words[0] = ctx->user_ip6[0];
	words[1] = ctx->user_ip6[1];
	words[2] = ctx->user_ip6[2];
	words[3] = ctx->user_ip6[3];
	return gate(ctx->sk, &key, bpf_ntohs((__u16)ctx->user_port), ctx->protocol);
}

#define TS_AF_INET 2
#define TS_AF_INET6 10

/* ts_steer (sk_lookup, attached to the network namespace of each local pod
 * with terminated ports or ports with HTTP rules): a TCP connection start
 * to a port with HTTP rules goes to the agent's waypoint socket, whoever
 * the peer is; one from a peer outside the mesh (its address has no
 * endpoint) to a terminated address and port goes to the agent's
 * terminator socket. Everything else, mesh peers included, takes the
 * usual lookup and then ts_ingress. */
SEC("sk_lookup")
int ts_steer(struct bpf_sk_lookup *ctx)
{
	struct ts_term_key key = {};
	struct ts_ip_key remote;
	struct bpf_sock *sk;
	int known;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == TS_AF_INET) {
		ip4_key((struct ts_ip_key *)key.addr, ctx->local_ip4);
		ip4_key(&remote, ctx->remote_ip4);
	} else if (ctx->family == TS_AF_INET6) {
		__u32 *l = (__u32 *)key.addr;
		__u32 *r = (__u32 *)remote.addr;

		l[0] = ctx->local_ip6[0];
		l[1] = ctx->local_ip6[1];
		l[2] = ctx->local_ip6[2];
		l[3] = ctx->local_ip6[3];
		r[0] = ctx->remote_ip6[0];
		r[1] = ctx->remote_ip6[1];
		r[2] = ctx->remote_ip6[2];
		r[3] = ctx->remote_ip6[3];
	} else {
		return SK_PASS;
	}
	key.port = ctx->local_port;
	/* A peer outside the mesh on a terminated port: the terminator first
	 * (on a port with HTTP rules it hands the decrypted requests to the
	 * waypoint's checks itself). */
	sk = 0;
	lookup_ip(&remote, &known);
	if (!known)
		sk = bpf_map_lookup_elem(&ts_terminators, &key);
	/* Ports with HTTP rules: every other peer goes through the waypoint. */
	if (!sk)
		sk = bpf_map_lookup_elem(&ts_waypoints, &key);
	if (!sk)
		return SK_PASS;
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}

/* Whether the agent terminates connections from outside the mesh to
 * `addr`:`port` (see ts_steer). */
static __always_inline int terminated(const struct ts_ip_key *addr, __u16 port)
{
	struct ts_term_key key = { .port = port };

	__builtin_memcpy(key.addr, addr->addr, 16);
	return bpf_map_lookup_elem(&ts_terminated, &key) != 0;
}

/* The SYN retransmission timeout of a connection the egress gate admitted
 * to a pod, in jiffies: one (4 ms at HZ=250, 1 ms at HZ=1000) instead of
 * the kernel's 1 s, so that a connection start dropped while the
 * destination's agent catches up (a pod that has just started) is tried
 * again within milliseconds rather than after a second. */
#define TS_SYN_RTO_JIFFIES 1
/* The SYN retransmissions such a connection gets: with that timeout the
 * kernel gives up after about 33 s (HZ=250) rather than 127 s. */
#define TS_SYN_COUNT 12

/* How long an established connection the egress gate held waits for its
 * own authentication (the destination's came first) before ts_revoke
 * treats its absence as a revocation. */
#define TS_HELD_GRACE_NS 2000000000ULL

/* What the egress gate recorded of this connection to a pod, if it
 * admitted it. */
static __always_inline struct ts_conn *gate_admitted(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	struct ts_conn *c;

	if (!sk)
		return 0;
	c = bpf_sk_storage_get(&ts_conns, sk, 0, 0);
	return (c && (c->flags & TS_CONN_OUTBOUND)) ? c : 0;
}

static __always_inline int accepted(struct bpf_sock_ops *ops);

/* ts_established (sockops, on the pods' cgroup): when a local pod accepts a
 * TCP connection, records what it was admitted as (ts_conns) for
 * ts_revoke (the egress gate records outbound ones at connect()); gives
 * connections the gate admitted to pods a SYN retransmission timeout of
 * milliseconds; and starts the grace of a held one that got through. */
SEC("sockops")
int ts_established(struct bpf_sock_ops *ops)
{
	int count = TS_SYN_COUNT;
	struct ts_conn *c;

	switch (ops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		ops->reply = gate_admitted(ops) ? TS_SYN_RTO_JIFFIES : -1;
		return 1;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (gate_admitted(ops))
			bpf_setsockopt(ops, IPPROTO_TCP, TCP_SYNCNT, &count, sizeof(count));
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* A held connection got through: the destination has its
		 * authentication, this node's follows within the grace. */
		c = gate_admitted(ops);
		if (c && (c->flags & TS_CONN_HELD))
			c->epoch = bpf_ktime_get_ns() + TS_HELD_GRACE_NS;
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return accepted(ops);
	default:
		return 1;
	}
}

/* Records what an accepted connection was admitted as. */
static __always_inline int accepted(struct bpf_sock_ops *ops)
{
	struct ts_ip_key local_key, remote_key;
	struct ts_endpoint local, remote;
	__u16 port = (__u16)ops->local_port;
	struct bpf_sock *sk;
	__u64 expires;
	__u32 reason;
	__u8 flags = 0;
	int known;

	if (ops->family == TS_AF_INET) {
		ip4_key(&local_key, ops->local_ip4);
		ip4_key(&remote_key, ops->remote_ip4);
	} else if (ops->family == TS_AF_INET6) {
		__u32 *l = (__u32 *)local_key.addr;
		__u32 *r = (__u32 *)remote_key.addr;

		l[0] = ops->local_ip6[0];
		l[1] = ops->local_ip6[1];
		l[2] = ops->local_ip6[2];
		l[3] = ops->local_ip6[3];
		r[0] = ops->remote_ip6[0];
		r[1] = ops->remote_ip6[1];
		r[2] = ops->remote_ip6[2];
		r[3] = ops->remote_ip6[3];
	} else {
		return 1;
	}
	local = lookup_ip(&local_key, &known);
	if (!known)
		return 1;
	/* On a port with HTTP rules only the agent's waypoint accepts (see
	 * ts_ingress): it checks each connection's peer itself. Left without
	 * a record, so that ts_revoke tells it from a connection the workload
	 * accepted before the port had HTTP rules. */
	if (waypointed(&local_key, port))
		return 1;
	remote = lookup_ip(&remote_key, &known);
	if (!known && terminated(&local_key, port))
		/* ts_steer handed it to the agent's terminator, which
		 * authenticated the peer itself and answers for it. */
		return 1;
	/* The authentication the connection start rested on, if it still
	 * holds; if it no longer does, ts_revoke resets the connection. */
	reason = policy(shapes_of(local.id), local.id, remote.id, port, IPPROTO_TCP, &flags);
	if (!is_deny(reason) && (flags & TS_RULE_AUTH))
		reason = authenticated(&local, &remote, bpf_ktime_get_coarse_ns(), &expires);
	/* Read and checked right where it is used: the verifier tracks the
	 * check on this load only. */
	sk = ops->sk;
	if (sk)
		stamp(sk, &local, &remote, 0, port, 0, reason);
	return 1;
}

/* Kernel types ts_revoke reads: only the fields it uses, relocated against
 * the running kernel's BTF (CO-RE) when the agent loads the object. */
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

#define TS_STR(x) #x
#define TS_XSTR(x) TS_STR(x)

/* bpf_sock_destroy(sk): aborts the socket (ECONNABORTED to its owner, a
 * reset to its peer). A kfunc call (src_reg BPF_PSEUDO_KFUNC_CALL) whose
 * immediate the agent replaces with the kfunc's BTF id at load time. */
static __always_inline void sock_destroy(struct sock_common *sk)
{
	register struct sock_common *r1 asm("r1") = sk;

	asm volatile(".byte 0x85, 0x20, 0x00, 0x00\n\t.long " TS_XSTR(TS_KFUNC_SOCK_DESTROY)
		     : "+r"(r1)
		     :
		     : "r0", "r2", "r3", "r4", "r5", "memory");
}

static __always_inline int same_endpoint(const struct ts_endpoint *a, const struct ts_endpoint *b)
{
	return a->id == b->id && a->node == b->node && a->gen == b->gen;
}

/* The decision for connection `c` (between `local_key` and `remote_key`)
 * made again on the maps as they are now: a TS_REASON_*. The connection
 * stands only while both endpoints are those it began with, the policy
 * still admits it and, where the policy asks for it, the pair is
 * authenticated in the epoch it was admitted in. */
static __always_inline __u32 recheck(struct ts_conn *c, const struct ts_ip_key *local_key,
				     const struct ts_ip_key *remote_key)
{
	struct ts_endpoint local, remote, *ep;
	const struct ts_endpoint *dst, *src;
	__u64 expires, epoch, now;
	__u32 reason;
	__u8 flags;
	int known;

	if (c->cgroup) {
		ep = bpf_map_lookup_elem(&ts_ep_cgroup, &c->cgroup);
		if (!ep)
			return TS_REASON_DENY_ENDPOINT_CHANGED;
		local = *ep;
	} else {
		int unknown_pod = (c->flags & TS_CONN_HELD) && c->local.id == TS_ID_UNKNOWN;

		local = lookup_ip(local_key, &known);
		if (!known)
			/* Made before its pod was known, and still not known by
			 * its address: not the data path's to judge. */
			return unknown_pod ? TS_REASON_PASS_UNMANAGED
					   : TS_REASON_DENY_ENDPOINT_CHANGED;
		/* Its pod is known now: the connection is that pod's. */
		if (unknown_pod)
			c->local = local;
	}
	if (!same_endpoint(&local, &c->local))
		return TS_REASON_DENY_ENDPOINT_CHANGED;
	remote = lookup_ip(remote_key, &known);
	if (c->remote.id == TS_ID_UNKNOWN)
		remote = c->remote;
	else if (!known || !same_endpoint(&remote, &c->remote))
		return TS_REASON_DENY_ENDPOINT_CHANGED;
	dst = (c->flags & TS_CONN_OUTBOUND) ? &remote : &local;
	src = (c->flags & TS_CONN_OUTBOUND) ? &local : &remote;
	reason = policy(shapes_of(dst->id), dst->id, src->id, c->port, IPPROTO_TCP, &flags);
	if (is_deny(reason) || !(flags & TS_RULE_AUTH))
		return reason;
	/* The coarse clock is not for tracing programs; the precise one is
	 * at most a tick ahead of it. */
	now = bpf_ktime_get_ns();
	reason = authenticated(&local, &remote, now, &expires);
	/* A held connection waits no more once the handshake failed. */
	if ((c->flags & TS_CONN_HELD) && auth_pending(reason) &&
	    handshake_failed(&local, &remote, now))
		return TS_REASON_DENY_AUTH_FAILED;
	if (is_deny(reason))
		return reason;
	epoch = current_epoch();
	if ((c->flags & TS_CONN_AUTH) && c->epoch != epoch)
		return TS_REASON_DENY_AUTH_EPOCH;
	/* Admitted without one (or held for it), now resting on this one. */
	c->flags = (c->flags & ~TS_CONN_HELD) | TS_CONN_AUTH;
	c->epoch = epoch;
	return reason;
}

/* ts_revoke (iter/tcp, run by the agent in each local pod's network
 * namespace and its own after the maps change): every TCP socket the data
 * path admitted (it has a ts_conns entry) whose decision no longer allows
 * is reset, and a struct ts_revoked for it goes to the reader. */
SEC("iter/tcp")
int ts_revoke(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct ts_ip_key local_key, remote_key;
	struct ts_revoked rec = {};
	struct ts_conn *c;
	void *tp;
	__u32 reason;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	c = bpf_sk_storage_get(&ts_conns, tp, 0, 0);
	if (!c)
		return 0;
	if (skc->skc_family == TS_AF_INET) {
		ip4_key(&local_key, skc->skc_rcv_saddr);
		ip4_key(&remote_key, skc->skc_daddr);
	} else {
		bpf_probe_read_kernel(local_key.addr, 16, &skc->skc_v6_rcv_saddr);
		bpf_probe_read_kernel(remote_key.addr, 16, &skc->skc_v6_daddr);
	}
	/* A connection the workload accepted (it has a record: the
	 * waypoint's have none) on a port that has HTTP rules now: made
	 * before the port had them, it would go on bypassing the waypoint. */
	if (!(c->flags & TS_CONN_OUTBOUND) && waypointed(&local_key, skc->skc_num))
		reason = TS_REASON_DENY_NO_WAYPOINT;
	else
		reason = recheck(c, &local_key, &remote_key);
	if (!is_deny(reason))
		return 0;
	/* Held for its authentication: still connecting (its connection
	 * starts are checked packet by packet), or within its grace. */
	if ((c->flags & TS_CONN_HELD) && auth_pending(reason) &&
	    (!c->epoch || bpf_ktime_get_ns() < c->epoch))
		return 0;
	__builtin_memcpy(rec.local_addr, local_key.addr, 16);
	__builtin_memcpy(rec.remote_addr, remote_key.addr, 16);
	rec.local_id = c->local.id;
	rec.remote_id = c->remote.id;
	rec.local_port = skc->skc_num;
	rec.remote_port = bpf_ntohs(skc->skc_dport);
	rec.reason = reason;
	sock_destroy(skc);
	count(TS_REASON_REVOKED);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

#define TS_ND_NEIGHBOR_ADVERT 136

/* Whether interface `ifindex` may send from `addr` (a ts_ip_key). */
static __always_inline int owns(__u32 ifindex, const struct ts_ip_key *addr)
{
	struct ts_veth_key key = { .ifindex = ifindex };

	__builtin_memcpy(key.addr, addr->addr, 16);
	return bpf_map_lookup_elem(&ts_veth_ips, &key) != 0;
}

static __always_inline int spoofed(void)
{
	count(TS_REASON_DENY_SPOOFED);
	return TC_ACT_SHOT;
}

/* The egress gate's decision for a TCP connection start from the pod at
 * `src_key` (an address it owns) to `dst_key`:`port`. */
static __always_inline int gate_packet(const struct ts_ip_key *src_key,
				       const struct ts_ip_key *dst_key, __u16 port)
{
	struct ts_endpoint src, dst;
	int src_known, dst_known;
	__u64 expires;
	__u32 reason;

	src = lookup_ip(src_key, &src_known);
	dst = lookup_ip(dst_key, &dst_known);
	if (!src_known || !dst_known)
		return TC_ACT_OK;
	reason = decide(shapes_of(dst.id), &dst, &src, &src, &dst, port, IPPROTO_TCP, &expires);
	if (!is_deny(reason))
		return TC_ACT_OK;
	count(reason);
	return TC_ACT_SHOT;
}

static __always_inline int from_pod_arp(struct __sk_buff *skb, __u32 ifindex)
{
	struct ts_ip_key sender;
	__u8 spa[4];
	__u32 zero = 0;

	/* Ethernet/IPv4 ARP: the sender protocol address at 14 + 14. */
	if (read_packet(skb, ETH_HLEN + 14, spa, sizeof(spa)))
		return spoofed();
	if (!__builtin_memcmp(spa, &zero, 4))
		return TC_ACT_OK; /* a probe claims nothing */
	ip4_key(&sender, *(__u32 *)spa);
	return owns(ifindex, &sender) ? TC_ACT_OK : spoofed();
}

static __always_inline int from_pod_ip4(struct __sk_buff *skb, __u32 ifindex)
{
	struct ts_ip_key src_key, dst_key;
	struct tcphdr tcp;
	struct iphdr ip;

	if (read_packet(skb, ETH_HLEN, &ip, sizeof(ip)))
		return spoofed();
	ip4_key(&src_key, ip.saddr);
	if (!owns(ifindex, &src_key))
		return spoofed();
	if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x1fff)))
		return TC_ACT_OK;
	if (read_packet(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)))
		return TC_ACT_OK;
	if (!tcp.syn || tcp.ack)
		return TC_ACT_OK;
	ip4_key(&dst_key, ip.daddr);
	return gate_packet(&src_key, &dst_key, bpf_ntohs(tcp.dest));
}

static __always_inline int from_pod_ip6(struct __sk_buff *skb, __u32 ifindex)
{
	struct ts_ip_key src_key, dst_key;
	struct ipv6hdr ip6;
	struct tcphdr tcp;
	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 next;
	int walked;

	if (read_packet(skb, ETH_HLEN, &ip6, sizeof(ip6)))
		return spoofed();
	__builtin_memcpy(src_key.addr, &ip6.saddr, 16);
	__builtin_memcpy(dst_key.addr, &ip6.daddr, 16);
	next = ip6.nexthdr;
	if (next == IPPROTO_ICMPV6) {
		struct {
			__u8 type, code;
			__u16 sum;
			__u32 flags;
			__u8 target[16];
		} nd;
		struct ts_ip_key target;

		/* A neighbour advertisement claims its target address. */
		if (!read_packet(skb, off, &nd, sizeof(nd)) &&
		    nd.type == TS_ND_NEIGHBOR_ADVERT) {
			__builtin_memcpy(target.addr, nd.target, 16);
			if (!owns(ifindex, &target))
				return spoofed();
		}
	}
	/* Link-local (fe80::/10) and unspecified sources are for neighbour
	 * discovery on the pod's own link. */
	if (!((src_key.addr[0] == 0xfe && (src_key.addr[1] & 0xc0) == 0x80) ||
	      (((__u64 *)src_key.addr)[0] == 0 && ((__u64 *)src_key.addr)[1] == 0)) &&
	    !owns(ifindex, &src_key))
		return spoofed();
	walked = ip6_transport(skb, &next, &off);
	if (walked || next != IPPROTO_TCP)
		return TC_ACT_OK;
	if (read_packet(skb, off, &tcp, sizeof(tcp)) || !tcp.syn || tcp.ack)
		return TC_ACT_OK;
	return gate_packet(&src_key, &dst_key, bpf_ntohs(tcp.dest));
}

/* ts_from_pod (tc ingress on the host side of a local pod's veth): see the
 * file's header. */
SEC("classifier")
int ts_from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;

	if (!bpf_map_lookup_elem(&ts_veths, &ifindex))
		return TC_ACT_OK;
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return from_pod_arp(skb, ifindex);
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return from_pod_ip4(skb, ifindex);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return from_pod_ip6(skb, ifindex);
	return spoofed();
}
