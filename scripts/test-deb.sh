#!/usr/bin/env bash
# test-deb.sh DEB: install the relay .deb in a throwaway copy of this
# machine (a private mount namespace whose / is an overlay: every change
# goes to a tmpfs and vanishes), then check the install, `dpkg -r` (binary
# gone, edited config kept) and `dpkg --purge` (config and state gone).
# The host is not changed. Root.
set -euo pipefail
deb=$(realpath "$1")
[ "$(id -u)" -eq 0 ] || { echo "test-deb.sh: run as root (it mounts an overlay in a private namespace)" >&2; exit 1; }
exec unshare --mount --propagation private bash -euo pipefail -s "$deb" <<'OUTER'
deb=$1
w=$(mktemp -d)
mount -t tmpfs tmpfs "$w"
mkdir "$w/upper" "$w/work" "$w/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$w/upper,workdir=$w/work" "$w/root"
mount -t proc proc "$w/root/proc"
mount --rbind /dev "$w/root/dev"
mount -t tmpfs tmpfs "$w/root/run"  # no /run/systemd/system: the scripts skip systemctl, as in a container
mount -t tmpfs tmpfs "$w/root/tmp"
cp "$deb" "$w/root/tmp/relay.deb"
chroot "$w/root" /bin/bash -euo pipefail <<'INNER'
fail() { echo "FAIL: $*" >&2; exit 1; }
# A clean slate in the copy: no earlier relay package, user or config.
dpkg --purge relay >/dev/null 2>&1 || true
userdel relay 2>/dev/null || true
groupdel relay 2>/dev/null || true
rm -rf /etc/relay /var/lib/relay

dpkg -i /tmp/relay.deb
[ -x /usr/bin/relayctl ] || fail "no /usr/bin/relayctl"
/usr/bin/relayctl version
/usr/bin/relayctl check -c /etc/relay/relay.yaml
getent passwd relay >/dev/null || fail "postinst made no relay user"
[ "$(stat -c %U:%a /var/lib/relay)" = relay:700 ] || fail "/var/lib/relay: $(stat -c %U:%a /var/lib/relay), want relay:700"
dpkg-query -W -f='${Conffiles}\n' relay | grep -q '/etc/relay/relay.yaml' || fail "/etc/relay/relay.yaml is not a conffile"
u=/lib/systemd/system
for l in NoNewPrivileges=yes ProtectSystem=strict ReadWritePaths=/var/lib/relay CapabilityBoundingSet= LimitNOFILE=; do
	grep -q "^$l" $u/relay.service || fail "relay.service lacks $l"
done
grep -q '^ExecStart=/usr/bin/relayctl serve' $u/relay.service || fail "relay.service does not run /usr/bin/relayctl"
# Any warning (an unknown key, a missing binary) fails.
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify $u/relay.service $u/relay.socket $u/relay-rules.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
echo "systemd-analyze verify: ok"

echo "# edited by test-deb.sh" >>/etc/relay/relay.yaml
dpkg -r relay
[ ! -e /usr/bin/relayctl ] || fail "dpkg -r left /usr/bin/relayctl"
[ ! -e $u/relay.service ] || fail "dpkg -r left relay.service"
grep -q 'edited by test-deb.sh' /etc/relay/relay.yaml || fail "dpkg -r did not keep the edited config"
dpkg-query -W -f='${Status}\n' relay | grep -q 'config-files' || fail "after dpkg -r: $(dpkg-query -W -f='${Status}' relay)"
[ -d /var/lib/relay ] || fail "dpkg -r removed the state directory"

dpkg --purge relay
[ ! -e /etc/relay/relay.yaml ] || fail "dpkg --purge left /etc/relay/relay.yaml"
[ ! -e /var/lib/relay ] || fail "dpkg --purge left /var/lib/relay"
if dpkg-query -W relay >/dev/null 2>&1 && dpkg-query -W -f='${Status}' relay | grep -qv 'not-installed'; then
	fail "dpkg --purge: still $(dpkg-query -W -f='${Status}' relay)"
fi
echo "test-deb.sh: install, remove (config kept), purge: ok"
INNER
OUTER
