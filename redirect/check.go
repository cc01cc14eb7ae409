package redirect

import (
	"fmt"
	"slices"
	"strings"
)

// Drift is one piece of what Apply installs that is no longer there.
type Drift struct {
	Family string // "ipv4" or "ipv6"
	Chain  string // ChainPrerouting or ChainOutput
	// What is "hook" (the built-in chain itself is gone: the table was
	// deleted), "chain" (our chain is gone), "jump" (the jump into it is
	// gone or doubled) or "rules" (its rules differ).
	What string
}

func (d Drift) String() string {
	hook := builtin(d.Chain)
	switch d.What {
	case "hook":
		return fmt.Sprintf("%s nat %s missing (nat table deleted, e.g. nft flush ruleset)", d.Family, hook)
	case "chain":
		return fmt.Sprintf("%s nat chain %s missing (nat table flushed or restored: fw4 reload, iptables-restore by ufw/firewalld/Docker)", d.Family, d.Chain)
	case "jump":
		return fmt.Sprintf("%s nat jump %s -> %s missing or doubled (chain order rewritten: another tool replaced %s, e.g. Docker or firewalld)", d.Family, hook, d.Chain, hook)
	default:
		return fmt.Sprintf("%s nat rules of %s changed (flushed or edited by hand: iptables -t nat -F)", d.Family, d.Chain)
	}
}

// Check compares what is installed with what Apply(o) would install,
// cheaply: `iptables -S` of the built-in chain (is our jump there, once?)
// and, when full, of our chain (are its rules ours?); no iptables-save.
// A chain that is jumped to cannot be deleted, and the tools that rewrite
// tables (iptables-restore, fw4, `iptables -t nat -F`) drop the jump too,
// so the jump alone catches them; full also catches our rules edited in
// place. It returns what drifted, nothing when all is in place.
func Check(fams []*Family, o Options, full bool) ([]Drift, error) {
	var out []Drift
	for _, f := range fams {
		for _, chain := range []string{ChainPrerouting, ChainOutput} {
			rules := o.Rules(chain, f.v6)
			if len(rules) == 0 {
				continue
			}
			d, err := f.check(chain, rules, full)
			if err != nil {
				return out, fmt.Errorf("check %s nat %s: %w", f.Name, chain, err)
			}
			if d != "" {
				out = append(out, Drift{Family: f.Name, Chain: chain, What: d})
			}
		}
	}
	return out, nil
}

func (f *Family) check(chain string, rules [][]string, full bool) (string, error) {
	hook := builtin(chain)
	lines, err := f.ipt.List(table, hook)
	if err != nil {
		if ok, err2 := f.ipt.ChainExists(table, hook); err2 == nil && !ok {
			return "hook", nil
		}
		return "", err
	}
	jumps := 0
	for _, l := range lines {
		if l == "-A "+hook+" -j "+chain {
			jumps++
		}
	}
	if jumps == 1 && !full {
		return "", nil
	}
	have, err := f.ruleBodies(chain)
	if err != nil {
		if ok, err2 := f.ipt.ChainExists(table, chain); err2 == nil && !ok {
			return "chain", nil
		}
		return "", err
	}
	want := make([]string, len(rules))
	for i, r := range rules {
		want[i] = strings.Join(r, " ")
	}
	if !slices.Equal(have, want) {
		return "rules", nil
	}
	if jumps != 1 {
		return "jump", nil
	}
	return "", nil
}
