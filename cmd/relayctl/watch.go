package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/relay-gw/relay/bpf"
	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/redirect"
)

// watchInterval is how often the watcher checks when no netlink event
// asks it to. A check costs a few `iptables -S` runs and stat calls.
const watchInterval = 2 * time.Second

// watcher is `rules apply --watch`: it keeps what `rules apply` installs
// in place and records each part's health in the state file.
type watcher struct {
	cfg     *config.Config
	backend string
	fams    []*redirect.Family
	opts    *redirect.Options
	bpfOn   bool
	held    *bpf.Held // fds of the pinned objects, to pin them again
	path    string    // state file
	st      *steerState
	log     *slog.Logger
	checks  int
}

// fullEvery: one check in this many also lists our chains' rules.
const fullEvery = 5

// watchRules applies the steering, then keeps it until SIGTERM or SIGINT
// (or `rules delete`, which sends SIGTERM), and deletes it on the way out.
func watchRules(e *env, cfg *config.Config, backend string, fams []*redirect.Family, asJSON bool) error {
	path := steeringStatePath(e.getenv)
	unlock, err := lockWatcher(path)
	if err != nil {
		return err
	}
	defer unlock()
	log := newLogger(cfg.Log, e.stderr)
	w := &watcher{cfg: cfg, backend: backend, fams: fams, path: path, log: log,
		st: &steerState{PID: os.Getpid(), Config: absPath(cfg.Path), Interval: watchInterval.Seconds(), Parts: map[string]*partState{}}}
	rep := &rulesReport{Action: "apply", Backend: backend, BPF: "off"}
	if err := w.apply(rep); err != nil {
		return err
	}
	rep.Steered = cfg.Steer.Interfaces
	rep.Chains, _ = redirect.Show(fams)
	if asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		printRules(e, rep)
	}
	defer func() {
		if err := w.remove(); err != nil {
			log.Error("remove steering", "err", err)
		}
	}()
	w.check("start")
	log.Info("watching the steering", "every", watchInterval, "state", path, "parts", strings.Join(sortedParts(w.st), ","))
	// Type=notify: relay.service (After=relay-rules) starts once the
	// steering is in place.
	if err := sdNotify(e.getenv("NOTIFY_SOCKET"), "READY=1"); err != nil {
		log.Warn("tell systemd the steering is ready", "err", err)
	}
	defer sdNotify(e.getenv("NOTIFY_SOCKET"), "STOPPING=1")

	events := make(chan string, 1)
	if err := redirect.WatchLinks(e.ctx, cfg.Steer.Interfaces, func(what string) {
		select {
		case events <- what:
		default: // a check is already due
		}
	}); err != nil {
		log.Warn("no netlink events: checking on the timer only", "err", err)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(watchInterval)
	defer tick.Stop()
	for {
		select {
		case <-e.ctx.Done():
			log.Info("stopping: removing the steering")
			return nil
		case <-tick.C:
			w.check("")
		case what := <-events:
			log.Info("network changed: checking the steering", "event", what)
			w.check(what)
		case <-hup:
			w.reload()
		}
	}
}

// reload re-reads the config and applies it; the outcome goes to the
// state file for a waiting `rules apply`.
func (w *watcher) reload() {
	w.st.ReloadError = ""
	c, err := config.Load(w.cfg.Path)
	if err == nil {
		prev := w.cfg
		w.cfg = c
		if err = w.apply(&rulesReport{}); err != nil {
			w.cfg = prev
		}
	}
	if err != nil {
		w.log.Error("reload refused; the previous steering stays", "err", err)
		w.st.ReloadError = err.Error()
	} else {
		w.log.Info("config reloaded and applied", "config", w.cfg.Path)
	}
	t := time.Now().UTC()
	w.st.Reloaded = &t
	w.check("reload")
}

// apply installs everything and (re)takes hold of the BPF pins.
func (w *watcher) apply(rep *rulesReport) error {
	opts, bpfOn, err := applySteering(w.cfg, w.backend, w.fams, false, true, rep)
	if err != nil {
		return err
	}
	for _, wa := range rep.Warnings {
		w.log.Warn(wa)
	}
	rep.Warnings = nil
	w.opts, w.bpfOn = opts, bpfOn
	if w.held != nil {
		w.held.Close()
		w.held = nil
	}
	if bpfOn {
		if w.held, err = bpf.Hold(w.cfg.Steer.PinDir); err != nil {
			w.log.Warn("BPF pins not held: a lost bpffs is repaired by a fresh load", "err", err)
			w.held = nil
		}
	}
	return nil
}

// remove deletes all the steering and the state file.
func (w *watcher) remove() error {
	_, err := redirect.Delete(w.fams, false)
	errs := []error{err, bpf.Delete(w.cfg.Steer.PinDir)}
	if w.held != nil {
		w.held.Close() // the last references: the link detaches now
	}
	if err := os.Remove(w.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// partOf maps an iptables family to its part name.
func partOf(family string) string {
	if family == "ipv6" {
		return partV6
	}
	return partV4
}

// inspect returns what is wrong, by part; parts configured but fine map to "".
func (w *watcher) inspect(full bool) map[string]string {
	out := map[string]string{}
	for _, f := range w.fams {
		out[partOf(f.Name)] = ""
	}
	// Our chains' rules are compared every fullEvery checks, and at once
	// after any event; the jumps every time (see redirect.Check).
	full = full || w.checks%fullEvery == 0
	w.checks++
	drifts, err := redirect.Check(w.fams, *w.opts, full)
	if err != nil {
		for p := range out {
			out[p] = err.Error()
		}
	}
	for _, d := range drifts {
		p := partOf(d.Family)
		if out[p] != "" {
			out[p] += "; "
		}
		out[p] += d.String()
	}
	if w.cfg.Steer.BPF == "off" {
		return out
	}
	out[partSkLookup] = ""
	if w.cfg.Splice == "sockmap" {
		out[partSockmap] = ""
	}
	if !w.bpfOn {
		out[partSkLookup] = "not loaded (see the warning at start)"
		return out
	}
	if w.held == nil {
		if _, err := bpf.Show(w.cfg.Steer.PinDir); err != nil {
			out[partSkLookup] = "pins gone from " + w.cfg.Steer.PinDir + " (bpffs unmounted?): " + err.Error()
		}
		return out
	}
	steer, splice := w.held.Check()
	out[partSkLookup] = bpfCause(steer)
	if _, ok := out[partSockmap]; ok || w.held.HasSplice() {
		out[partSockmap] = bpfCause(splice)
	}
	return out
}

func bpfCause(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, bpf.ErrPinsGone):
		return err.Error() + " (bpffs unmounted or the pin directory removed)"
	case errors.Is(err, bpf.ErrDetached):
		return err.Error() + " (detached by hand, e.g. bpftool link detach)"
	case errors.Is(err, bpf.ErrVerdictGone):
		return err.Error() + " (detached by hand, e.g. bpftool prog detach)"
	}
	return err.Error()
}

// check inspects, repairs what drifted, and writes the state file.
func (w *watcher) check(why string) {
	now := time.Now()
	found := w.inspect(why != "")
	var iptDrift, bpfDrift bool
	for p, what := range found {
		if what == "" {
			continue
		}
		if p == partV4 || p == partV6 {
			iptDrift = true
		} else {
			bpfDrift = true
		}
	}
	after := found
	if iptDrift || bpfDrift {
		w.repair(iptDrift, bpfDrift)
		after = w.inspect(true)
	}
	for p, what := range found {
		ps := w.st.Parts[p]
		if ps == nil {
			ps = &partState{State: "ok"}
			w.st.Parts[p] = ps
		}
		switch {
		case after[p] != "":
			if ps.State != "failing" || ps.Error != after[p] {
				w.log.Error("steering broken and not repaired", "part", p, "missing", after[p])
			}
			ps.State, ps.Error = "failing", after[p]
		case what != "":
			t := now.UTC()
			ps.State, ps.Error, ps.LastDrift, ps.RepairedAt = "repaired", "", what, &t
			ps.Repairs++
			w.log.Warn("steering repaired", "part", p, "missing", what, "repairs", ps.Repairs)
		default:
			ps.State, ps.Error = "ok", ""
		}
	}
	for p := range w.st.Parts {
		if _, ok := found[p]; !ok {
			delete(w.st.Parts, p) // no longer configured (reload)
		}
	}
	w.st.Updated = time.Now().UTC()
	if err := writeSteerState(w.path, w.st); err != nil {
		w.log.Error("write steering state", "err", err)
	}
}

// repair re-applies idempotently what drifted. A BPF part is first put
// back from the held objects (same maps: the relay's registered
// listeners stay); if that fails, a fresh apply loads it again.
func (w *watcher) repair(ipt, bpfDrift bool) {
	if bpfDrift && w.held != nil {
		if err := w.held.Repair(""); err == nil {
			bpfDrift = false
		} else {
			w.log.Warn("re-pin held BPF objects; loading afresh", "err", err)
		}
	}
	if bpfDrift {
		if err := w.apply(&rulesReport{}); err != nil {
			w.log.Error("re-apply steering", "err", err)
		}
		return // apply also did iptables
	}
	if ipt {
		if _, err := redirect.Apply(w.fams, *w.opts, false); err != nil {
			w.log.Error("re-apply iptables steering", "err", err)
		}
	}
}

// sdNotify sends state to systemd's notification socket, if there is one.
func sdNotify(socket, state string) error {
	if socket == "" {
		return nil
	}
	if socket[0] == '@' {
		socket = "\x00" + socket[1:] // abstract namespace
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}

// lockWatcher makes sure one watcher runs per state file: it holds an
// exclusive flock on PATH.lock, which holds its pid for `rules delete`.
func lockWatcher(path string) (func(), error) {
	if err := os.MkdirAll(dirOf(path), 0o755); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	f, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open watcher lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path + ".lock")
		f.Close()
		return nil, fmt.Errorf("another `rules apply --watch` runs (pid %s, lock %s.lock): stop it first (systemctl stop relay-rules)", strings.TrimSpace(string(b)), path)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() {
		f.Truncate(0)
		f.Close()
	}, nil
}

func dirOf(path string) string {
	if i := strings.LastIndexByte(path, '/'); i > 0 {
		return path[:i]
	}
	return "."
}

// watcherPID returns the pid of the watcher holding path's lock, 0 when none.
func watcherPID(path string) int {
	f, err := os.Open(path + ".lock")
	if err != nil {
		return 0
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB) == nil {
		return 0
	}
	b, _ := os.ReadFile(path + ".lock")
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// reloadWatcher has the running watcher re-read its config (SIGHUP) and
// waits until it has checked the steering since. The watcher reads its
// own config file: a different -c is refused rather than reverted.
func reloadWatcher(path string, pid int, cfgPath string) error {
	st, err := readSteerState(path)
	if err != nil {
		return fmt.Errorf("read watcher state: %w", err)
	}
	if a, b := absPath(st.Config), absPath(cfgPath); a != b {
		return fmt.Errorf("`rules apply --watch` (pid %d) keeps the steering of %s, not %s: edit that file and run `rules apply -c %s` (or systemctl reload relay-rules), or stop the watcher first", pid, st.Config, cfgPath, st.Config)
	}
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		return fmt.Errorf("signal watcher pid %d: %w", pid, err)
	}
	for deadline := start.Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, err := readSteerState(path); err == nil && st.Reloaded != nil && st.Reloaded.After(start) {
			if st.ReloadError != "" {
				return fmt.Errorf("the watcher (pid %d) refused the config: %s", pid, st.ReloadError)
			}
			return nil
		}
	}
	return fmt.Errorf("the watcher (pid %d) did not apply the config within 30 s: see its log (journalctl -u relay-rules)", pid)
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// stopWatcher tells a running watcher to stop (SIGTERM: it deletes its
// steering) and waits until it has, so that `rules delete` never races
// a watcher that would put the rules back. It returns the watcher's pid,
// 0 when none runs.
func stopWatcher(path string) (int, error) {
	f, err := os.OpenFile(path+".lock", os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("open watcher lock: %w", err)
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
		return 0, nil // nobody watches
	}
	b, _ := os.ReadFile(path + ".lock")
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("a watcher holds %s.lock but its pid is unreadable (%q): stop relay-rules.service first", path, b)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return 0, fmt.Errorf("stop watcher pid %d: %w", pid, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("watcher pid %d did not stop within 30 s", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return pid, nil
}
