#!/usr/bin/env bash
# dist.sh: the release artefacts in dist/ (make dist). Reproducible: a
# static build with -trimpath and no build id, every file's mtime the last
# commit's time, tarballs sorted with owner 0, gzip without name or time.
#   relayctl-linux-{amd64,arm64,armv7,mips,mipsle}   static binaries
#   relay_VERSION_{amd64,arm64,armhf}.deb            Debian packages (nfpm)
#   relay-openwrt-{mips,mipsle,armv7,arm64}.tar.gz   OpenWrt layout (procd)
#   SHA256SUMS
# DIST (default dist) is the output directory; ARCHS limits the
# architectures (e.g. ARCHS=amd64 for a quick .deb).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
DIST=${DIST:-dist}
ARCHS=${ARCHS:-amd64 arm64 armv7 mips mipsle}
VERSION=${VERSION:-$(git describe --always --dirty 2>/dev/null || echo dev)}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH
# Debian versions start with a digit.
DEB_VERSION=0~$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).${VERSION}

rm -rf "$DIST"
mkdir -p "$DIST"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

goenv() {
	case $1 in
	amd64) echo GOARCH=amd64 ;;
	arm64) echo GOARCH=arm64 ;;
	armv7) echo GOARCH=arm GOARM=7 ;;
	mips) echo GOARCH=mips GOMIPS=softfloat ;;
	mipsle) echo GOARCH=mipsle GOMIPS=softfloat ;;
	esac
}

for a in $ARCHS; do
	# shellcheck disable=SC2046
	env CGO_ENABLED=0 GOOS=linux $(goenv "$a") "$GO" build -trimpath \
		-ldflags "-s -w -buildid= -X main.version=$VERSION" -o "$DIST/relayctl-linux-$a" ./cmd/relayctl
	touch -d "@$SOURCE_DATE_EPOCH" "$DIST/relayctl-linux-$a"
done

# Debian packages: the units call /usr/bin/relayctl.
for a in $ARCHS; do
	case $a in
	amd64 | arm64) deb=$a ;;
	armv7) deb=armhf ;;
	*) continue ;;
	esac
	d=$stage/deb-$a
	mkdir -p "$d"
	cp "$DIST/relayctl-linux-$a" "$d/relayctl"
	for u in relay.service relay.socket relay-rules.service; do
		sed 's#/usr/local/bin/relayctl#/usr/bin/relayctl#g' "scripts/systemd/$u" >"$d/$u"
	done
	sed -e "s#\${DIST_STAGE}#$d#g" -e "s#\${DEB_ARCH}#$deb#g" -e "s#\${DEB_VERSION}#$DEB_VERSION#g" packaging/nfpm.yaml >"$d/nfpm.yaml"
	"$GO" tool nfpm package --config "$d/nfpm.yaml" --packager deb --target "$DIST/"
done

# OpenWrt: one tarball per router CPU.
for a in $ARCHS; do
	[ "$a" = amd64 ] && continue
	r=$stage/openwrt-$a
	install -D -m 0755 "$DIST/relayctl-linux-$a" "$r/usr/bin/relayctl"
	install -D -m 0755 packaging/openwrt/relay.init "$r/etc/init.d/relay"
	install -D -m 0755 packaging/openwrt/relay-rules.init "$r/etc/init.d/relay-rules"
	install -D -m 0644 packaging/openwrt/relay.yaml "$r/etc/relay/relay.yaml"
	install -D -m 0644 packaging/openwrt/README.md "$r/usr/share/doc/relay/README.openwrt.md"
	tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
		-C "$r" -cf - usr etc | gzip -n -9 >"$DIST/relay-openwrt-$a.tar.gz"
done

sums=$(cd "$DIST" && find . -maxdepth 1 -type f -printf "%f\n" | LC_ALL=C sort | xargs sha256sum)
printf "%s\n" "$sums" >"$DIST/SHA256SUMS"
touch -d "@$SOURCE_DATE_EPOCH" "$DIST"/*
cat "$DIST/SHA256SUMS"
