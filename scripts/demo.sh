#!/usr/bin/env bash
# make demo: relay end to end on a gateway, with embedded defaults, in three
# network namespaces made for the demo (nothing touches this machine's own
# network):
#
#   client 10.10.1.2 ── gateway 10.10.1.1 | 10.10.2.1 ── upstream 10.10.2.2 (fd10:.. for IPv6)
#
# On the gateway: `relayctl rules apply` (root) steers TCP 443/80 into the
# relay, and `relayctl serve` runs as the unprivileged user nobody. The
# client then uses curl: SNI passthrough, TLS termination with the internal
# CA, a transparent connection to a host with no route, the http -> https
# redirect. Everything is removed on exit, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (sudo make demo): it creates network namespaces and iptables rules in them" >&2
	exit 1
fi
./scripts/deps.sh
RELAY=$PWD/bin/relayctl
[ -x "$RELAY" ] || make build >/dev/null

export RELAY_NS_PREFIX=relaydemo
C=/run/netns/$RELAY_NS_PREFIX-client G=/run/netns/$RELAY_NS_PREFIX-gw U=/run/netns/$RELAY_NS_PREFIX-up
work=$(mktemp -d /tmp/relay-demo.XXXXXX)
chmod 755 "$work"
export RELAY_STEERING_STATE=$work/run/steering.json # the watcher's health file (default /run/relay/)
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	[ -e "$G" ] && nsenter --net="$G" "$RELAY" rules delete -c "$work/relay.yaml" >/dev/null 2>&1
	./scripts/netns-gateway.sh down
	umount "$work/bpffs" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; }
client() { show "curl ${*}"; nsenter --net="$C" curl -sS --max-time 10 "$@" 2>&1 | sed 's/^/  /'; }

bold "== network: client -- gateway -- upstream (namespaces $RELAY_NS_PREFIX-*)"
./scripts/netns-gateway.sh up
go build -o "$work/demo-upstream" ./scripts/demo-upstream
up() { nsenter --net="$U" "$work/demo-upstream" "$@" 2>>"$work/upstreams.log" & pids+=($!); }
up -tls :8444 -names nas.demo.test -label "the NAS (TLS end to end)" -ca-out "$work/nas-ca.pem"
up -http :8123 -label "the home app"
up -tls :443 -http :80 -names www.example.net -label "www.example.net at 10.10.2.2, which has no route" -ca-out "$work/web-ca.pem"

mkdir -p "$work/state" "$work/bpffs" && chown nobody:nogroup "$work/state"
# A bpffs of the demo's own, so its pins never meet this machine's.
mount -t bpf bpf "$work/bpffs"
cat >"$work/relay.yaml" <<EOF
user: nobody
state_dir: $work/state
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: original             # names without a route go where the client was going
steer: {bpf: auto, pin_dir: $work/bpffs/relay}   # sk_lookup for the gateway's own addresses, REDIRECT for transit
routes:
  - match: nas.demo.test          # passthrough: TLS untouched to the NAS
    passthrough: 10.10.2.2:8444
  - match: "*.home.demo.test"     # terminate with the internal CA, proxy plain HTTP
    terminate: {upstream: "http://10.10.2.2:8123", tls: internal}
EOF
bold "== config ($work/relay.yaml)"
sed 's/^/  /' "$work/relay.yaml"

bold "== on the gateway, as root: relayctl rules apply"
nsenter --net="$G" "$RELAY" rules apply -c "$work/relay.yaml" | sed -n '/^applied/,/^backend/p' | sed '$d;s/^/  /'

bold "== on the gateway, as user nobody (no capabilities): relayctl serve"
nsenter --net="$G" setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all --no-new-privs \
	"$RELAY" serve -c "$work/relay.yaml" 2>"$work/relay.log" &
pids+=($!)
for _ in $(seq 100); do nsenter --net="$G" curl -sf -o /dev/null http://127.0.0.1:9090/metrics && break; sleep 0.1; done
ps -o user=,pid=,rss=,args= -C relayctl | sed 's/^/  /;s/$/  (RSS in KB)/'

bold "1. SNI passthrough: the client talks TLS to the NAS itself (its certificate, its CA), IPv4 and IPv6"
client --cacert "$work/nas-ca.pem" --resolve nas.demo.test:443:10.10.2.2 https://nas.demo.test/files
client --cacert "$work/nas-ca.pem" --resolve "nas.demo.test:443:[fd10:2::2]" https://nas.demo.test/files

bold "2. TLS termination at the gateway's own address (sk_lookup hands it to the relay), internal CA, X-Forwarded-*"
cp "$work/state/ca/root.pem" "$work/relay-ca.pem"
client --cacert "$work/relay-ca.pem" --resolve app.home.demo.test:443:10.10.1.1 https://app.home.demo.test/dashboard

bold "3. transparent: a name with no route goes to the address the client dialled"
client --cacert "$work/web-ca.pem" --resolve www.example.net:443:10.10.2.2 https://www.example.net/

bold "4. plain HTTP to a routed name: 308 to https"
client -o /dev/null -w '%{http_code} -> %{redirect_url}\n' --resolve nas.demo.test:80:10.10.1.1 http://nas.demo.test/photos?album=1

bold "5. drift: a firewall reload flushes the nat table; \`rules apply --watch\` (relay-rules.service) puts it back"
nsenter --net="$G" "$RELAY" rules apply --watch -c "$work/relay.yaml" >/dev/null 2>"$work/watch.log" &
pids+=($!)
for _ in $(seq 100); do [ -e "$RELAY_STEERING_STATE" ] && break; sleep 0.1; done
show "iptables -t nat -F; iptables -t nat -X"
nsenter --net="$G" sh -c 'iptables -t nat -F; iptables -t nat -X'
for _ in $(seq 100); do grep -q 'steering repaired' "$work/watch.log" && break; sleep 0.1; done
grep 'steering repaired' "$work/watch.log" | sed 's/^/  /'
client --cacert "$work/nas-ca.pem" --resolve nas.demo.test:443:10.10.2.2 https://nas.demo.test/files

bold "== relayctl rules show (on the gateway)"
nsenter --net="$G" "$RELAY" rules show -c "$work/relay.yaml" | sed 's/^/  /'

bold "== /metrics excerpt (127.0.0.1:9090 on the gateway)"
nsenter --net="$G" curl -s http://127.0.0.1:9090/metrics | grep -E '^relay_(connections_total|bytes_total|bpf_attached|bpf_steered)' | sed 's/^/  /'

bold "== relayctl stats"
nsenter --net="$G" "$RELAY" stats -c "$work/relay.yaml" | sed 's/^/  /'

bold "demo done: cleaning up (relayctl rules delete, namespaces removed)"
