package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestSoakQuick is `make soak` scaled to a few seconds, relay only: every
// held connection opens, the transfer arrives intact, the normal client's
// requests work, and the relay's open files go back near its baseline.
// No timing is asserted.
func TestSoakQuick(t *testing.T) {
	dir := t.TempDir()
	relay := filepath.Join(dir, "relayctl")
	self := filepath.Join(dir, "loadgen")
	for bin, pkg := range map[string]string{relay: "../../cmd/relayctl", self: "."} {
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	js := filepath.Join(dir, "soak.json")
	out, err := exec.Command(self, "soak", "-peers", "none", "-relay", relay, "-configs", "../bench", "-json", js,
		"-n", "200", "-m", "40", "-slowloris", "100", "-transfer", "16777216", "-rate", "33554432",
		"-settle", "500ms", "-after-close", "3s").CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("soak: %v", err)
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var rs []SoakResult
	if err := json.Unmarshal(b, &rs); err != nil || len(rs) != 1 {
		t.Fatalf("results: %v (%d)", err, len(rs))
	}
	r := rs[0]
	if r.Held != 200 || r.Term != 40 || !r.TransferOK || r.Requests == 0 {
		t.Errorf("soak: %+v", r)
	}
	// Pooled upstream connections of the terminate route may stay
	// (bounded): at most one per terminate connection here.
	if r.ClosedFDs > r.IdleFDs+2*40 {
		t.Errorf("open files after close %d, idle %d", r.ClosedFDs, r.IdleFDs)
	}
}
