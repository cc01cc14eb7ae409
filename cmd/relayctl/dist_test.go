package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDist builds the release artefacts for amd64 and armv7 twice and
// checks them: SHA256SUMS verifies, the second build is byte-identical
// (reproducible), the .deb installs, removes (config kept) and purges
// cleanly in a throwaway overlay of this machine (scripts/test-deb.sh,
// systemd-analyze verify included), the OpenWrt tarball has its layout
// and its init scripts pass sh -n and shellcheck.
func TestDist(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds release artefacts")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the .deb is installed in an overlay mounted in a private namespace")
	}
	for _, tool := range []string{"dpkg", "systemd-analyze", "shellcheck", "unshare"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (scripts/deps.sh installs shellcheck)", tool)
		}
	}
	root, _ := filepath.Abs("../..")
	build := func(dir string) {
		t.Helper()
		cmd := exec.Command(filepath.Join(root, "scripts/dist.sh"))
		cmd.Env = append(os.Environ(), "DIST="+dir, "ARCHS=amd64 armv7", "VERSION=test")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("dist.sh: %v\n%s", err, out)
		}
	}
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	build(a)
	build(b)
	sums := mustRead(t, filepath.Join(a, "SHA256SUMS"))
	for _, f := range []string{"relayctl-linux-amd64", "relayctl-linux-armv7", "relay_0~", "_amd64.deb", "_armhf.deb", "relay-openwrt-armv7.tar.gz"} {
		if !strings.Contains(sums, f) {
			t.Errorf("SHA256SUMS lacks %s:\n%s", f, sums)
		}
	}
	if sb := mustRead(t, filepath.Join(b, "SHA256SUMS")); sb != sums {
		t.Errorf("not reproducible: two builds differ:\n%s\n%s", sums, sb)
	}
	cmd := exec.Command("sha256sum", "-c", "--strict", "SHA256SUMS")
	cmd.Dir = a
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("sha256sum -c: %v\n%s", err, out)
	}

	debs, _ := filepath.Glob(filepath.Join(a, "relay_*_amd64.deb"))
	if len(debs) != 1 {
		t.Fatalf("no amd64 .deb in %s", a)
	}
	if out, err := exec.Command(filepath.Join(root, "scripts/test-deb.sh"), debs[0]).CombinedOutput(); err != nil {
		t.Errorf("test-deb.sh: %v\n%s", err, out)
	}

	out, err := exec.Command("tar", "-tzvf", filepath.Join(a, "relay-openwrt-armv7.tar.gz")).CombinedOutput()
	if err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	for _, f := range []string{"usr/bin/relayctl", "etc/init.d/relay", "etc/init.d/relay-rules", "etc/relay/relay.yaml"} {
		if !strings.Contains(string(out), " "+f+"\n") {
			t.Errorf("OpenWrt tarball lacks %s:\n%s", f, out)
		}
	}
	scripts := []string{"packaging/openwrt/relay.init", "packaging/openwrt/relay-rules.init",
		"packaging/deb/postinst", "packaging/deb/prerm", "packaging/deb/postrm"}
	for _, s := range scripts {
		if out, err := exec.Command("sh", "-n", filepath.Join(root, s)).CombinedOutput(); err != nil {
			t.Errorf("sh -n %s: %v\n%s", s, err, out)
		}
	}
	cmd = exec.Command("shellcheck", append(scripts, "scripts/dist.sh", "scripts/test-deb.sh")...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
}
