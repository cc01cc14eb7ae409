#!/usr/bin/env bash
# demo-restart.sh: upgrades and restarts without a failed request, on
# loopback, as any user (no root, no systemd).
#
# A client loop sends HTTPS requests through the relay (SNI passthrough to
# a TLS upstream) without pause, while the relay is
#   1. upgraded three times: each time a new `relayctl serve` with the same
#      config takes the listening sockets over from the running one (the
#      hand-over over state_dir/relay.sock), which drains and exits;
#   2. reloaded 20 times with SIGHUP, alternating two configs.
# At the end it prints how many requests were made and how many failed.
#   RELAY_DEMO_PORT=18443 (https; http and metrics use the next two ports)
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY=$PWD/bin/relayctl
[ -x "$RELAY" ] || make build >/dev/null
command -v curl >/dev/null || { echo "demo-restart: curl missing (scripts/deps.sh installs it)" >&2; exit 1; }
P=${RELAY_DEMO_PORT:-18443}

work=$(mktemp -d /tmp/relay-demo-restart.XXXXXX)
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	kill_relays
	wait 2>/dev/null
	rm -rf "$work"
}
# Only the relays this demo started (by the pid files it wrote).
kill_relays() { for f in "$work"/relay-*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM
bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }

go build -o "$work/demo-upstream" ./scripts/demo-upstream
"$work/demo-upstream" -tls 127.0.0.1:$((P + 10)) -names nas.demo.test -label "the NAS" -ca-out "$work/ca.pem" 2>"$work/upstream.log" &
pids+=($!)
mkdir -m 0700 "$work/state"
conf() { # $1: extra route name
	cat <<EOF
state_dir: $work/state
listen: {https: "127.0.0.1:$P", http: "127.0.0.1:$((P + 1))", metrics: "127.0.0.1:$((P + 2))"}
unknown_sni: reject
limits: {drain_timeout: 20s}
routes:
  - match: nas.demo.test
    passthrough: 127.0.0.1:$((P + 10))
  - match: $1
    passthrough: 127.0.0.1:$((P + 10))
EOF
}
conf x.demo.test >"$work/relay.yaml"

n=0
start_relay() {
	n=$((n + 1))
	"$RELAY" serve -c "$work/relay.yaml" 2>"$work/relay-$n.log" &
	echo $! >"$work/relay-$n.pid"
}
bold "== relay 1 starts"
start_relay
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$((P + 2))/metrics" && break; sleep 0.1; done
for _ in $(seq 100); do [ -s "$work/ca.pem" ] && break; sleep 0.1; done

bold "== a client loop: HTTPS requests through the relay, one after another"
(
	ok=0 failed=0
	trap 'echo "$ok $failed" >"$work/client.result"; exit 0' TERM
	while :; do
		if curl -sS --max-time 10 --cacert "$work/ca.pem" --resolve "nas.demo.test:$P:127.0.0.1" \
			-o /dev/null "https://nas.demo.test:$P/" 2>>"$work/client.err"; then
			ok=$((ok + 1))
		else
			failed=$((failed + 1))
		fi
	done
) &
client=$!
sleep 1

for i in 2 3 4; do
	bold "== upgrade: relay $i starts with the same config and state_dir"
	prev=$(cat "$work/relay-$((i - 1)).pid")
	start_relay
	for _ in $(seq 100); do grep -qs "hand-over done" "$work/relay-$i.log" && break; sleep 0.1; done
	grep -h "hand-over" "$work/relay-$i.log" | sed 's/.*msg=/  new: /'
	for _ in $(seq 300); do kill -0 "$prev" 2>/dev/null || break; sleep 0.1; done
	grep -h "asked for the listeners\|the new relay serves\|msg=draining" "$work/relay-$((i - 1)).log" | sed 's/.*msg=/  old: /'
	kill -0 "$prev" 2>/dev/null && echo "  old relay (pid $prev) still draining" || echo "  old relay (pid $prev) exited"
	sleep 1
done

bold "== 20 reloads (SIGHUP), alternating two configs"
cur=$(cat "$work/relay-$n.pid")
for i in $(seq 20); do
	if [ $((i % 2)) = 1 ]; then conf y.demo.test; else conf x.demo.test; fi >"$work/relay.yaml.new"
	mv "$work/relay.yaml.new" "$work/relay.yaml"
	kill -HUP "$cur"
	sleep 0.2
done
# (each counted twice: the SIGHUP and the file watch)
curl -s "http://127.0.0.1:$((P + 2))/metrics" | grep '^relay_config_reloads_total' | sed 's/^/  /'
sleep 1

kill -TERM "$client"
wait "$client" 2>/dev/null || true
read -r ok failed <"$work/client.result"
bold "== client: $ok requests, $failed failed"
[ -s "$work/client.err" ] && sed 's/^/  /' "$work/client.err" | head -5
[ "$failed" = 0 ]
