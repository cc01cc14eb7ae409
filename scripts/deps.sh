#!/usr/bin/env bash
# deps.sh: install the Debian packages relay's demo and tests use, if any
# is missing (fresh Debian 12 machine; needs root).
set -euo pipefail
# h2spec (HTTP/2 conformance, TestH2Spec): a go tool at a pinned version,
# from the module proxy; the test looks on PATH and in $(go env GOPATH)/bin.
go=$(command -v go || echo /usr/local/go/bin/go)
if ! command -v h2spec >/dev/null 2>&1 && [ -x "$go" ] && [ ! -x "$("$go" env GOPATH)/bin/h2spec" ]; then
	"$go" install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible
fi
need=()
for p in curl:curl openssl:openssl iptables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux ping:iputils-ping systemd-socket-activate:systemd htpasswd:apache2-utils fail2ban-regex:fail2ban sshd:openssh-server ssh:openssh-client openvpn:openvpn testssl:testssl.sh qemu-mips-static:qemu-user-static chromium:chromium shellcheck:shellcheck; do
	command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
done
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "missing packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The tests run their own sshd, openvpn and fail2ban-regex: never let the
# packages start their daemons (sshd on the host's port 22).
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
