package redirect

import (
	"testing"
)

func TestCheckNamesDrift(t *testing.T) {
	f := newFake()
	fams := []*Family{{Name: "ipv4", ipt: f}}
	o := Options{HTTPSPort: 8443, HTTPPort: 8080}
	if _, err := Apply(fams, o, false); err != nil {
		t.Fatal(err)
	}
	check := func(want string) {
		t.Helper()
		d, err := Check(fams, o, true)
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if len(d) > 0 {
			got = d[0].What
		}
		if got != want || len(d) > 1 {
			t.Fatalf("drift %v, want %q", d, want)
		}
		if want != "" {
			if _, err := Apply(fams, o, false); err != nil {
				t.Fatal(err)
			}
			if d, _ := Check(fams, o, true); len(d) != 0 {
				t.Fatalf("after re-apply: %v", d)
			}
		}
	}
	check("")
	f.chains["RELAY-PREROUTING"] = nil
	if d, _ := Check(fams, o, false); len(d) != 0 {
		t.Errorf("a quick check lists our chain: %v", d)
	}
	check("rules")
	f.chains["PREROUTING"] = nil
	check("jump")
	f.chains["PREROUTING"] = append(f.chains["PREROUTING"], "-j RELAY-PREROUTING")
	check("jump")
	f.chains["RELAY-PREROUTING"] = f.chains["RELAY-PREROUTING"][1:]
	check("rules")
	f.chains["PREROUTING"] = nil
	delete(f.chains, "RELAY-PREROUTING")
	check("chain")
	ops := f.ops
	check("")
	if f.ops != ops {
		t.Errorf("a clean check changed %d things", f.ops-ops)
	}
}
