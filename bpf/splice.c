//go:build ignore

// Sockmap splice: bytes arriving on a relayed socket are redirected by
// this stream verdict straight to its peer's transmit path, so they never
// reach the relay process.
//
// Redirected bytes bypass TCP's flow control (the receiver's window stays
// open while the peer's send path queues them), so the verdict bounds
// them: when the bytes in flight to the peer (redirected plus written by
// the relay, minus what the peer has acknowledged) would exceed the
// socket's limit, it passes the skb to the socket's own receive queue
// instead and sets `pressure`. Passed bytes are charged to the receiving
// socket, which closes its TCP window; the relay reads them and writes
// them to the peer itself (a blocking write). Redirecting resumes only once
// the relay has written every passed byte (`consumed == passed`), so bytes
// are never reordered.
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_SOCKS 65536

// Only the field we read; CO-RE relocates it against the kernel's BTF.
struct tcp_sock {
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

// Written by the relay (whole-value updates), only read here.
struct splice_cfg {
	__u64 peer;     // socket cookie of the destination
	__u64 written;  // bytes the relay has written to the peer itself
	__u64 consumed; // passed bytes the relay has read and written on
	__u32 limit;    // max bytes in flight to the peer; 0 = never redirect
	__u32 dir;      // index into spliced_bytes
};

// Written only here (after the relay created it zeroed).
struct splice_stat {
	__u64 redirected; // bytes redirected to the peer
	__u64 passed;     // bytes passed to the relay
	__u32 pressure;   // passing until the relay caught up
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64); // socket cookie
	__type(value, __u64);
} splice_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct splice_cfg);
} splice_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct splice_stat);
} splice_stat SEC(".maps");

// Bytes redirected in the kernel: 0 client → upstream, 1 upstream → client.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} spliced_bytes SEC(".maps");

SEC("sk_skb/stream_verdict")
int splice_verdict(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	// The FIN arrives as an empty skb. Dropped, not passed: the
	// half-close is the socket's own state (tcp_fin set it, the relay
	// sees POLLRDHUP), while a passed empty skb that queues behind passed
	// bytes the psock is still retrying makes its backlog worker take the
	// zero bytes it moved for a hard error: it sets EPIPE on the socket
	// and stops its transmit, dropping whatever is redirected to it.
	if (len == 0)
		return SK_DROP;
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct splice_cfg *cfg = bpf_map_lookup_elem(&splice_cfg, &cookie);
	struct splice_stat *st = bpf_map_lookup_elem(&splice_stat, &cookie);
	if (!cfg || !st)
		return SK_PASS;
	if (st->pressure && st->passed != cfg->consumed)
		goto pass;

	__u64 peer = cfg->peer;
	// A hash map value replaced by the relay's update goes straight back
	// to the map's free list and may already hold another socket's
	// entry: redirect only to a peer whose own entry names this socket
	// back (passing is always safe).
	struct splice_cfg *back = bpf_map_lookup_elem(&splice_cfg, &peer);
	if (!back || back->peer != cookie)
		goto pass;
	struct bpf_sock *sk = bpf_map_lookup_elem(&splice_socks, &peer);
	if (!sk)
		goto pass;
	__u64 acked = 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp)
		acked = tp->bytes_acked;
	bpf_sk_release(sk);

	__u64 limit = cfg->limit;
	if (st->pressure)
		limit /= 2; // resume only well below the limit
	__u64 inflight = st->redirected + cfg->written - acked;
	if (inflight + len > limit)
		goto pass;
	if (bpf_sk_redirect_hash(skb, &splice_socks, &peer, 0) != SK_PASS)
		goto pass;
	st->pressure = 0;
	st->redirected += len;
	__u32 dir = cfg->dir;
	__u64 *n = bpf_map_lookup_elem(&spliced_bytes, &dir);
	if (n)
		*n += len;
	return SK_PASS;

pass:
	// Never SK_DROP: the relay reads what it is passed.
	st->pressure = 1;
	st->passed += len;
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
