#!/usr/bin/env bash
# deps.sh: install the Debian packages relay's demo and tests use, if any
# is missing (fresh Debian 12 machine; needs root).
set -euo pipefail
need=()
for p in curl:curl openssl:openssl iptables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux ping:iputils-ping systemd-socket-activate:systemd htpasswd:apache2-utils qemu-mips-static:qemu-user-static chromium:chromium shellcheck:shellcheck; do
	command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
done
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "missing packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
