#!/usr/bin/env bash
# make demo: relay end to end on loopback, with embedded defaults.
#   - two upstreams (a TLS service and a plain HTTP app) from scripts/demo-upstream
#   - relayctl serve as an unprivileged user (nobody), no capabilities
#   - curl through: SNI passthrough, TLS termination (internal CA),
#     a rejected name, the http -> https redirect; then /metrics and stats
# Everything it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

RELAY=bin/relayctl
[ -x "$RELAY" ] || make build >/dev/null
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (it starts the relay as the unprivileged user 'nobody' to show it needs no privilege)" >&2
	exit 1
fi
./scripts/deps.sh

work=$(mktemp -d /tmp/relay-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

go build -o "$work/demo-upstream" ./scripts/demo-upstream

# Ports chosen away from common services; all on 127.0.0.1.
HTTPS=28443 HTTP=28080 METRICS=29090 UP_TLS=29443 UP_HTTP=29080
"$work/demo-upstream" -tls 127.0.0.1:$UP_TLS -names nas.demo.test -label "NAS (TLS passthrough target)" \
	-ca-out "$work/nas-ca.pem" 2>"$work/upstream-tls.log" &
pids+=($!)
"$work/demo-upstream" -http 127.0.0.1:$UP_HTTP -label "home app (plain HTTP)" 2>"$work/upstream-http.log" &
pids+=($!)

mkdir -p "$work/state"
chown nobody:nogroup "$work/state"
cat >"$work/relay.yaml" <<EOF
user: nobody
state_dir: $work/state
listen: {https: "127.0.0.1:$HTTPS", http: "127.0.0.1:$HTTP", metrics: "127.0.0.1:$METRICS"}
unknown_sni: reject
routes:
  - match: nas.demo.test             # passthrough: TLS goes to the NAS untouched
    passthrough: 127.0.0.1:$UP_TLS
  - match: "*.home.demo.test"        # terminate: relay ends TLS, proxies HTTP
    terminate: {upstream: "http://127.0.0.1:$UP_HTTP", tls: internal}
  - match: old.demo.test
    reject: true
EOF

step "config ($work/relay.yaml)"
cat "$work/relay.yaml"
run "$RELAY" check -c "$work/relay.yaml"

step "relayctl serve, as user nobody (uid 65534), no capabilities"
setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all --no-new-privs \
	"$RELAY" serve -c "$work/relay.yaml" 2>"$work/relay.log" &
pids+=($!)
for _ in $(seq 50); do
	curl -s -o /dev/null "http://127.0.0.1:$METRICS/metrics" && break
	sleep 0.1
done
ps -o user,pid,rss,cmd -p "${pids[-1]}" | sed 's/^/  /'

resolve=(--resolve "nas.demo.test:$HTTPS:127.0.0.1" --resolve "app.home.demo.test:$HTTPS:127.0.0.1"
	--resolve "old.demo.test:$HTTPS:127.0.0.1" --resolve "nas.demo.test:$HTTP:127.0.0.1")

step "1. SNI passthrough: the NAS's own certificate reaches the client (verified with the NAS's CA)"
run curl -sS --cacert "$work/nas-ca.pem" "${resolve[@]}" "https://nas.demo.test:$HTTPS/files"

step "2. TLS termination with the relay's internal CA, proxied to plain HTTP with X-Forwarded-*"
run curl -sS --http2 --cacert "$work/state/ca/root.pem" "${resolve[@]}" -w '  (client spoke HTTP/%{http_version})\n' "https://app.home.demo.test:$HTTPS/dashboard"

step "3. a rejected name gets a TLS alert, not a hang"
run curl -sS --cacert "$work/nas-ca.pem" "${resolve[@]}" "https://old.demo.test:$HTTPS/" || true

step "4. plain HTTP to a routed name: 308 to https"
run curl -sS -o /dev/null -w '  %{http_code} -> %{redirect_url}\n' "${resolve[@]}" "http://nas.demo.test:$HTTP/path?q=1"

step "5. metrics (http://127.0.0.1:$METRICS/metrics, excerpt)"
curl -s "http://127.0.0.1:$METRICS/metrics" | grep -E '^relay_(connections_total|bytes_total|clienthello_errors_total\{reason="(not_tls|malformed)"|bpf_attached)' | sed 's/^/  /'

step "6. relayctl stats"
run "$RELAY" stats -c "$work/relay.yaml"

printf '\ndemo done: everything above ran as user nobody on loopback; cleaning up.\n'
