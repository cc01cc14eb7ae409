package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBenchQuick runs the harness end to end with tiny sizes on loopback:
// loadgen's endpoints, the direct paths, and the relay (built from
// ../../cmd/relayctl) passing through and terminating. Every path must
// move the right bytes (sha256-checked transfers, echoed round trips,
// checked response bodies), or the figures it would print are worthless.
// It measures nothing and asserts no timing. Peers are left out: they are
// `make bench`'s business (it installs them).
func TestBenchQuick(t *testing.T) {
	dir := t.TempDir()
	relay := filepath.Join(dir, "relayctl")
	self := filepath.Join(dir, "loadgen")
	for bin, pkg := range map[string]string{relay: "../../cmd/relayctl", self: "."} {
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	js := filepath.Join(dir, "r.json")
	md := filepath.Join(dir, "BENCHMARKS.md")
	os.WriteFile(md, []byte("# notes kept\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntail kept\n"), 0o644)
	cmd := exec.Command(self, "bench", "-quick", "-peers", "none", "-relay", relay, "-configs", "../bench", "-json", js, "-out", md)
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("bench -quick: %v", err)
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("parse results: %v", err)
	}
	want := map[string]bool{"direct": false, "relay passthrough (splice)": false, "direct (Go HTTPS server)": false, "relay terminate": false}
	for _, p := range rep.Paths {
		if !p.OK {
			t.Errorf("path %q: %s", p.Name, p.Error)
		}
		want[p.Name] = true
		switch p.Kind {
		case "passthrough":
			if p.UpGbps <= 0 || p.DownGbps <= 0 || p.RTT.N != rep.Settings.RTTs || p.Conns.Count == 0 {
				t.Errorf("path %q: a measurement is missing: %+v", p.Name, p)
			}
		case "terminate":
			if p.H1.Count == 0 || p.H2.Count == 0 {
				t.Errorf("path %q: no GETs completed: %+v", p.Name, p)
			}
		}
		if p.Proxy != "" && (p.IdleRSSKB == 0 || p.LoadedRSSKB == 0) {
			t.Errorf("path %q: proxy memory not sampled", p.Name)
		}
	}
	for name, seen := range want {
		if !seen {
			t.Errorf("path %q not run", name)
		}
	}
	doc, _ := os.ReadFile(md)
	if s := string(doc); !strings.Contains(s, "# notes kept") || !strings.Contains(s, "tail kept") || strings.Contains(s, "\nold\n") || !strings.Contains(s, "relay terminate") {
		t.Errorf("BENCHMARKS.md not updated in place:\n%s", s)
	}
}
