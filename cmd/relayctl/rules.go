package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/relay-gw/relay/bpf"
	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/redirect"
)

func init() {
	register("rules", "rules apply|show|delete [-c FILE] [--dry-run] [--json] [--watch]", cmdRules)
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
	BPFState  *bpf.Status           `json:"bpf_state,omitempty"`
	Warnings  []string              `json:"warnings,omitempty"`
	Options   *redirect.Options     `json:"options,omitempty"`
	// Health is the state `rules apply --watch` keeps (show only).
	Health     *steerState `json:"steering_health,omitempty"`
	healthPath string
}

// applySteering is one `rules apply`: BPF first, then iptables. It
// returns the options applied and whether BPF steering is on. lenient
// (watch mode) lets steer.interfaces name interfaces that do not exist
// yet: the rules match them by name once they appear.
func applySteering(cfg *config.Config, backend string, fams []*redirect.Family, dryRun, lenient bool, rep *rulesReport) (*redirect.Options, bool, error) {
	opts, warnings, err := steerOptions(cfg, backend, lenient)
	if err != nil {
		return nil, false, err
	}
	rep.Warnings = warnings
	rep.Options = opts
	// BPF first: REDIRECT may exclude local destinations only once
	// sk_lookup covers them, so there is no moment without steering.
	bpfOn, err := applyBPF(cfg, opts.RelayUID, dryRun, rep)
	if err != nil {
		return nil, false, err
	}
	opts.ExcludeLocalDst = bpfOn
	rep.Changes, err = redirect.Apply(fams, *opts, dryRun)
	if err != nil {
		return nil, false, err
	}
	if !bpfOn && !dryRun {
		if err := bpf.Delete(cfg.Steer.PinDir); err != nil {
			return nil, false, fmt.Errorf("remove BPF steering: %w", err)
		}
	}
	return opts, bpfOn, nil
}

func cmdRules(e *env, args []string) error {
	fs, cfgPath := newConfigFlagSet(e, "rules")
	dryRun := fs.Bool("dry-run", false, "print what would change and change nothing")
	asJSON := fs.Bool("json", false, "print JSON")
	watch := fs.Bool("watch", false, "apply, then keep the steering in place (repairing drift) until SIGTERM, which deletes it")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || (pos[0] != "apply" && pos[0] != "show" && pos[0] != "delete") {
		return errUsage
	}
	if *watch && (pos[0] != "apply" || *dryRun) {
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
		if *watch {
			return watchRules(e, cfg, backend, fams, *asJSON)
		}
		// A running watcher would put back its own config's steering:
		// it applies this one instead, so the two never fight.
		if pid := watcherPID(steeringStatePath(e.getenv)); pid > 0 && !*dryRun {
			if err := reloadWatcher(steeringStatePath(e.getenv), pid, cfg.Path); err != nil {
				return err
			}
			rep.Warnings = append(rep.Warnings, fmt.Sprintf("applied by `rules apply --watch` (pid %d, sent SIGHUP), which keeps it in place", pid))
		} else if _, _, err := applySteering(cfg, backend, fams, *dryRun, false, rep); err != nil {
			return err
		}
	case "delete":
		if !*dryRun {
			if pid, err := stopWatcher(steeringStatePath(e.getenv)); err != nil {
				return err
			} else if pid != 0 {
				fmt.Fprintf(e.stdout, "stopped `rules apply --watch` (pid %d), which removed its steering\n", pid)
			}
		}
		rep.Changes, err = redirect.Delete(fams, *dryRun)
		if err != nil {
			return err
		}
		if _, err := bpf.Show(cfg.Steer.PinDir); err == nil {
			rep.Changes = append(rep.Changes, redirect.Change{Family: "bpf", Action: "detach sk_lookup and remove pins in " + cfg.Steer.PinDir})
			if !*dryRun {
				if err := bpf.Delete(cfg.Steer.PinDir); err != nil {
					return fmt.Errorf("remove BPF steering: %w", err)
				}
			}
		}
	}
	if rep.BPFState == nil {
		if st, err := bpf.Show(cfg.Steer.PinDir); err == nil {
			rep.BPFState = st
			rep.BPF = "on"
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
	if pos[0] == "show" {
		path := steeringStatePath(e.getenv)
		rep.Health, _ = loadSteerHealth(path, time.Now())
		rep.healthPath = path
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
func steerOptions(cfg *config.Config, backend string, lenient bool) (*redirect.Options, []string, error) {
	var warnings []string
	if err := redirect.CheckBackendMix(backend); err != nil {
		return nil, nil, err
	}
	uid, err := redirect.LookupUID(cfg.User)
	if err != nil {
		return nil, nil, err
	}
	if err := redirect.CheckInterfaces(cfg.Steer.Interfaces); err != nil {
		if !lenient {
			return nil, nil, err
		}
		warnings = append(warnings, err.Error()+"; watching: its traffic is steered as soon as it appears")
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
	// UDP 443 (QUIC) when a route serves it; transit only when unknown
	// names are not meant for their original destination, which the
	// relay cannot learn for UDP.
	for i := range cfg.Routes {
		if r := &cfg.Routes[i]; r.QUICEnabled() || r.H3Enabled() {
			o.QUIC = true
		}
	}
	o.QUICTransit = o.QUIC && cfg.UnknownSNI != "" && cfg.UnknownSNI != "original"
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

// listening reports whether a socket in this network namespace listens on
// addr's port, from /proc/net/tcp{,6}: no probe connection, so the relay
// counts no aborted ClientHello.
func listening(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return false
	}
	want := fmt.Sprintf(":%04X", n)
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) > 3 && fields[3] == "0A" && strings.HasSuffix(fields[1], want) { // 0A = LISTEN
				return true
			}
		}
	}
	return false
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
	if st := rep.BPFState; st != nil {
		fmt.Fprintf(w, "bpf: sk_lookup steering on (link %d, program %d, pins %s)\n", st.LinkID, st.ProgID, st.PinDir)
		for _, p := range st.Ports {
			fmt.Fprintf(w, "  port %d -> listener slot %d: steered %d, no socket %d, assign errors %d\n", p.Port, p.Slot, p.Steered, p.NoSocket, p.AssignError)
		}
		if len(st.Accounting) > 0 {
			fmt.Fprintln(w, "bpf: kernel connection accounting (sock_ops):")
			for _, a := range st.Accounting {
				fmt.Fprintf(w, "  port %d: accepted %d, closed %d, bytes from clients %d, to clients %d\n", a.Port, a.Accepted, a.Closed, a.BytesIn, a.BytesOut)
			}
		}
		if sp := st.Splice; sp != nil {
			fmt.Fprintf(w, "bpf: sockmap splice loaded: %d bytes client->upstream, %d upstream->client moved in the kernel\n", sp.UpstreamBytes, sp.DownstreamBytes)
		} else {
			fmt.Fprintln(w, "bpf: sockmap splice not loaded (splice: sockmap loads it)")
		}
	} else {
		fmt.Fprintf(w, "bpf: %s\n", rep.BPF)
	}
	if rep.Action == "show" {
		printSteerHealth(w, rep.healthPath)
	}
}

// applyBPF loads or updates sk_lookup steering per steer.bpf. It reports
// whether BPF steering is active afterwards. With auto, a kernel without
// the feature falls back to iptables only, saying why in one line.
func applyBPF(cfg *config.Config, uid int, dryRun bool, rep *rulesReport) (bool, error) {
	if cfg.Steer.BPF == "off" {
		rep.BPF = "off (steer.bpf: off)"
		if cfg.Splice == "sockmap" {
			rep.Warnings = append(rep.Warnings, "splice: sockmap needs the BPF programs (steer.bpf: auto or on); the relay uses splice(2)")
		}
		return false, nil
	}
	if err := bpf.Supported(); err != nil {
		if cfg.Steer.BPF == "on" {
			return false, fmt.Errorf("steer.bpf: on, but %w; set steer.bpf: auto to fall back to iptables only", err)
		}
		rep.Warnings = append(rep.Warnings, "BPF steering unavailable, using iptables only: "+err.Error())
		rep.BPF = "unavailable: " + err.Error()
		return false, nil
	}
	var ports []bpf.Port
	for _, p := range cfg.Steer.HTTPSPorts {
		ports = append(ports, bpf.Port{Port: uint16(p), Slot: bpf.SlotHTTPS})
	}
	if cfg.Listen.HTTP != "off" {
		for _, p := range cfg.Steer.HTTPPorts {
			ports = append(ports, bpf.Port{Port: uint16(p), Slot: bpf.SlotHTTP})
		}
	}
	if dryRun {
		var pp []uint16
		for _, p := range ports {
			pp = append(pp, p.Port)
		}
		action := fmt.Sprintf("load or update sk_lookup steering for ports %v and kernel connection accounting, pins in %s", pp, cfg.Steer.PinDir)
		if cfg.Splice == "sockmap" {
			action += "; load the sockmap splice (splice: sockmap)"
		}
		rep.Changes = append(rep.Changes, redirect.Change{Family: "bpf", Action: action})
		return true, nil
	}
	gid := uid
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		gid, _ = strconv.Atoi(u.Gid)
	}
	splice := cfg.Splice == "sockmap"
	if splice {
		if err := bpf.SpliceSupported(); err != nil {
			rep.Warnings = append(rep.Warnings, "splice: sockmap unavailable, the relay uses splice(2): "+err.Error())
			splice = false
		}
	}
	// The kernel accounts connections on the steered ports (sk_lookup
	// hands them over with their original port) and on the relay's
	// listen ports (where REDIRECT sends them).
	var acct []uint16
	for _, p := range ports {
		acct = append(acct, p.Port)
	}
	for _, a := range []string{cfg.Listen.HTTPS, cfg.Listen.HTTP} {
		if p, err := portOf(a); err == nil && !slices.Contains(acct, p) {
			acct = append(acct, p)
		}
	}
	st, err := bpf.Apply(bpf.Options{PinDir: cfg.Steer.PinDir, Ports: ports, OwnerUID: uid, OwnerGID: gid, Splice: splice, AcctPorts: acct})
	if err != nil {
		if cfg.Steer.BPF == "on" {
			return false, fmt.Errorf("BPF steering: %w", err)
		}
		rep.Warnings = append(rep.Warnings, "BPF steering failed, using iptables only: "+err.Error())
		rep.BPF = "failed: " + err.Error()
		return false, nil
	}
	action := "load sk_lookup steering"
	if st.Updated {
		action = "sk_lookup steering already loaded: program updated in place, ports refreshed"
	}
	if splice {
		action += "; sockmap splice loaded"
	}
	rep.Warnings = append(rep.Warnings, st.Warnings...)
	rep.Changes = append(rep.Changes, redirect.Change{Family: "bpf", Action: action})
	rep.BPFState = st
	rep.BPF = "on"
	return true, nil
}
