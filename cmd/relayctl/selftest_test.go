package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestSelftest: on the gateway topology with iptables steering, `relayctl
// selftest --from CLIENT` passes every check for a passthrough and a
// terminate route (also the 2-record post-quantum hello and port 80), and
// fails naming the cause when an upstream is down or the jump is missing.
func TestSelftest(t *testing.T) {
	w := newWatchNet(t, "t", "{bpf: off}")
	w.run(t, "gw", relayctlBin, "rules", "apply", "-c", w.cfg)
	t.Cleanup(func() { w.in("gw", relayctlBin, "rules", "delete", "-c", w.cfg).Run() })
	w.start(t, "gw", asNobody(relayctlBin, "serve", "-c", w.cfg)...)
	waitIn(t, w.gatewayNet, "gw", "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9090/metrics")
	client := w.prefix + "-client"

	selftest := func(args ...string) (string, error) {
		out, err := w.in("gw", append([]string{relayctlBin, "selftest", "--from", client}, args...)...).CombinedOutput()
		return string(out), err
	}
	out, err := selftest("-c", w.cfg)
	if err != nil {
		t.Fatalf("selftest on a working gateway: %v\n%s", err, out)
	}
	for _, want := range []string{
		"selftest from namespace " + client + " to 10.10.1.1:",
		"PASS  alt.test  https (SNI/Host alt.test)",
		"ok   upstream's own certificate: same certificate as 10.10.2.2:8444",
		"PASS  alt.test  https-2-records",
		"sent as 2 records",
		"PASS  alt.test  https-1-byte-segment",
		"PASS  web.test  https",
		"ok   certificate valid for the name",
		"ok   upstream reached: GET / answered 200",
		"PASS  web.test  http",
		"ok   308 to https: 308 Location https://web.test/selftest?x=1",
		"PASS  (no SNI)  https",
		"PASS  (unknown name)  https",
		"selftest: all checks passed",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("selftest output lacks %q:\n%s", want, out)
		}
	}
	js, err := selftest("-c", w.cfg, "--json")
	var rep stReport
	if err != nil || json.Unmarshal([]byte(js), &rep) != nil || !rep.OK || len(rep.Probes) < 8 {
		t.Errorf("--json: %v %+v\n%s", err, rep, js)
	}

	t.Run("upstream down", func(t *testing.T) {
		down := w.writeConfig(t, "down.yaml", strings.Replace(mustRead(t, w.cfg), "routes:\n", "routes:\n  - match: down.test\n    passthrough: 10.10.2.2:8999\n", 1))
		out, err := selftest("-c", down)
		if err == nil || !strings.Contains(out, "FAIL  down.test  https") || !strings.Contains(out, "is the upstream 10.10.2.2:8999 up?") {
			t.Errorf("selftest with a route whose upstream is down: %v\n%s", err, out)
		}
		if !strings.Contains(out, "PASS  alt.test  https") {
			t.Errorf("the other routes should still pass:\n%s", out)
		}
	})

	t.Run("rule missing", func(t *testing.T) {
		w.run(t, "gw", "iptables", "-t", "nat", "-D", "PREROUTING", "-j", "RELAY-PREROUTING")
		out, err := selftest("-c", w.cfg)
		if err == nil || !strings.Contains(out, "FAIL  alt.test  https") || !strings.Contains(out, "check `sudo relayctl rules show`") {
			t.Errorf("selftest without the jump: %v\n%s", err, out)
		}
		w.run(t, "gw", relayctlBin, "rules", "apply", "-c", w.cfg)
	})
}
