package redirect

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// fakeIPT is an in-memory nat table: enough of iptables' behaviour for the
// apply/delete logic (real iptables runs in cmd/relayctl's netns tests).
type fakeIPT struct {
	chains map[string][]string // chain -> rule bodies
	ops    int                 // mutating calls
}

func newFake() *fakeIPT {
	return &fakeIPT{chains: map[string][]string{"PREROUTING": nil, "OUTPUT": nil, "INPUT": nil, "POSTROUTING": nil}}
}

func (f *fakeIPT) List(_, chain string) ([]string, error) {
	rules, ok := f.chains[chain]
	if !ok {
		return nil, fmt.Errorf("no chain %s", chain)
	}
	out := []string{"-N " + chain}
	for _, r := range rules {
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}
func (f *fakeIPT) ListWithCounters(t, chain string) ([]string, error) { return f.List(t, chain) }
func (f *fakeIPT) ChainExists(_, chain string) (bool, error) {
	_, ok := f.chains[chain]
	return ok, nil
}
func (f *fakeIPT) NewChain(_, chain string) error {
	f.ops++
	if _, ok := f.chains[chain]; ok {
		return fmt.Errorf("chain %s exists", chain)
	}
	f.chains[chain] = nil
	return nil
}
func (f *fakeIPT) ClearChain(_, chain string) error { f.ops++; f.chains[chain] = nil; return nil }
func (f *fakeIPT) ClearAndDeleteChain(_, chain string) error {
	f.ops++
	delete(f.chains, chain)
	return nil
}
func (f *fakeIPT) Append(_, chain string, r ...string) error {
	f.ops++
	f.chains[chain] = append(f.chains[chain], strings.Join(r, " "))
	return nil
}
func (f *fakeIPT) Insert(_, chain string, pos int, r ...string) error {
	f.ops++
	f.chains[chain] = slices.Insert(f.chains[chain], pos-1, strings.Join(r, " "))
	return nil
}
func (f *fakeIPT) Replace(_, chain string, pos int, r ...string) error {
	f.ops++
	f.chains[chain][pos-1] = strings.Join(r, " ")
	return nil
}
func (f *fakeIPT) Delete(_, chain string, r ...string) error {
	f.ops++
	i := slices.Index(f.chains[chain], strings.Join(r, " "))
	if i < 0 {
		return fmt.Errorf("no such rule")
	}
	f.chains[chain] = slices.Delete(f.chains[chain], i, i+1)
	return nil
}

func TestRules(t *testing.T) {
	o := Options{HTTPSPort: 8443, HTTPPort: 8080, Interfaces: []string{"br-lan"}, RelayUID: 999, Local: true,
		Bypass: []netip.Prefix{netip.MustParsePrefix("192.168.1.1/32"), netip.MustParsePrefix("fd00::/8")}, ExcludeLocalDst: true}
	join := func(rs [][]string) []string {
		var out []string
		for _, r := range rs {
			out = append(out, strings.Join(r, " "))
		}
		return out
	}
	if got, want := join(o.Rules(ChainPrerouting, false)), []string{
		"-d 192.168.1.1/32 -j RETURN",
		"-m addrtype --dst-type LOCAL -j RETURN",
		"-i br-lan -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8443",
		"-i br-lan -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080",
	}; !slices.Equal(got, want) {
		t.Errorf("v4 PREROUTING:\n%s", strings.Join(got, "\n"))
	}
	if got := join(o.Rules(ChainOutput, true)); got[0] != "-m owner --uid-owner 999 -j RETURN" || got[1] != "-d fd00::/8 -j RETURN" || len(got) != 5 {
		t.Errorf("v6 OUTPUT:\n%s", strings.Join(got, "\n"))
	}
	o.QUIC = true
	if got, want := join(o.Rules(ChainPrerouting, false)), []string{
		"-d 192.168.1.1/32 -j RETURN",
		"-i br-lan -p udp -m udp --dport 443 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 8443",
		"-m addrtype --dst-type LOCAL -j RETURN",
		"-i br-lan -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8443",
		"-i br-lan -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080",
	}; !slices.Equal(got, want) {
		t.Errorf("v4 PREROUTING with QUIC:\n%s", strings.Join(got, "\n"))
	}
	o.QUICTransit = true
	if got := join(o.Rules(ChainOutput, false)); got[2] != "-p udp -m udp --dport 443 -j REDIRECT --to-ports 8443" {
		t.Errorf("v4 OUTPUT with QUIC transit:\n%s", strings.Join(got, "\n"))
	}
	o.QUIC, o.QUICTransit = false, false
	o.Local = false
	if got := o.Rules(ChainOutput, false); got != nil {
		t.Errorf("OUTPUT without local: %v", got)
	}
}

func TestApplyIsAtomicAndIdempotent(t *testing.T) {
	f := newFake()
	fams := []*Family{{Name: "ipv4", ipt: f}}
	o := Options{HTTPSPort: 8443, HTTPPort: 8080}
	if _, err := Apply(fams, o, true); err != nil || f.ops != 0 {
		t.Fatalf("dry run changed %d things (%v)", f.ops, err)
	}
	if _, err := Apply(fams, o, false); err != nil {
		t.Fatal(err)
	}
	if f.chains["PREROUTING"][0] != "-j RELAY-PREROUTING" || len(f.chains["PREROUTING"]) != 1 {
		t.Fatalf("jump: %v", f.chains["PREROUTING"])
	}
	if _, ok := f.chains["RELAY-PREROUTING-NEXT"]; ok {
		t.Fatal("fresh chain left behind")
	}
	ops := f.ops
	ch, err := Apply(fams, o, false)
	if err != nil || len(ch) != 0 || f.ops != ops {
		t.Fatalf("second apply: %d changes, %d ops", len(ch), f.ops-ops)
	}
	// A changed config swaps in place: still exactly one jump.
	o.HTTPSPort = 9443
	if _, err := Apply(fams, o, false); err != nil {
		t.Fatal(err)
	}
	if n := slices.Index(f.chains["PREROUTING"], "-j RELAY-PREROUTING"); n != 0 || len(f.chains["PREROUTING"]) != 1 {
		t.Fatalf("after change: %v", f.chains["PREROUTING"])
	}
	if !strings.Contains(strings.Join(f.chains["RELAY-PREROUTING"], "\n"), "--to-ports 9443") {
		t.Fatalf("rules not updated: %v", f.chains["RELAY-PREROUTING"])
	}
	if _, err := Delete(fams, false); err != nil {
		t.Fatal(err)
	}
	if len(f.chains["PREROUTING"]) != 0 {
		t.Fatalf("jump left: %v", f.chains["PREROUTING"])
	}
	for c := range f.chains {
		if strings.HasPrefix(c, "RELAY") {
			t.Fatalf("chain %s left", c)
		}
	}
	if _, err := Delete(fams, false); err != nil {
		t.Fatalf("second delete: %v", err)
	}
}
