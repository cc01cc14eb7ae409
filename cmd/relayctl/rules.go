package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/redirect"
)

func init() {
	register("rules", "rules apply|show|delete [-c FILE] [--dry-run] [--json]", cmdRules)
}

// rulesReport is what `rules` prints (and --json emits).
type rulesReport struct {
	Action    string                `json:"action"`
	DryRun    bool                  `json:"dry_run,omitempty"`
	Backend   string                `json:"backend"`
	Changes   []redirect.Change     `json:"changes"`
	Chains    []redirect.ChainState `json:"chains,omitempty"`
	Steered   []string              `json:"interfaces"`
	Listeners map[string]bool       `json:"listeners_up,omitempty"`
	BPF       string                `json:"bpf"`
	Warnings  []string              `json:"warnings,omitempty"`
	Options   *redirect.Options     `json:"options,omitempty"`
}

func cmdRules(e *env, args []string) error {
	fs := newFlagSet(e, "rules")
	cfgPath := fs.String("c", "", "config file (default $RELAY_CONFIG, then "+config.DefaultPath+")")
	dryRun := fs.Bool("dry-run", false, "print what would change and change nothing")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || (pos[0] != "apply" && pos[0] != "show" && pos[0] != "delete") {
		return errUsage
	}
	cfg, err := loadConfig(e, *cfgPath)
	if err != nil {
		return err
	}
	if pos[0] != "show" || !*dryRun {
		if err := redirect.CheckPrivilege(); err != nil {
			return err
		}
	}
	backend, err := redirect.Backend()
	if err != nil {
		return err
	}
	fams, err := redirect.Families(cfg.Steer.IPv6Enabled())
	if err != nil {
		return err
	}
	rep := &rulesReport{Action: pos[0], DryRun: *dryRun, Backend: backend, BPF: "off"}
	switch pos[0] {
	case "apply":
		opts, warnings, err := steerOptions(cfg, backend)
		if err != nil {
			return err
		}
		rep.Warnings = warnings
		rep.Options = opts
		rep.Changes, err = redirect.Apply(fams, *opts, *dryRun)
		if err != nil {
			return err
		}
	case "delete":
		rep.Changes, err = redirect.Delete(fams, *dryRun)
		if err != nil {
			return err
		}
	}
	if rep.Chains, err = redirect.Show(fams); err != nil {
		return err
	}
	rep.Steered = cfg.Steer.Interfaces
	if len(rep.Steered) == 0 {
		up, _ := redirect.UpInterfaces(false)
		rep.Steered = append([]string{"(every interface but lo)"}, up...)
	}
	rep.Listeners = map[string]bool{}
	for _, a := range []string{cfg.Listen.HTTPS, cfg.Listen.HTTP} {
		if a != "off" {
			rep.Listeners[a] = listening(a)
		}
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printRules(e, rep)
	return nil
}

// steerOptions runs the preflight checks and turns the config into
// redirect options.
func steerOptions(cfg *config.Config, backend string) (*redirect.Options, []string, error) {
	var warnings []string
	if err := redirect.CheckBackendMix(backend); err != nil {
		return nil, nil, err
	}
	uid, err := redirect.LookupUID(cfg.User)
	if err != nil {
		return nil, nil, err
	}
	if err := redirect.CheckInterfaces(cfg.Steer.Interfaces); err != nil {
		return nil, nil, err
	}
	httpsPort, err := portOf(cfg.Listen.HTTPS)
	if err != nil {
		return nil, nil, fmt.Errorf("listen.https: %w", err)
	}
	var httpPort uint16
	if cfg.Listen.HTTP != "off" {
		if httpPort, err = portOf(cfg.Listen.HTTP); err != nil {
			return nil, nil, fmt.Errorf("listen.http: %w", err)
		}
	}
	for _, p := range []uint16{httpsPort, httpPort} {
		if p == 80 || p == 443 {
			return nil, nil, fmt.Errorf("listen port %d is itself a steered port: REDIRECT would loop; listen on high ports (e.g. :8443 and :8080)", p)
		}
	}
	o := &redirect.Options{
		HTTPSPort:  httpsPort,
		HTTPPort:   httpPort,
		Interfaces: cfg.Steer.Interfaces,
		Local:      cfg.Steer.Local,
		RelayUID:   uid,
		IPv6:       cfg.Steer.IPv6Enabled(),
	}
	for _, p := range cfg.Steer.HTTPSPorts {
		o.HTTPSPorts = append(o.HTTPSPorts, uint16(p))
	}
	for _, p := range cfg.Steer.HTTPPorts {
		o.HTTPPorts = append(o.HTTPPorts, uint16(p))
	}
	for _, b := range cfg.Steer.Bypass {
		p, err := config.ParsePrefix(b)
		if err != nil {
			return nil, nil, fmt.Errorf("steer.bypass %q: %w", b, err)
		}
		o.Bypass = append(o.Bypass, p)
	}
	if cfg.Steer.BPF == "on" {
		return nil, nil, errors.New("steer.bpf: on: BPF steering is not available in this build; set steer.bpf: auto or off")
	}
	if w := redirect.ForwardingWarning(o.IPv6); w != "" && len(cfg.Steer.Interfaces) > 0 {
		warnings = append(warnings, w)
	}
	return o, warnings, nil
}

func portOf(addr string) (uint16, error) {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(p, 10, 16)
	return uint16(n), err
}

// listening reports whether something accepts on addr (as seen from here).
func listening(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if ip, err := netip.ParseAddr(host); host == "" || (err == nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, port), 300*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func printRules(e *env, rep *rulesReport) {
	w := e.stdout
	for _, wa := range rep.Warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", wa)
	}
	verb := map[string]string{"apply": "applied", "delete": "deleted", "show": ""}[rep.Action]
	if rep.DryRun {
		verb = "dry run: would change"
	}
	if rep.Action != "show" {
		if len(rep.Changes) == 0 {
			fmt.Fprintf(w, "%s: nothing to change\n", rep.Action)
		} else {
			fmt.Fprintf(w, "%s:\n", verb)
			for _, c := range rep.Changes {
				fmt.Fprintf(w, "  %s  %s\n", c.Family, c.Action)
			}
		}
	}
	fmt.Fprintf(w, "backend: iptables (%s)\n", rep.Backend)
	if len(rep.Chains) == 0 {
		fmt.Fprintln(w, "chains: none installed")
	}
	for _, c := range rep.Chains {
		health := ""
		if c.Jumps != 1 {
			health = fmt.Sprintf("  (jumps from %s: %d, want 1: re-run rules apply)", c.Chain[len("RELAY-"):], c.Jumps)
		}
		fmt.Fprintf(w, "%s nat %s:%s\n", c.Family, c.Chain, health)
		for _, r := range c.Rules {
			fmt.Fprintf(w, "  %s\n", r)
		}
	}
	fmt.Fprintf(w, "interfaces: %v\n", rep.Steered)
	for a, up := range rep.Listeners {
		state := "not listening (start `relayctl serve`)"
		if up {
			state = "up"
		}
		fmt.Fprintf(w, "relay listener %s: %s\n", a, state)
	}
	fmt.Fprintf(w, "bpf: %s\n", rep.BPF)
}
