package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestBenchQuick runs the whole harness with tiny sizes: every path must
// move the right bytes (sha256-checked), or the figures it would print
// are worthless. It measures nothing.
func TestBenchQuick(t *testing.T) {
	dir := t.TempDir()
	relay := filepath.Join(dir, "relayctl")
	self := filepath.Join(dir, "loadgen")
	for bin, pkg := range map[string]string{relay: "../../cmd/relayctl", self: "."} {
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	cmd := exec.Command(self, "bench", "-quick", "-relay", relay, "-json", filepath.Join(dir, "r.json"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bench -quick: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "r.json")); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", out)
}
