#!/usr/bin/env bash
# install.sh: install relay on this machine (root). Idempotent.
#   - bin/relayctl -> /usr/local/bin/relayctl
#   - system user `relay`
#   - /etc/relay/relay.yaml (only if absent: your config is never overwritten)
#   - systemd units relay-rules.service (root, steering), relay.socket (the
#     listening sockets, kept across restarts) and relay.service
# Then: edit /etc/relay/relay.yaml (and relay.socket's ListenStream= if you
# change listen.*), `relayctl check`, and
#   systemctl enable --now relay-rules relay.socket relay
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -x bin/relayctl ] || make build
install -m 0755 bin/relayctl /usr/local/bin/relayctl
if ! id relay >/dev/null 2>&1; then
	useradd --system --no-create-home --home-dir /var/lib/relay --shell /usr/sbin/nologin relay
fi
install -d -m 0755 /etc/relay
install -d -m 0700 -o relay -g relay /var/lib/relay
if [ ! -e /etc/relay/relay.yaml ]; then
	cat >/etc/relay/relay.yaml <<'YAML'
# relay configuration: see README.md. `relayctl check` validates it.
user: relay
state_dir: /var/lib/relay
listen: {http: ":8080", https: ":8443", metrics: "127.0.0.1:9090"}
unknown_sni: original
steer:
  bpf: auto
routes: []
YAML
	echo "wrote /etc/relay/relay.yaml"
fi
/usr/local/bin/relayctl check -c /etc/relay/relay.yaml
if [ -d /run/systemd/system ] || [ -d /etc/systemd/system ]; then
	install -m 0644 scripts/systemd/relay-rules.service scripts/systemd/relay.socket scripts/systemd/relay.service /etc/systemd/system/
	command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
	echo "installed units; start with: systemctl enable --now relay-rules relay.socket relay"
	# relay.service's LimitNOFILE fits the default max_connections; the
	# kernel's ceiling must allow it (systemd clamps it to fs.nr_open).
	nr_open=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 0)
	if [ "$nr_open" -gt 0 ] && [ "$nr_open" -lt 65536 ]; then
		echo "note: fs.nr_open is $nr_open (< LimitNOFILE=65536): the relay gets at most $nr_open open files and fits max_connections to it" >&2
	fi
fi
if [ -d /etc/logrotate.d ]; then
	install -m 0644 scripts/logrotate/relay /etc/logrotate.d/relay # for log.access in /var/log/relay
fi
