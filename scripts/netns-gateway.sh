#!/usr/bin/env bash
# netns-gateway.sh up|down — a three-host test network on one machine:
#
#   client (10.10.1.2, fd10:1::2) ── gateway (10.10.1.1 | 10.10.2.1) ── upstream (10.10.2.2, fd10:2::2)
#
# The gateway forwards between the two links, so the client reaches the
# upstream *through* it (transit traffic, what iptables REDIRECT steers).
# Names and prefixes are overridable: RELAY_NS_PREFIX (default "relay"),
# RELAY_NS_NET4 (default 10.10), RELAY_NS_NET6 (default fd10).
# Idempotent; `down` removes everything `up` made.
set -euo pipefail

P=${RELAY_NS_PREFIX:-relay}
N4=${RELAY_NS_NET4:-10.10}
N6=${RELAY_NS_NET6:-fd10}
C=$P-client G=$P-gw U=$P-up

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

down() {
	for ns in $C $G $U; do
		ip netns del "$ns" 2>/dev/null || true
	done
}

up() {
	down
	for ns in $C $G $U; do
		ip netns add "$ns"
		nsx "$ns" ip link set lo up
		# No DAD: link-local addresses are usable at once (else the first
		# IPv6 packets wait ~1-2 s for neighbour discovery).
		nsx "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
	done
	# veth pairs: client <-> gateway, gateway <-> upstream. Peer names are
	# short (15 chars max) and unique per prefix.
	ip link add "${P:0:8}-c0" netns $C type veth peer name "${P:0:8}-g0" netns $G
	ip link add "${P:0:8}-g1" netns $G type veth peer name "${P:0:8}-u0" netns $U

	nsx $C ip addr add $N4.1.2/24 dev "${P:0:8}-c0"
	nsx $C ip -6 addr add $N6:1::2/64 dev "${P:0:8}-c0" nodad
	nsx $G ip addr add $N4.1.1/24 dev "${P:0:8}-g0"
	nsx $G ip -6 addr add $N6:1::1/64 dev "${P:0:8}-g0" nodad
	nsx $G ip addr add $N4.2.1/24 dev "${P:0:8}-g1"
	nsx $G ip -6 addr add $N6:2::1/64 dev "${P:0:8}-g1" nodad
	nsx $U ip addr add $N4.2.2/24 dev "${P:0:8}-u0"
	nsx $U ip -6 addr add $N6:2::2/64 dev "${P:0:8}-u0" nodad
	for pair in "$C ${P:0:8}-c0" "$G ${P:0:8}-g0" "$G ${P:0:8}-g1" "$U ${P:0:8}-u0"; do
		set -- $pair
		nsx "$1" ip link set "$2" up
	done
	nsx $C ip route add default via $N4.1.1
	nsx $C ip -6 route add default via $N6:1::1
	nsx $U ip route add default via $N4.2.1
	nsx $U ip -6 route add default via $N6:2::1
	nsx $G sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

	# Warm the neighbour caches so the first SYN does not wait on ND/ARP.
	warm() { for _ in 1 2 3 4 5; do nsx "$@" >/dev/null 2>&1 && return; sleep 0.2; done; echo "netns-gateway: no route: $*" >&2; return 1; }
	warm $C ping -c1 -W1 $N4.2.2
	warm $C ping -6 -c1 -W1 $N6:2::2
	warm $U ping -c1 -W1 $N4.1.2
	warm $U ping -6 -c1 -W1 $N6:1::2
}

case "${1:-}" in
up) up ;;
down) down ;;
*)
	echo "usage: $0 up|down" >&2
	exit 2
	;;
esac
