//go:build ignore

// Connection accounting in the kernel: a sock_ops program on the cgroup v2
// root counts, per port, the TCP connections accepted in the relay's
// network namespace on the relay's ports (the steered ports 443/80, where
// sk_lookup hands connections over, and its own listen ports, where
// REDIRECT sends them), and at close the bytes each one carried. The
// kernel sees every close, so the figures stay right for connections the
// relay never saw finish (crash, kill -9) and when no relay runs at all.
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_PORTS 64

struct acct {
	__u64 accepted;
	__u64 closed;
	__u64 bytes_in;  // received from clients (closed connections)
	__u64 bytes_out; // sent to clients and acknowledged
};

struct acct_config {
	__u64 netns_cookie; // only sockets of this network namespace count
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct acct_config);
} acct_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u16); // local port, host byte order
	__type(value, __u32); // index into acct
} acct_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct acct);
} acct SEC(".maps");

static __always_inline struct acct *counters_for(struct bpf_sock_ops *skops)
{
	__u32 zero = 0;
	struct acct_config *cfg = bpf_map_lookup_elem(&acct_config, &zero);
	if (!cfg || bpf_get_netns_cookie(skops) != cfg->netns_cookie)
		return 0;
	__u16 port = skops->local_port;
	__u32 *index = bpf_map_lookup_elem(&acct_ports, &port);
	if (!index)
		return 0;
	return bpf_map_lookup_elem(&acct, index);
}

SEC("sockops")
int account(struct bpf_sock_ops *skops)
{
	struct acct *a;
	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		a = counters_for(skops);
		if (!a)
			break;
		a->accepted++;
		// Ask for the state changes of this socket, to see its close.
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		a = counters_for(skops);
		if (!a)
			break;
		a->closed++;
		// TCP counts each FIN as one byte of sequence space; take them
		// out by the state the socket closes from.
		__u64 in = skops->bytes_received, out = skops->bytes_acked;
		__u32 from = skops->args[0];
		int fin_in = 0, fin_out = 0;
		switch (from) {
		case BPF_TCP_LAST_ACK: // passive close: their FIN, ours acked
		case BPF_TCP_CLOSING:
		case BPF_TCP_FIN_WAIT2: // active close: ours acked, then theirs
		case BPF_TCP_TIME_WAIT:
			fin_in = fin_out = 1;
			break;
		case BPF_TCP_CLOSE_WAIT: // reset after their FIN
			fin_in = 1;
			break;
		}
		if (fin_in && in > 0)
			in--;
		if (fin_out && out > 0)
			out--;
		a->bytes_in += in;
		a->bytes_out += out;
		break;
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
