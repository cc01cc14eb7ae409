package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// Chains this package owns, in the nat table of both families. Each is
// reached by one jump from the built-in chain of the same suffix.
const (
	ChainPrerouting = "RELAY-PREROUTING"
	ChainOutput     = "RELAY-OUTPUT"
	nextSuffix      = "-NEXT" // fresh chain built before a swap
	table           = "nat"
)

// Options is what to steer. The zero value of a field is its default
// where one is stated.
type Options struct {
	HTTPSPort uint16 // relay's https listen port (REDIRECT target), e.g. 8443
	HTTPPort  uint16 // relay's http listen port, e.g. 8080; 0 = port 80 is not steered

	HTTPSPorts []uint16 // destination ports steered to HTTPSPort; default 443
	HTTPPorts  []uint16 // destination ports steered to HTTPPort; default 80

	// Interfaces limits PREROUTING interception; empty = every interface
	// but lo (also ones that come up later).
	Interfaces []string
	Bypass     []netip.Prefix // destinations never intercepted
	// Local also steers the gateway's own outbound connections (OUTPUT),
	// except those of RelayUID, so the relay never loops into itself.
	Local    bool
	RelayUID int
	IPv6     bool // also ip6tables
	// ExcludeLocalDst leaves connections addressed to this host alone
	// (BPF sk_lookup steers those, and fails open when the relay is down).
	ExcludeLocalDst bool

	// QUIC also steers UDP to HTTPSPorts (QUIC) to HTTPSPort, for
	// datagrams addressed to this host, whatever ExcludeLocalDst says:
	// sk_lookup cannot steer them, because an answer from the relay's
	// unconnected socket would carry its own port, while REDIRECT's
	// conntrack entry maps it back to 443.
	QUIC bool
	// QUICTransit also steers forwarded UDP (to other hosts). Off when
	// unknown names go to their original destination: the relay cannot
	// learn a UDP flow's original destination, so it would drop them.
	QUICTransit bool
}

// Family is one of iptables (IPv4) and ip6tables (IPv6).
type Family struct {
	Name string // "ipv4" or "ipv6"
	ipt  ipt
	v6   bool
}

// ipt is the part of go-iptables used here, so tests can substitute it.
type ipt interface {
	List(table, chain string) ([]string, error)
	ListWithCounters(table, chain string) ([]string, error)
	ChainExists(table, chain string) (bool, error)
	NewChain(table, chain string) error
	ClearChain(table, chain string) error
	ClearAndDeleteChain(table, chain string) error
	Append(table, chain string, rulespec ...string) error
	Insert(table, chain string, pos int, rulespec ...string) error
	Replace(table, chain string, pos int, rulespec ...string) error
	Delete(table, chain string, rulespec ...string) error
}

// Families returns the iptables handles to manage: IPv4, and IPv6 when v6.
func Families(v6 bool) ([]*Family, error) {
	if _, err := exec.LookPath("iptables"); err != nil {
		return nil, errors.New("iptables not found on PATH: install it (apt-get install iptables)")
	}
	v4, err := iptables.NewWithProtocol(iptables.ProtocolIPv4)
	if err != nil {
		return nil, fmt.Errorf("iptables: %w", err)
	}
	fams := []*Family{{Name: "ipv4", ipt: v4}}
	if v6 {
		if _, err := exec.LookPath("ip6tables"); err != nil {
			return nil, errors.New("ip6tables not found on PATH: install iptables (apt-get install iptables), or set steer.ipv6: false")
		}
		h, err := iptables.NewWithProtocol(iptables.ProtocolIPv6)
		if err != nil {
			return nil, fmt.Errorf("ip6tables: %w", err)
		}
		fams = append(fams, &Family{Name: "ipv6", ipt: h, v6: true})
	}
	return fams, nil
}

func ports(p []uint16, def uint16) []uint16 {
	if len(p) == 0 {
		return []uint16{def}
	}
	return p
}

// Rules returns the rules of chain (ChainPrerouting or ChainOutput) for
// this family, as `iptables -S` would print them, without "-A CHAIN".
func (o Options) Rules(chain string, v6 bool) [][]string {
	var out [][]string
	if chain == ChainOutput {
		if !o.Local {
			return nil
		}
		out = append(out, []string{"-m", "owner", "--uid-owner", strconv.Itoa(o.RelayUID), "-j", "RETURN"})
	}
	for _, p := range o.Bypass {
		if p.Addr().Unmap().Is4() == !v6 {
			out = append(out, []string{"-d", p.String(), "-j", "RETURN"})
		}
	}
	var ifaces [][]string
	switch {
	case chain == ChainOutput:
		ifaces = [][]string{nil}
	case len(o.Interfaces) == 0:
		ifaces = [][]string{{"!", "-i", "lo"}}
	default:
		for _, i := range o.Interfaces {
			ifaces = append(ifaces, []string{"-i", i})
		}
	}
	if o.QUIC {
		for _, in := range ifaces {
			for _, dp := range ports(o.HTTPSPorts, 443) {
				r := slices.Clone(in)
				r = append(r, "-p", "udp", "-m", "udp", "--dport", strconv.Itoa(int(dp)))
				if !o.QUICTransit {
					r = append(r, "-m", "addrtype", "--dst-type", "LOCAL")
				}
				out = append(out, append(r, "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(o.HTTPSPort))))
			}
		}
	}
	if o.ExcludeLocalDst {
		out = append(out, []string{"-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"})
	}
	type target struct {
		dports []uint16
		to     uint16
	}
	targets := []target{{ports(o.HTTPSPorts, 443), o.HTTPSPort}}
	if o.HTTPPort != 0 {
		targets = append(targets, target{ports(o.HTTPPorts, 80), o.HTTPPort})
	}
	for _, in := range ifaces {
		for _, t := range targets {
			for _, dp := range t.dports {
				r := slices.Clone(in)
				r = append(r, "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(dp)), "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(t.to)))
				out = append(out, r)
			}
		}
	}
	return out
}

// builtin returns the built-in chain that jumps to one of ours.
func builtin(chain string) string { return strings.TrimPrefix(chain, "RELAY-") }

// Change is one step of a plan, for --dry-run and logs.
type Change struct {
	Family string `json:"family"`
	Action string `json:"action"`
}

// Apply installs the rules in every family, atomically per chain: the new
// rule set is built in a fresh chain and the jump is swapped to it with
// one rule replacement, so there is never a moment without rules nor two
// jumps. Applying the same options again changes nothing. With dryRun it
// only returns what it would change.
func Apply(fams []*Family, o Options, dryRun bool) ([]Change, error) {
	var changes []Change
	for _, f := range fams {
		for _, chain := range []string{ChainPrerouting, ChainOutput} {
			c, err := f.applyChain(chain, o.Rules(chain, f.v6), dryRun)
			changes = append(changes, c...)
			if err != nil {
				return changes, fmt.Errorf("apply %s nat %s: %w", f.Name, chain, err)
			}
		}
	}
	return changes, nil
}

// ruleBodies lists chain's rules without the "-A CHAIN" prefix.
func (f *Family) ruleBodies(chain string) ([]string, error) {
	lines, err := f.ipt.List(table, chain)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range lines {
		if rest, ok := strings.CutPrefix(l, "-A "+chain+" "); ok {
			out = append(out, rest)
		}
	}
	return out, nil
}

// jumps returns the 1-based positions in the built-in chain of rules
// jumping to target.
func (f *Family) jumps(chain, target string) ([]int, error) {
	lines, err := f.ipt.List(table, chain)
	if err != nil {
		return nil, err
	}
	var pos []int
	n := 0
	for _, l := range lines {
		if !strings.HasPrefix(l, "-A ") {
			continue
		}
		n++
		if strings.HasSuffix(l, " -j "+target) {
			pos = append(pos, n)
		}
	}
	return pos, nil
}

func (f *Family) fill(chain string, rules [][]string) error {
	if ok, err := f.ipt.ChainExists(table, chain); err != nil {
		return err
	} else if ok {
		if err := f.ipt.ClearChain(table, chain); err != nil {
			return err
		}
	} else if err := f.ipt.NewChain(table, chain); err != nil {
		return err
	}
	for _, r := range rules {
		if err := f.ipt.Append(table, chain, r...); err != nil {
			return fmt.Errorf("add rule %q: %w", strings.Join(r, " "), err)
		}
	}
	return nil
}

func (f *Family) applyChain(chain string, rules [][]string, dryRun bool) ([]Change, error) {
	hook := builtin(chain)
	next := chain + nextSuffix
	exists, err := f.ipt.ChainExists(table, chain)
	if err != nil {
		return nil, err
	}
	var jumps []int
	if exists {
		if jumps, err = f.jumps(hook, chain); err != nil {
			return nil, err
		}
	}
	if len(rules) == 0 { // e.g. OUTPUT with local: false
		if !exists {
			return nil, nil
		}
		ch := []Change{{f.Name, "remove " + chain + " (not configured)"}}
		if dryRun {
			return ch, nil
		}
		return ch, f.deleteChain(chain)
	}
	// Rules are generated in the form `iptables -S` prints them, so what
	// is installed compares as text with what is wanted.
	want := make([]string, len(rules))
	for i, r := range rules {
		want[i] = strings.Join(r, " ")
	}
	if exists && len(jumps) == 1 {
		have, err := f.ruleBodies(chain)
		if err != nil {
			return nil, err
		}
		if slices.Equal(have, want) {
			return nil, nil
		}
	}
	var changes []Change
	if !exists {
		changes = append(changes, Change{f.Name, "create chain " + chain + " and jump to it from " + hook})
	} else {
		changes = append(changes, Change{f.Name, "replace the rules of " + chain})
	}
	for _, r := range want {
		changes = append(changes, Change{f.Name, "-A " + chain + " " + r})
	}
	if dryRun {
		return changes, nil
	}
	if err := f.fill(next, rules); err != nil {
		f.ipt.ClearAndDeleteChain(table, next)
		return nil, err
	}
	// Point the hook at the fresh chain (one replacement: no gap, no
	// second jump), rebuild our chain, point the hook back, drop the fresh one.
	switch {
	case len(jumps) == 0:
		if err := f.ipt.Insert(table, hook, 1, "-j", next); err != nil {
			return nil, err
		}
	default:
		if err := f.ipt.Replace(table, hook, jumps[0], "-j", next); err != nil {
			return nil, err
		}
		for i := len(jumps) - 1; i >= 1; i-- { // duplicates from a foreign tool or an old bug
			f.ipt.Delete(table, hook, "-j", chain)
		}
	}
	if err := f.fill(chain, rules); err != nil {
		return nil, err
	}
	pos, err := f.jumps(hook, next)
	if err != nil || len(pos) == 0 {
		return nil, fmt.Errorf("find jump to %s in %s: %v", next, hook, err)
	}
	if err := f.ipt.Replace(table, hook, pos[0], "-j", chain); err != nil {
		return nil, err
	}
	return changes, f.ipt.ClearAndDeleteChain(table, next)
}

// deleteChain removes every jump to chain (and its fresh twin) and the chains.
func (f *Family) deleteChain(chain string) error {
	var errs []error
	for _, c := range []string{chain, chain + nextSuffix} {
		ok, err := f.ipt.ChainExists(table, c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !ok {
			continue
		}
		pos, err := f.jumps(builtin(chain), c)
		if err != nil {
			errs = append(errs, err)
		}
		for range pos {
			if err := f.ipt.Delete(table, builtin(chain), "-j", c); err != nil {
				errs = append(errs, err)
			}
		}
		if err := f.ipt.ClearAndDeleteChain(table, c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Delete removes every chain and jump Apply made, in every family. Missing
// pieces count as deleted.
func Delete(fams []*Family, dryRun bool) ([]Change, error) {
	var changes []Change
	var errs []error
	for _, f := range fams {
		for _, chain := range []string{ChainPrerouting, ChainOutput} {
			ok, err := f.ipt.ChainExists(table, chain)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f.Name, err))
				continue
			}
			if !ok {
				continue
			}
			changes = append(changes, Change{f.Name, "delete chain " + chain + " and its jump from " + builtin(chain)})
			if !dryRun {
				if err := f.deleteChain(chain); err != nil {
					errs = append(errs, fmt.Errorf("delete %s nat %s: %w", f.Name, chain, err))
				}
			}
		}
	}
	return changes, errors.Join(errs...)
}

// ChainState is one of our chains as installed.
type ChainState struct {
	Family string   `json:"family"`
	Chain  string   `json:"chain"`
	Jumps  int      `json:"jumps"` // jumps from the built-in chain (1 when healthy)
	Rules  []string `json:"rules"` // with packet and byte counters
}

// Show lists our chains with counters.
func Show(fams []*Family) ([]ChainState, error) {
	var out []ChainState
	for _, f := range fams {
		for _, chain := range []string{ChainPrerouting, ChainOutput} {
			ok, err := f.ipt.ChainExists(table, chain)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f.Name, err)
			}
			if !ok {
				continue
			}
			cs := ChainState{Family: f.Name, Chain: chain}
			pos, _ := f.jumps(builtin(chain), chain)
			cs.Jumps = len(pos)
			lines, err := f.ipt.ListWithCounters(table, chain)
			if err != nil {
				return nil, err
			}
			for _, l := range lines {
				if rest, ok := strings.CutPrefix(l, "-A "+chain+" "); ok {
					cs.Rules = append(cs.Rules, rest)
				}
			}
			out = append(out, cs)
		}
	}
	return out, nil
}
