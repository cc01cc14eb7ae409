#!/usr/bin/env bash
# bench.sh [--quick]: the relay against direct connections and the peers
# users would pick instead (HAProxy, nginx, sniproxy, Caddy), all in one run
# on loopback, with bounded sizes. Installs missing peers from Debian (as
# root), prints a table, writes bench-results.json and, for a full run,
# updates docs/BENCHMARKS.md. Every process it starts is stopped at the end,
# also on Ctrl-C. The peers' configs are in scripts/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
cmd="make bench"
if [ "${1:-}" = "--quick" ]; then
	quick=(-quick)
	cmd="make bench QUICK=1"
fi

# Peers: Debian package → binary. A peer that cannot be installed is
# skipped (loadgen reports it as not installed).
declare -A bin=([haproxy]=haproxy [nginx]=nginx [libnginx-mod-stream]=/usr/lib/nginx/modules/ngx_stream_module.so [sniproxy]=sniproxy [caddy]=caddy)
missing=()
for pkg in haproxy nginx libnginx-mod-stream sniproxy caddy; do
	b=${bin[$pkg]}
	if [[ $b == /* ]]; then [ -e "$b" ] || missing+=("$pkg"); else command -v "$b" >/dev/null || missing+=("$pkg"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		echo "bench: installing ${missing[*]}" >&2
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq >/dev/null || true
		for pkg in "${missing[@]}"; do
			apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 || echo "bench: cannot install $pkg: skipping it" >&2
		done
		# Debian starts packaged daemons on install where an init system
		# runs; the bench starts its own instances with its own configs.
		if [ -d /run/systemd/system ]; then
			for s in haproxy nginx sniproxy caddy; do systemctl disable --now "$s" >/dev/null 2>&1 || true; done
		fi
	else
		echo "bench: not root (or no apt-get): ${missing[*]} missing, those peers are skipped" >&2
	fi
fi

[ -x bin/relayctl ] || make build
go build -o bin/loadgen ./scripts/loadgen
# 1,000 idle connections through a proxy need ~3,000 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

out=()
[ ${#quick[@]} -eq 0 ] && out=(-out docs/BENCHMARKS.md)
bin/loadgen bench -relay bin/relayctl -configs scripts/bench -json bench-results.json \
	-command "$cmd" "${quick[@]}" "${out[@]}" &
pid=$!
# loadgen stops the proxies it started on SIGTERM/SIGINT; pass them on.
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; exit 130' INT TERM
wait $pid
