//go:build ignore

// sk_lookup steering: TCP connections addressed to this host on a steered
// port (443, 80, ... from the `ports` map, filled by `relayctl rules
// apply`) are given to the relay's listening socket in the `listeners`
// SOCKMAP slot that port names. No socket in the slot, or an assign error:
// SK_PASS without assignment, so the normal lookup runs (fail-open when the
// relay is down).
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define IPPROTO_TCP 6
#define MAX_SLOTS 4
#define MAX_PORTS 64

struct port_target {
	__u32 slot;  // index into listeners
	__u32 index; // index into counters (one per configured port)
};

struct counters {
	__u64 steered;
	__u64 no_socket;
	__u64 assign_error;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u16); // destination port, host byte order
	__type(value, struct port_target);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

SEC("sk_lookup")
int steer(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u16 port = ctx->local_port;
	struct port_target *t = bpf_map_lookup_elem(&ports, &port);
	if (!t)
		return SK_PASS;
	__u32 slot = t->slot, index = t->index;
	struct counters *c = bpf_map_lookup_elem(&counters, &index);
	struct bpf_sock *sk = bpf_map_lookup_elem(&listeners, &slot);
	if (!sk) {
		if (c)
			c->no_socket++;
		return SK_PASS;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (c) {
		if (err)
			c->assign_error++;
		else
			c->steered++;
	}
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
